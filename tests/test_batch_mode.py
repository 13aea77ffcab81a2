"""Stochastic depth that skips compute: outlined branches in batch and subset mode.

What is proved here: a dropped branch is not executed (its modules are not called, its
parameters get no gradient, its BatchNorm statistics do not move); with every branch kept the
training output is the unmodified model's; keep rates match p_l; seeded draws are the same in
two runs, two processes and two DDP ranks; subset mode runs the branch on the kept rows only;
eval equivalence, strip, deepcopy, idempotence, torch.compile, and the zoo.

Models are small (32 px ResNets, a 4-block toy net at 8 px) and torch runs on one thread.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

import retrofit
from retrofit.layers import StochasticDepthGate
from retrofit.layers.stochastic_depth import draw_key
from retrofit.rewrite.execute import applied_plan
from retrofit.train import distributed as D

sys.path.insert(0, str(Path(__file__).parent))
from user_models import tiny_resnet  # noqa: E402

HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def sd(mode: str = "batch", **kw) -> dict:
    return {"stochastic_depth": {"mode": mode, **kw}}


def gates(model: nn.Module) -> list[StochasticDepthGate]:
    return [m for m in model.modules() if isinstance(m, StochasticDepthGate)]


def force(monkeypatch, keep) -> None:
    """Make every batch-mode decision ``keep(gate)`` instead of a random draw."""
    monkeypatch.setattr(StochasticDepthGate, "_keep_batch", lambda self, key: keep(self))


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def resnet18(**kw) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10, **kw)


X32 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ compute is skipped


def test_dropped_branch_is_not_run_and_gets_no_gradient(monkeypatch):
    model = retrofit.apply(resnet18(), sd(seed=0), example_input=X32)
    edits = applied_plan(model).by_kind("stochastic_depth")
    assert [e.action for e in edits] == ["outline"] * 8
    assert all(g.outlined for g in gates(model))
    force(monkeypatch, lambda g: g.depth < 5)  # keep layer1/layer2, drop layer3/layer4
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(
                lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
            )
    bn_before = model.layer3[1].bn1.running_mean.clone()
    model.train()
    model(X32).sum().backward()
    for layer in ("layer3", "layer4"):
        for i in (0, 1):
            for conv in ("conv1", "conv2"):
                name = f"{layer}.{i}.{conv}"
                assert calls.get(name, 0) == 0, name
                assert getattr(model.get_submodule(f"{layer}.{i}"), conv).weight.grad is None
        # the shortcut (a strided 1x1 projection) always runs
        assert calls[f"{layer}.0.downsample.0"] == 1
        assert model.get_submodule(f"{layer}.0.downsample.0").weight.grad is not None
    for name in ("layer1.0.conv1", "layer2.1.conv2"):
        assert calls[name] == 1 and model.get_submodule(name).weight.grad is not None
    assert torch.equal(model.layer3[1].bn1.running_mean, bn_before), "a dropped BN never ran"
    assert model.layer3[1].bn1.num_batches_tracked.item() == 0
    rates = retrofit.schedule.current_rates(model)
    assert rates["layer4.1.retrofit_stochastic_depth0"]["recent"] == [0.0]
    assert rates["layer1.0.retrofit_stochastic_depth0"]["kept_fraction"] == 1.0


@pytest.mark.parametrize("scaling", ["inverted", "paper"])
def test_all_kept_training_output_is_the_unmodified_models(monkeypatch, scaling):
    """p_L = 1 (nothing ever dropped), and with paper scaling a forced keep (scale 1): the
    outlined training forward and backward are the original model's, bit for bit."""
    original = resnet18()
    model = copy.deepcopy(original)
    p_L = 1.0 if scaling == "inverted" else 0.5
    retrofit.apply(model, sd(p_L=p_L, scaling=scaling), example_input=X32)
    force(monkeypatch, lambda g: True)
    original.train(), model.train()
    a, b = original(X32), model(X32)
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, pa), pb in zip(original.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad), name
    assert all(g.kept_fraction == 1.0 for g in gates(model))


@pytest.mark.parametrize("seed", [None, 11])
def test_keep_rate_matches_p_l_and_branch_runs_exactly_when_kept(seed):
    torch.manual_seed(0)
    model = tiny_resnet(width=4, depth=4)
    retrofit.apply(model, sd(p_L=0.5, seed=seed), example_input=torch.randn(2, 3, 8, 8))
    runs = [0] * 4
    for i, block in enumerate(model.blocks):
        block.conv1.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    steps = 600
    model.train()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    for i, gate in enumerate(gates(model)):
        p = 1 - (i + 1) / 4 * 0.5
        assert gate.survival == pytest.approx(p)
        assert gate.calls == 2 * steps and gate.draws == steps
        assert runs[i] * 2 == gate.kept, "the branch runs exactly on the kept steps"
        assert abs(runs[i] / steps - p) < binomial_tol(p, steps), (i, runs[i] / steps, p)


def test_eval_is_verified_and_unchanged():
    for mode in ("batch", "subset"):
        model = resnet18()
        model.eval()
        with torch.no_grad():
            before = model(X32)
        retrofit.apply(model, sd(mode), example_input=X32)  # verify=True raises on a difference
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(X32), before)


def test_strip_deepcopy_and_idempotence(monkeypatch):
    original = resnet18()
    model = copy.deepcopy(original)
    retrofit.apply(model, sd(seed=3), example_input=X32)
    retrofit.apply(model, sd(seed=3), example_input=X32)  # again: one gate per site
    assert len(gates(model)) == 8
    assert model.state_dict().keys() == original.state_dict().keys()
    assert list(model.parameters()) == list(model.parameters())  # the gate holds no module
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in original.parameters())

    twin = copy.deepcopy(model)
    for name, m in twin.named_modules():
        if "forward" in m.__dict__:  # the copy's rewritten forwards run the copy's modules
            assert m.forward.owner is m and model.get_submodule(name).forward.owner is not m
    force(monkeypatch, lambda g: True)
    model.train(), twin.train()
    with torch.no_grad():
        twin.layer1[0].conv1.weight.zero_()  # the copy computes with its own weights
        assert not torch.equal(model(X32), twin(X32))

    retrofit.strip(model)
    assert not gates(model) and not any("forward" in m.__dict__ for m in model.modules())
    model.train(), original.train()
    assert torch.equal(model(X32), original(X32))
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(model.state_dict(), strict=True)


# ------------------------------------------------------------------ seeded draws


def _decisions(seed: int, steps: int = 24, draws: int = 0) -> list[list[float]]:
    torch.manual_seed(0)
    model = tiny_resnet(width=4, depth=4)
    retrofit.apply(model, sd(p_L=0.5, seed=seed), example_input=torch.randn(2, 3, 8, 8))
    for g in gates(model):
        g.draws = draws
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            torch.rand(3)  # the global RNG moves; seeded gates must not care
            model(torch.randn(2, 3, 8, 8))
    return [list(g.history) for g in gates(model)]


DECISIONS_SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
import torch
torch.manual_seed(12345)  # another global RNG state than the parent's
from test_batch_mode import _decisions
print(json.dumps(_decisions(5)))
"""


def test_seeded_sequence_reproducible_across_runs_processes_and_resume():
    first, second = _decisions(5), _decisions(5)
    assert first == second
    assert any(0.0 in h for h in first) and any(1.0 in h for h in first)
    assert _decisions(6) != first
    # resumed at draw 10 (the trainer restores ``draws``): the same sequence from there on
    assert _decisions(5, steps=14, draws=10) == [h[10:] for h in first]
    proc = subprocess.run(
        [sys.executable, "-c", DECISIONS_SCRIPT.format(here=str(HERE))],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == first


def test_draw_key_is_counter_based_and_stable():
    # Fixed value: the same in every process and Python version (blake2b, not hash()).
    assert draw_key(0, "layer1.0:add:0", 0) == draw_key(0, "layer1.0:add:0", 0)
    assert draw_key(0, "a", 0) != draw_key(0, "b", 0) != draw_key(1, "b", 0)
    assert 0 <= draw_key(2**40, "x", 10**9) < 2**63


# ------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different weights per rank: DDP broadcasts rank 0's
        model = tiny_resnet(width=4, depth=4)
        recipe = retrofit.load_recipe(sd(p_L=0.3))  # no seed in the recipe: the trainer sets it
        retrofit.apply(model, recipe, example_input=torch.randn(2, 3, 8, 8))
        env = D.DistEnv(rank=rank, world_size=world)
        assert D.seed_shared_draws(model, 1234, env) == 1234
        assert D.needs_find_unused(model, recipe)
        ddp = D.wrap_ddp(model, env, find_unused_parameters=D.needs_find_unused(model, recipe))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(rank)  # each rank its own data (and its own global RNG)
        unused = []
        for _ in range(6):
            x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
            F.cross_entropy(ddp(x), y).backward()
            unused.append([b.conv1.weight.grad is None for b in model.blocks])
            opt.step()
            opt.zero_grad(set_to_none=True)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        # DDP broadcasts buffers (BN statistics) at the start of a forward: after the last one
        # they differ by a batch until synced, as the trainer does before saving.
        D.sync_buffers(model, env)
        torch.save(
            {
                "history": [list(g.history) for g in gates(model)],
                "unused": unused,
                "params": params,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_drop_the_same_blocks_and_stay_equal(tmp_path):
    mp.spawn(
        _ddp_worker,
        args=(2, f"file://{tmp_path}/init", str(tmp_path)),
        nprocs=2,
        join=True,
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["history"] == r1["history"]
    flat = [v for h in r0["history"] for v in h]
    assert 0.0 in flat and 1.0 in flat, "both outcomes happened"
    # a dropped branch is unused on both ranks: its gradient stays None (not averaged zeros)
    assert r0["unused"] == r1["unused"]
    for step, per_block in enumerate(r0["unused"]):
        assert per_block == [h[step] == 0.0 for h in r0["history"]]
    for what in ("params", "state"):
        differ = [k for k in r0[what] if not torch.equal(r0[what][k], r1[what][k])]
        assert not differ, (what, differ)


# ------------------------------------------------------------------ subset mode


class OneBlock(nn.Module):
    """x + f(x) with no BatchNorm, so f(x) is the same on a subset of rows as on all rows."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)
        )

    def forward(self, x):
        return x + self.f(x)


def test_subset_runs_the_branch_on_the_kept_rows_only():
    torch.manual_seed(0)
    model = OneBlock()
    retrofit.apply(model, sd("subset", p_L=0.5, schedule="uniform", seed=1))
    seen = []
    model.f[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    x = torch.randn(8, 4, 6, 6)
    with torch.no_grad():
        fx_full = model.f(x)
    seen.clear()
    model.train()
    with torch.no_grad():
        out = model(x)
    assert seen == [4], "k = round(0.5 * 8) rows went through the branch"
    kept = [(out[i] - x[i]).abs().max() > 0 for i in range(8)]
    assert sum(kept) == 4
    for i in range(8):  # kept rows: x + (N/k)·f(x), dropped rows: x
        expected = x[i] + 2.0 * fx_full[i] if kept[i] else x[i]
        torch.testing.assert_close(out[i], expected)


def test_subset_matches_the_row_mode_expectation():
    """Both modes keep each sample with probability p_l and are unbiased: E[out] = x + f(x)."""
    torch.manual_seed(0)
    base = OneBlock()
    x = torch.randn(8, 4, 5, 5)
    with torch.no_grad():
        f = base.f(x)
    steps = 400
    means = {}
    for mode in ("subset", "row"):
        model = retrofit.apply(copy.deepcopy(base), sd(mode, p_L=0.5, schedule="uniform"))
        model.train()
        torch.manual_seed(1)
        with torch.no_grad():
            means[mode] = sum(model(x) for _ in range(steps)) / steps
        gate = gates(model)[0]
        assert abs(gate.kept_fraction - 0.5) < binomial_tol(0.5, 8 * steps)
    # per element: x + f·(1/p)·(kept frequency), frequency ~ p ± sqrt(p(1-p)/steps)
    tol = 6 * f.abs() * 2 * math.sqrt(0.25 / steps) + 1e-5
    for mode, mean in means.items():
        assert torch.all((mean - (x + f)).abs() <= tol), mode


def test_subset_on_resnet_feeds_the_branch_a_smaller_batch():
    model = retrofit.apply(resnet18(), sd("subset", p_L=0.5, seed=2), example_input=X32)
    seen: dict[str, int] = {}
    for name in ("layer1.0.conv1", "layer4.1.conv1", "layer4.0.downsample.0"):
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, args[0].shape[0])
        )
    x = torch.randn(8, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    # p_1 = 0.9375 → round(7.5) = 8 rows; p_8 = 0.5 → 4 rows; the shortcut sees all 8
    assert seen == {"layer1.0.conv1": 8, "layer4.1.conv1": 4, "layer4.0.downsample.0": 8}
    assert model.layer4[1].conv1.weight.grad is not None


# ------------------------------------------------------------------ refusals and slots


class Functional(nn.Module):
    """A user model: residual adds in every spelling, plus two the outliner must refuse."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))
            for _ in range(6)
        )
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b[0](x)
        x = torch.add(x, self.b[1](x))
        y = self.b[2](x)
        y += x  # traced as an out-of-place add
        x = y.add(self.b[3](y))
        x = torch.add(x, self.b[4](x), alpha=0.5)  # not a plain sum: masked, not outlined
        z = x.relu()
        z.add_(self.b[5](z))  # in place on the shortcut: the gate adds in place too
        return self.head(z.mean((2, 3)))


def test_user_model_functional_adds_and_refusals(monkeypatch):
    original = Functional()
    model = copy.deepcopy(original)
    x = torch.randn(2, 3, 8, 8)
    retrofit.apply(model, sd(scaling="paper"), example_input=x)
    edits = applied_plan(model).by_kind("stochastic_depth")
    assert [e.action for e in edits] == ["outline"] * 4 + ["wrap_arg", "outline"]
    assert "alpha=" in edits[4].note and "not outlined" in edits[4].note
    outlines = model.__dict__["forward"].outlines  # the root owns every site here
    inplace = [
        outlines[name].inplace
        for name, g in model.named_children()
        if isinstance(g, StochasticDepthGate) and g.outlined
    ]
    assert inplace == ["", "", "", "", "shortcut"]
    force(monkeypatch, lambda g: True)
    original.train(), model.train()
    torch.testing.assert_close(model(x), original(x))
    assert [list(g.history) for g in gates(model)] == [[1.0]] * 6
    force(monkeypatch, lambda g: False)
    model(x).sum().backward()
    assert all(model.b[i][0].weight.grad is None for i in (0, 1, 2, 3, 5))
    assert model.b[4][0].weight.grad is not None  # masked: computed, multiplied by 0


class ShapeOutside(nn.Module):
    """The branch reshapes with a batch size read before it: wrong on a subset of rows."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        b = x.shape[0]
        y = x + self.f(x).reshape(b, -1)
        return y.reshape(b, -1)


def test_subset_refuses_a_branch_that_reads_the_batch_size_from_outside():
    batch = retrofit.plan(ShapeOutside(), sd("batch")).edits
    subset = retrofit.plan(ShapeOutside(), sd("subset")).edits
    assert [e.action for e in batch] == ["outline"]
    assert [e.action for e in subset] == ["wrap_arg"] and "shape" in subset[0].note
    model = retrofit.apply(ShapeOutside(), sd("subset"), example_input=torch.randn(4, 4))
    model.train()(torch.randn(6, 4)).sum().backward()


def test_existing_timm_drop_path_slot_is_kept_at_rate_zero():
    model = timm.create_model("resnet50", drop_path_rate=0.2, num_classes=10)
    rates = {n: m.drop_prob for n, m in model.named_modules() if type(m).__name__ == "DropPath"}
    assert rates
    retrofit.apply(model, sd(), example_input=X32[:2])
    edits = applied_plan(model).by_kind("stochastic_depth")
    assert {e.action for e in edits} == {"outline"}
    assert all(model.get_submodule(n).drop_prob == 0.0 for n in rates)
    retrofit.strip(model)
    assert {n: model.get_submodule(n).drop_prob for n in rates} == rates


# ------------------------------------------------------------------ the zoo


def _tv(name):
    return lambda: getattr(torchvision.models, name)(num_classes=10)


ZOO = [
    ("tv_resnet18", _tv("resnet18"), (3, 32, 32), 8),
    ("tv_resnet50", _tv("resnet50"), (3, 32, 32), 16),
    ("timm_resnet50", lambda: timm.create_model("resnet50", num_classes=10), (3, 32, 32), 16),
    (
        "timm_vit_tiny",
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10),
        (3, 224, 224),
        24,
    ),
]


@pytest.mark.parametrize("name, build, size, sites", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_outlines_every_site_and_trains(monkeypatch, name, build, size, sites):
    torch.manual_seed(0)
    original = build()
    model = copy.deepcopy(original)
    x = torch.randn(2, *size)
    retrofit.apply(model, sd(scaling="paper", seed=0), example_input=x)
    edits = applied_plan(model).by_kind("stochastic_depth")
    assert len(edits) == sites and all(e.action == "outline" for e in edits)
    # all kept, paper scaling: the training forward is the original's
    force(monkeypatch, lambda g: True)
    original.train(), model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
    # every other block dropped: forward and backward run, the dropped ones get no gradient
    force(monkeypatch, lambda g: g.depth % 2 == 0)
    model(x).sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad and len(no_grad) < sum(1 for _ in model.parameters())


# ------------------------------------------------------------------ torch.compile


@pytest.mark.slow
def test_compiled_batch_mode_forward_backward_matches_eager():
    torch.manual_seed(0)
    model = tiny_resnet(width=4, depth=4)
    retrofit.apply(model, sd(p_L=0.5, seed=4), example_input=torch.randn(2, 3, 8, 8))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    model.train(), eager.train()
    for step in range(6):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        a, b = compiled(x), eager(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        a.square().sum().backward()
        b.square().sum().backward()
    for (name, pa), pb in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-4)
    history = [list(g.history) for g in gates(model)]
    assert history == [list(g.history) for g in gates(eager)]
    assert any(0.0 in h for h in history), "some branch was dropped under compile"


# ------------------------------------------------------------------ trainer


def test_trainer_checkpoint_keeps_the_draw_counter(tmp_path):
    from test_train import TinyRes, small_cfg

    from retrofit.train import fit
    from retrofit.train.checkpoint import load_checkpoint

    torch.manual_seed(0)
    res = fit(TinyRes(), sd(p_L=0.5, seed=9), None, out=tmp_path, device="cpu", progress=False,
              max_steps=3, config=small_cfg(epochs=1, log_every=1))  # fmt: skip
    gates_saved = load_checkpoint(tmp_path / "checkpoint.pt")["per_rank"][0]["gates"]
    assert gates_saved and all(len(v) == 3 and v[2] == 3 for v in gates_saved.values())
    steps = [r for r in res.history if r["kind"] == "step"]
    assert len(steps) == 3 and all(r["sd_kept"] is not None for r in steps)


def test_shared_seeds_only_when_ranks_must_agree():
    model = retrofit.apply(
        tiny_resnet(width=4, depth=2), sd(), example_input=torch.randn(2, 3, 8, 8)
    )
    assert D.seed_shared_draws(model, 7, D.DistEnv()) is None  # one process: global RNG, as before
    assert all(g.seed is None for g in gates(model))
    assert D.seed_shared_draws(model, 7, D.DistEnv(rank=1, world_size=2)) == 7
    assert all(g.seed == 7 and g.draws == 0 for g in gates(model))
    row = retrofit.apply(
        tiny_resnet(width=4, depth=2), sd("row"), example_input=torch.randn(2, 3, 8, 8)
    )
    assert D.seed_shared_draws(row, 7, D.DistEnv(rank=1, world_size=2)) is None
    assert not D.needs_find_unused(row, retrofit.load_recipe(sd("row")))
