"""Training-step time and memory of stochastic depth that skips compute, against its peers.

    python tools/bench_stochastic_depth.py [--device cpu|cuda] [--threads 1] [--reps 10]
                                           [--steps 4] [--warmup 3] [--batch 16] [--size 96]
                                           [--clock thread|wall] [--json]

One run, one process. For ResNet-50 from torchvision and from timm, batch 16 at 96 px, one
training step = forward + cross-entropy + backward + SGD(momentum) step, for:

    plain     the unmodified model
    batch     retrofit, stochastic_depth {mode: batch, p_L: 0.5}: a dropped block is not run
              target batch / plain <= 0.82 (the expected-FLOPs limit is printed beside it)
    row       retrofit, mode row (per-sample masks, every branch computed)
    timm_dp   timm's own resnet50 with DropPath in every block at the same linear rates
              (timm only)                                    target row / timm_dp <= 1.02
    subset    retrofit, mode subset (DINOv2-style: the branch runs on the kept rows only)

Methodology: every variant gets its own model (same seed, same weights) and optimizer; the
variants are timed in interleaved rounds (``--reps`` rounds of ``--steps`` consecutive steps, the
order rotating every round), after ``--warmup`` untimed steps each, so a busy neighbour on a shared
machine slows all of them alike. Each round yields the mean step time of its steps; a variant's
figure is the median over rounds. Batch mode's step time varies with the blocks it drops, so a
round's mean (not a single step) is the unit. Seeds are fixed (weights, data, the gates' draws)
and torch uses ``--threads`` intra-op threads.

Clock: on CPU the default is the calling thread's CPU time (``--clock thread``), as in
tools/bench_layers.py: with one intra-op thread the forward, the backward (autograd runs CPU work
on the calling thread) and the optimizer step all run on it, so time taken by other processes on a
shared machine is not counted. Wall time (``--clock wall``, always on CUDA) counts it.

Expected-time limit (``--limit-reps``, 0 to skip): what batch mode can save on this machine is
set by the time the dropped blocks take, not their FLOPs (the linear schedule drops the deep,
low-resolution blocks most; the stem, the projections, the head, the optimizer and the early
blocks' memory-bound BatchNorm/ReLU stay). A second interleaved phase times the batch model with
every branch kept and with one whole stage dropped at a time (forced), next to ``plain``; a
stage's measured saving is split over its blocks by FLOPs, and the limit is
E[T] / T_plain = (T_kept − Σ_l (1 − p_l)·saving_l) / T_plain.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the timed steps (weights, grads and
momentum included). On CPU the process's peak RSS is shared by all variants (it only ever grows,
and interleaving mixes them), so it is reported as n/a; instead every variant reports the bytes
of activations autograd saves for backward in a training forward (parameters excluded, mean over
a few steps) — the part of training memory that stochastic depth changes, on any device.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import timm.layers
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import retrofit  # noqa: E402
from retrofit.layers import StochasticDepthGate  # noqa: E402
from retrofit.rewrite.execute import applied_plan  # noqa: E402

P_L = 0.5


def recipe(mode: str) -> dict[str, Any]:
    return {"stochastic_depth": {"p_L": P_L, "mode": mode, "seed": 0}}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "torchvision":
        return torchvision.models.resnet50(num_classes=100)
    return timm.create_model("resnet50", num_classes=100)


def timm_drop_path(model: nn.Module, survival: dict[str, float]) -> nn.Module:
    """timm's resnet50 with its own DropPath in every block, at retrofit's linear rates.

    ``create_model(drop_path_rate=r)`` spaces rates as r·i/(L−1), i = 0..L−1 (block 1 gets an
    Identity); the paper's rule is (1 − p_L)·l/L, l = 1..L. Setting the same rates on timm's
    DropPath makes the comparison about the implementation, not the schedule.
    """
    for owner, p in survival.items():
        model.get_submodule(owner).drop_path = timm.layers.DropPath(1.0 - p)
    return model


def variants(family: str, size: int, device: torch.device) -> dict[str, nn.Module]:
    example = torch.randn(2, 3, size, size)
    plain = build(family)
    out = {"plain": plain}
    for mode in ("batch", "row", "subset"):
        model = copy.deepcopy(plain)
        retrofit.apply(model, recipe(mode), example_input=example)
        out[mode] = model
    if family == "timm":
        survival = {e.module: e.survival for e in applied_plan(out["batch"]).edits}
        out["timm_dp"] = timm_drop_path(copy.deepcopy(plain), survival)
    return {k: v.to(device).train() for k, v in out.items()}


def branch_macs(
    model: nn.Module, x: torch.Tensor
) -> tuple[float, dict[StochasticDepthGate, float]]:
    """Forward MACs of the model and of each outlined gate's branch (counted with all kept)."""
    macs = {"total": 0.0}
    current: list[StochasticDepthGate | None] = [None]
    per_gate: dict[StochasticDepthGate, float] = {}

    def hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            n = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            n = out.numel() * m.in_features
        macs["total"] += n
        if current[0] is not None:
            per_gate[current[0]] = per_gate.get(current[0], 0.0) + n

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    gates = [g for g in model.modules() if isinstance(g, StochasticDepthGate) and g.outlined]
    saved = [(g, g.survival) for g in gates]

    def attribute(g: StochasticDepthGate, args: Any, kwargs: dict) -> tuple[Any, dict]:
        # The owner's forward passes the branch to the gate on each call: count what it runs.
        branch = kwargs.get("branch")
        if branch is None:
            return args, kwargs

        def wrapped(*a: Any) -> Any:
            current[0] = g
            try:
                return branch(*a)
            finally:
                current[0] = None

        return args, {**kwargs, "branch": wrapped}

    handles += [g.register_forward_pre_hook(attribute, with_kwargs=True) for g in gates]
    for g in gates:
        g.survival = 1.0
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for g, p in saved:
            g.survival = p
    return macs["total"], per_gate


def expected_flops_ratio(model: nn.Module, x: torch.Tensor) -> float:
    """E[forward MACs] / MACs of an outlined batch-mode model: each branch weighted by p_l."""
    total, per_gate = branch_macs(model, x)
    return 1.0 - sum((1.0 - g.survival) * m for g, m in per_gate.items()) / total


def stage_gates(model: nn.Module) -> dict[str, list[StochasticDepthGate]]:
    """Outlined gates by stage: the first component of their owner's name (``layer3``)."""
    out: dict[str, list[StochasticDepthGate]] = {}
    for name, m in model.named_modules():
        if isinstance(m, StochasticDepthGate) and m.outlined:
            out.setdefault(name.split(".")[0], []).append(m)
    return out


class forced:
    """Force the batch-mode decision of ``gates``: kept unless in ``drop`` (an instance
    attribute shadows StochasticDepthGate._keep_batch; removed on exit)."""

    def __init__(self, gates: list[StochasticDepthGate], drop: set[StochasticDepthGate]):
        self.gates, self.drop = gates, drop

    def __enter__(self) -> None:
        for g in self.gates:
            g.__dict__["_keep_batch"] = lambda key, g=g: g not in self.drop

    def __exit__(self, *exc: Any) -> None:
        for g in self.gates:
            g.__dict__.pop("_keep_batch", None)


def time_limit(
    models: dict[str, nn.Module],
    opts: dict[str, torch.optim.Optimizer],
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    clock: Any,
) -> dict[str, Any]:
    """The expected-time limit of batch mode (module docstring), from forced drop patterns."""
    device = x.device
    model, opt = models["batch"], opts["batch"]
    stages = stage_gates(model)
    every = [g for gs in stages.values() for g in gs]
    _, macs = branch_macs(model, x)
    patterns = {"kept": set(), **{f"drop {s}": set(gs) for s, gs in stages.items()}}
    names = ["plain", *patterns]
    rounds: dict[str, list[float]] = {n: [] for n in names}

    def one(name: str) -> None:
        if name == "plain":
            step(models["plain"], opts["plain"], x, y)
        else:
            with forced(every, patterns[name]):
                step(model, opt, x, y)

    for name in names:
        one(name)
    for r in range(args.limit_reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = clock()
            for _ in range(args.limit_steps):
                one(name)
            sync(device)
            rounds[name].append((clock() - t0) / args.limit_steps)
    t = {n: statistics.median(v) for n, v in rounds.items()}
    saving = 0.0
    for s, gs in stages.items():
        stage_macs = sum(macs.get(g, 0.0) for g in gs) or 1.0
        dropped = t["kept"] - t[f"drop {s}"]
        saving += sum((1 - g.survival) * dropped * macs.get(g, 0.0) / stage_macs for g in gs)
    return {
        "median_ms": {n: 1e3 * v for n, v in t.items()},
        "expected_ms": 1e3 * (t["kept"] - saving),
        "expected_ratio": (t["kept"] - saving) / t["plain"],
    }


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch,), generator=g).to(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch": args.batch,
        "size": args.size,
        "p_L": P_L,
        "reps": args.reps,
        "steps": args.steps,
        "warmup": args.warmup,
        "clock": args.clock,
        "families": {},
    }
    for family in ("torchvision", "timm"):
        models = variants(family, args.size, device)
        opts = {
            k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()
        }
        names = list(models)
        flops = expected_flops_ratio(models["batch"], x)
        for name in names:
            for _ in range(args.warmup):
                step(models[name], opts[name], x, y)
        sync(device)
        rounds: dict[str, list[float]] = {n: [] for n in names}
        peak: dict[str, int | None] = {n: None for n in names}
        for r in range(args.reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = clock()
                for _ in range(args.steps):
                    step(models[name], opts[name], x, y)
                sync(device)
                rounds[name].append((clock() - t0) / args.steps)
                if device.type == "cuda":
                    p = torch.cuda.max_memory_allocated(device)
                    peak[name] = max(peak[name] or 0, p)
        saved = {
            name: statistics.mean(
                saved_activation_bytes(models[name], x, y) for _ in range(args.memory_steps)
            )
            for name in names
        }
        fam: dict[str, Any] = {"expected_flops_ratio_batch": flops, "variants": {}}
        for name in names:
            fam["variants"][name] = {
                "median_ms": 1e3 * statistics.median(rounds[name]),
                "min_ms": 1e3 * min(rounds[name]),
                "max_ms": 1e3 * max(rounds[name]),
                "saved_activations_mb": saved[name] / 2**20,
                "peak_mb": None if peak[name] is None else peak[name] / 2**20,
            }
        kept = [
            g.kept_fraction for g in models["batch"].modules() if isinstance(g, StochasticDepthGate)
        ]
        fam["batch_mean_kept_fraction"] = sum(kept) / len(kept)
        if args.limit_reps:
            fam["limit"] = time_limit(models, opts, x, y, args, clock)
        v = fam["variants"]
        fam["ratios"] = {
            "batch/plain": v["batch"]["median_ms"] / v["plain"]["median_ms"],
            "row/plain": v["row"]["median_ms"] / v["plain"]["median_ms"],
            "subset/plain": v["subset"]["median_ms"] / v["plain"]["median_ms"],
        }
        if "timm_dp" in v:
            fam["ratios"]["row/timm_dp"] = v["row"]["median_ms"] / v["timm_dp"]["median_ms"]
            fam["ratios"]["timm_dp/plain"] = v["timm_dp"]["median_ms"] / v["plain"]["median_ms"]
        results["families"][family] = fam
        del models, opts
    return results


TARGETS = {"batch/plain": 0.82, "row/timm_dp": 1.02}


def report(res: dict[str, Any]) -> str:
    lines = [
        f"stochastic depth step time — {res['device']}, {res['threads']} thread(s), torch "
        f"{res['torch']}, resnet50 batch {res['batch']} @ {res['size']} px, p_L {res['p_L']} "
        f"(linear), median over {res['reps']} interleaved rounds of {res['steps']} steps "
        f"(+{res['warmup']} warmup), {res['clock']} clock",
    ]
    for family, fam in res["families"].items():
        lines.append("")
        lines.append(
            f"{family} resnet50   (batch mode: mean kept fraction "
            f"{fam['batch_mean_kept_fraction']:.3f}, expected-FLOPs ratio "
            f"{fam['expected_flops_ratio_batch']:.3f})"
        )
        lines.append(
            f"  {'variant':<8} {'median ms':>10} {'min ms':>8} {'max ms':>8} "
            f"{'saved act MB':>13} {'peak MB':>8}"
        )
        for name, v in fam["variants"].items():
            peak = "n/a" if v["peak_mb"] is None else f"{v['peak_mb']:.0f}"
            lines.append(
                f"  {name:<8} {v['median_ms']:>10.1f} {v['min_ms']:>8.1f} {v['max_ms']:>8.1f} "
                f"{v['saved_activations_mb']:>13.1f} {peak:>8}"
            )
        for ratio, value in fam["ratios"].items():
            target = TARGETS.get(ratio)
            verdict = ""
            if target is not None:
                verdict = f"  (target <= {target:.2f}: {'met' if value <= target else 'MISSED'})"
            lines.append(f"  {ratio:<14} {value:.3f}{verdict}")
        limit = fam.get("limit")
        if limit:
            times = ", ".join(f"{n} {v:.1f}" for n, v in limit["median_ms"].items())
            lines.append(
                f"  expected-time limit of batch/plain: {limit['expected_ratio']:.3f} "
                f"(forced patterns, median ms: {times})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--memory-steps", type=int, default=4)
    ap.add_argument("--limit-reps", type=int, default=6)
    ap.add_argument("--limit-steps", type=int, default=2)
    ap.add_argument("--clock", choices=["thread", "wall"], default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.clock is None:
        args.clock = "wall" if args.device == "cuda" else "thread"
    elif args.clock == "thread" and args.device == "cuda":
        ap.error("--clock thread measures host CPU time; on CUDA use --clock wall")
    res = run(args)
    print(json.dumps(res, indent=2) if args.json else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
