"""Compiled training steps: retrofit's gates against their peers, measured in one run.

1. row mode: timm resnet18 built with timm's own ``drop_path_rate`` against the same
   architecture built with ``drop_path_rate=0`` and retrofitted with the same rates
   (``{"stochastic_depth": {"drop_path_rate": R}}``: timm's spacing) — ratio of compiled steps;
2. batch mode (``compiled_form(model, "mask")``) against the unmodified model, compiled;
3. batch mode's graph count in both compiled forms (dynamo, before the backend).

Steps are forward + backward + SGD, interleaved in rounds, median per model. CPU inductor here:

    OMP_NUM_THREADS=2 python tools/bench_compile.py --batch 8 --size 64 --rounds 5
    python tools/bench_compile.py --counts-only            # graph counts only (aot_eager)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import timm
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import retrofit
from retrofit.layers.stochastic_depth import compiled_form


def build(arch: str, rate: float, recipe: dict | None, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, drop_path_rate=rate)
    if recipe:
        retrofit.apply(model, recipe, example_input=x[:1])
    return model.train()


def step_fn(model: torch.nn.Module, backend: str):
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        compiled(x).square().mean().backward()
        opt.step()

    return step


def graphs(model: torch.nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(model, backend=counter)(x).sum().backward()
    return counter.frame_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--model", default="resnet18", help="a timm ResNet (drop_path_rate)")
    ap.add_argument("--counts-only", action="store_true", help="graph counts, no timing")
    args = ap.parse_args()
    x = torch.randn(args.batch, 3, args.size, args.size)
    batch = {"stochastic_depth": {"drop_path_rate": args.rate, "mode": "batch", "seed": 0}}
    arch = args.model
    models = {
        "timm_drop_path": build(arch, args.rate, None, x),
        "retrofit_row": build(arch, 0.0, {"stochastic_depth": {"drop_path_rate": args.rate}}, x),
        "unmodified": build(arch, 0.0, None, x),
        "retrofit_batch_mask": compiled_form(build(arch, 0.0, batch, x), "mask"),
    }
    counts = {
        "row_graphs": graphs(models["retrofit_row"], x),
        "batch_mask_graphs": graphs(models["retrofit_batch_mask"], x),
        "batch_skip_graphs": graphs(build(arch, 0.0, batch, x), x),
    }
    print(json.dumps({"model": arch, **counts}), file=sys.stderr, flush=True)
    if args.counts_only:
        return
    torch._dynamo.reset()
    steps = {name: step_fn(m, args.backend) for name, m in models.items()}
    for step in steps.values():  # compile and warm up
        for _ in range(2):
            step(x)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x)
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        json.dumps(
            {
                "config": vars(args) | {"threads": torch.get_num_threads()},
                "step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
                "row_over_timm": round(med["retrofit_row"] / med["timm_drop_path"], 3),
                "batch_mask_over_unmodified": round(
                    med["retrofit_batch_mask"] / med["unmodified"], 3
                ),
                **counts,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
