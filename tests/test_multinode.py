"""The trainer past one machine: ``torchrun --nnodes 2`` with c10d rendezvous.

Two torchrun launchers, each a single-process "node", meet at a c10d rendezvous on the loopback
address, exactly as two machines would at ``--rdzv_endpoint HOST:PORT``. The test shows what
multi-node training must guarantee: both nodes end with identical weights (DDP all-reduces
across nodes, rank 0's initial weights broadcast to the other node), and batch-mode stochastic
depth skipped the same blocks on both (the gates are seeded from ``train.seed`` when distributed,
so a node never averages a kept branch's gradient with the zeros of a node that skipped it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NODE_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
import retrofit
from retrofit.layers import StochasticDepthGate
from retrofit.train import fit
from tests.test_train import TinyRes, small_cfg

rank = int(os.environ["RANK"])
torch.manual_seed(100 + rank)  # different initial weights per node: DDP must broadcast rank 0's
model = TinyRes(num_classes=10)  # digits' 10 classes: the head is kept as is
recipe = {{"stochastic_depth": {{"p_L": 0.5, "mode": "batch"}}}}  # no seed: fit seeds the gates
retrofit.apply(model, recipe, example_input=torch.randn(2, 3, 16, 16))
gates = {{n: m for n, m in model.named_modules() if isinstance(m, StochasticDepthGate)}}
res = fit(model, recipe, None, out=sys.argv[1], device="cpu", progress=False, max_steps=8,
          config=small_cfg(epochs=1, log_every=100), apply=False)
torch.save(res.model.state_dict(), f"{{sys.argv[1]}}/rank{{rank}}.pt")
decisions = {{n: list(g.history) for n, g in gates.items()}}
meta = {{"world": int(os.environ["WORLD_SIZE"]), "group_rank": int(os.environ["GROUP_RANK"]),
        "step": res.step, "decisions": decisions}}
with open(f"{{sys.argv[1]}}/rank{{rank}}.json", "w") as f:
    json.dump(meta, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_through_torchrun_c10d_rendezvous(tmp_path):
    root = str(Path(__file__).resolve().parent.parent)
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT.format(root=root))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "retrofit-test",
                "--max_restarts",
                "0",
                str(script),
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(2)
    ]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-4000:]

    metas = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world"] for m in metas] == [2, 2]
    assert sorted(m["group_rank"] for m in metas) == [0, 1], "two nodes, one process each"
    assert [m["step"] for m in metas] == [8, 8]
    # Identical batch-mode decisions: the same kept/dropped sequence at every gate on both nodes,
    # and not a trivial one (some block was skipped, some kept).
    d0, d1 = metas[0]["decisions"], metas[1]["decisions"]
    assert d0 == d1
    assert len(d0) == 4 and all(len(seq) == 8 for seq in d0.values())
    flat = [v for seq in d0.values() for v in seq]
    assert 0.0 in flat and 1.0 in flat
    # Identical weights after training.
    s0 = torch.load(out / "rank0.pt", weights_only=True)
    s1 = torch.load(out / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    assert [k for k in s0 if not torch.equal(s0[k], s1[k])] == []
    assert (out / "model.safetensors").is_file(), "rank 0 exported the stripped weights"
