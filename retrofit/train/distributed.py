"""torchrun support: process group, device per rank, DDP wrapping, SyncBatchNorm and collectives.

Everything here is PyTorch's own machinery (``torch.distributed``, ``DistributedDataParallel``);
this module only decides the flags and hides the single-process case behind the same calls, so
the loop reads the same with one process or many.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from retrofit.layers.protocol import SharedDraws
from retrofit.techniques import unused_parameters

log = logging.getLogger("retrofit.train")


@dataclass
class DistEnv:
    """Where this process stands: rank, world size, its device, and whether we own the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(ValueError):
    """A device that torch does not know, or that this machine does not have."""


def available_devices() -> list[str]:
    """The devices this process can train on, in words a ``--device`` flag accepts."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, refused unless this machine can run on it.

    torch accepts ``torch.device("cuda")`` on a machine without a GPU and only fails at the first
    tensor moved there, deep in a run; this turns that into one clear error before any work.

    Raises:
        DeviceError: not a device name, the meta device (no data), or not available here.
    """
    allowed = "allowed here: " + ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {device!r} is not a torch device name; {allowed}") from None
    if dev.type == "meta":
        raise DeviceError(f"device {device!r} holds no data and cannot train; {allowed}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r}: CUDA is not available on this machine (no GPU or no "
                f"driver); {allowed}"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); {allowed}"
            )
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if not callable(is_available) or not is_available():
            raise DeviceError(f"device {device!r} is not available on this machine; {allowed}")
    return dev


def setup(device: str | torch.device | None = None) -> DistEnv:
    """Join torchrun's process group when launched by it (``RANK``/``WORLD_SIZE`` set).

    The backend is NCCL on CUDA and gloo on CPU. A group the caller already initialised is reused
    and left for the caller to destroy.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


_LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def launch_command(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    parent_cmdline: Sequence[str] | None = None,
) -> tuple[list[str], list[str]] | None:
    """How torchrun started this process: ``(launcher, entry)``, or None outside torchrun.

    ``launcher`` is the command up to the training program (``["torchrun", "--nproc_per_node",
    "2", "--standalone"]``), ``entry`` the program (``["-m", "retrofit.cli"]`` or a script), so
    ``launcher + entry + arguments`` runs the same job again: the command a resume hint prints.
    torchrun's agent is this process's parent and its command line is the one the user typed
    (``/proc/PPID/cmdline``); where that cannot be read or does not end with this process's own
    arguments, it is rebuilt from the variables torchrun sets (node and process counts; the
    rendezvous endpoint of a multi-node run is not among them and is left for the user to add).

    Args:
        argv: this process's arguments after the program (default ``sys.argv[1:]``).
        environ: the environment (default ``os.environ``).
        parent_cmdline: the parent's argv (default: read from ``/proc``), for tests.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or "LOCAL_WORLD_SIZE" not in env:
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    parent = list(parent_cmdline) if parent_cmdline is not None else _parent_cmdline()
    from_parent = _split_launcher(parent, argv) if parent else None
    if from_parent is not None:
        return from_parent
    nodes = env.get("GROUP_WORLD_SIZE", "1")
    launcher = ["torchrun", "--nnodes", nodes, "--nproc_per_node", env["LOCAL_WORLD_SIZE"]]
    if nodes == "1":
        launcher.append("--standalone")
    else:
        launcher += ["--rdzv_backend", "c10d", "--rdzv_id", env["TORCHELASTIC_RUN_ID"]]
    return launcher, ["-m", "retrofit.cli"]


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:  # not Linux, or no /proc
        return []
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0") if a]


def _split_launcher(parent: list[str], argv: list[str]) -> tuple[list[str], list[str]] | None:
    """``(launcher, entry)`` from torchrun's own argv, which ends with ``entry + argv``."""
    start = None
    for i, a in enumerate(parent):
        if os.path.basename(a) in ("torchrun", "torchrun.exe"):
            start, name = i + 1, ["torchrun"]  # an installed script: python /venv/bin/torchrun
            break
        if a == "-m" and i + 1 < len(parent) and parent[i + 1] in _LAUNCHER_MODULES:
            start, name = i + 2, [*parent[: i + 2]]  # python -m torch.distributed.run
            break
    n = len(argv)
    if start is None or len(parent) < start + n + 1 or parent[len(parent) - n :] != argv:
        return None
    rest = parent[start : len(parent) - n]
    module = len(rest) >= 2 and rest[-2] in ("-m", "--module")
    entry = rest[-2:] if module else rest[-1:]
    if module:
        entry = ["-m", entry[1]]
    return [*name, *rest[: len(rest) - len(entry)]], entry


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, env: DistEnv, *, find_unused_parameters: bool) -> nn.Module:
    """DDP-wrap ``model`` (it broadcasts rank 0's parameters and buffers on construction)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def needs_find_unused(model: nn.Module, recipe: Any) -> bool:
    """True when some parameters may get no gradient in a step: DDP's ``find_unused_parameters``.

    A stochastic-depth gate in *batch* mode outlines its residual branch and, when it drops it,
    does not run it: the branch's parameters take no part in that step's autograd graph. DDP's
    reducer waits for a gradient of every parameter before it all-reduces a bucket, so without
    ``find_unused_parameters=True`` it raises "Expected to have finished reduction in the prior
    iteration" (or hangs). With it, DDP walks the autograd graph from the outputs after every
    forward and marks the missing parameters ready. ``static_graph=True`` is no alternative: it
    records the set of used parameters in the first iteration and assumes it never changes.

    The flag makes training correct, not consistent: if ranks dropped different blocks, a kept
    branch's gradient would be averaged with the zeros of the ranks that dropped it. Seeded
    gates (:func:`seed_shared_draws`) make every rank drop the same blocks; a parameter unused on
    every rank then keeps ``grad=None``, so the optimizer leaves it alone in that step (no
    momentum or weight-decay update), exactly as in a single process.

    Row and subset modes run every branch (on all rows, or on the kept rows) and the search has
    a cost, so the flag is off for them.
    """
    return unused_parameters(recipe, model)  # each technique's record says (batch mode does)


def seed_shared_draws(
    model: nn.Module, seed: int, env: DistEnv, *, kind: str | None = None
) -> int | None:
    """Give the model's ``SharedDraws`` layers (of ``kind``, or all) a common seed when ranks
    must agree (``retrofit.layers.protocol.SharedDraws``).

    Unseeded layers draw from the global RNG, which the trainer seeds per rank (``seed + rank``):
    in a distributed run their decisions would differ between ranks. So when the run is
    distributed and one of them needs a shared seed (a batch-mode stochastic-depth gate), every
    unseeded one gets ``seed``; layers the recipe seeded (``stochastic_depth.seed``) keep theirs.
    Every seeded layer's draw counter restarts at 0 (a resumed run restores it from the
    checkpoint afterwards). Returns the seed set, or None when nothing needed one.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, SharedDraws) and (kind is None or m.kind == kind)
    ]
    chosen = None
    if env.distributed and any(m.needs_shared_seed() and m.seed is None for m in layers):
        chosen = seed
        for m in layers:
            if m.seed is None:
                m.seed = seed
    for m in layers:
        if m.seed is not None:
            m.restart_draws()
    return chosen


def convert_sync_bn(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Replace BatchNorm layers by SyncBatchNorm; return the original classes to undo it later."""
    originals = {
        name: type(m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    # convert_sync_batchnorm swaps children in place and returns the root (a new object only when
    # the root itself is a BatchNorm, which is not a classifier we could train).
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return originals


def revert_sync_bn(model: nn.Module, originals: dict[str, type[nn.Module]]) -> None:
    """Undo :func:`convert_sync_bn`, so the returned model is of the original architecture."""
    for name, cls in originals.items():
        if not name:
            continue
        m = model.get_submodule(name)
        if not isinstance(m, nn.SyncBatchNorm) or cls is nn.SyncBatchNorm:
            continue
        bn = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        state = m.state_dict()
        bn.load_state_dict(state)
        ref = next(iter(state.values()), None)
        if ref is not None:
            bn.to(device=ref.device)
        bn.train(m.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, bn)


def sync_buffers(module: nn.Module, env: DistEnv) -> None:
    """Broadcast rank 0's buffers (BatchNorm statistics).

    DDP broadcasts buffers at the *start* of each forward, so after the last training forward the
    ranks' running statistics differ by one batch; evaluation and the saved weights use rank 0's.
    """
    if not env.distributed:
        return
    for b in module.buffers():
        dist.broadcast(b.data, 0)


def broadcast_state(module: nn.Module, env: DistEnv) -> None:
    """Make every rank hold rank 0's parameters and buffers.

    DDP does this when it wraps the model, but the EMA copy is taken before that and a freshly
    resized classifier differs per rank; one broadcast up front keeps all ranks identical.
    """
    if not env.distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True if ``flag`` is set on any rank (so all ranks stop at the same step)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
