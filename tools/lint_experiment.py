"""Dropout before BatchNorm on sklearn digits: the bug, and the three fixes (Li et al., CVPR 2019).

Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019. A network whose Dropout feeds a BatchNorm is trained as is ("buggy")
and with each of retrofit's fixes; all variants start from the same initial weights per seed:

* ``buggy``          — trained as written; lint flags every dropout that reaches a BN.
* ``recalibrated``   — the buggy model after ``retrofit.recalibrate_bn`` on the training images
                       (no retraining: BN statistics re-estimated with dropout off).
* ``uout``           — recipe ``uout: {beta: 0.1}`` applied before training.
* ``after_last_bn``  — recipe ``dropout_fix: after_last_bn`` applied before training.
* ``no_dropout``     — the same network with p = 0, for reference.

It prints test accuracy (mean ± std over seeds) and the variance shift of the victim BNs
(``retrofit.measure_variance_shift`` with the model's own statistics, averaged over BNs).
CPU only, one thread (these models are too small for more to help), about a minute::

    python tools/lint_experiment.py                # table
    python tools/lint_experiment.py --json         # machine-readable
    python tools/lint_experiment.py --arch cnn --width 16 --depth 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import retrofit
from retrofit.lint import lint, measure_variance_shift, recalibrate_bn

VARIANTS = ("buggy", "recalibrated", "uout", "after_last_bn", "no_dropout")


def mlp(p: float, width: int, depth: int) -> nn.Module:
    """[Linear → BN → ReLU → Dropout] × depth → Linear: each dropout but the last feeds a BN."""
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(p)]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(width, 10))


class ConvNet(nn.Module):
    """[Conv → BN → ReLU → Dropout] × depth on the 8×8 image, global pool → Linear."""

    def __init__(self, p: float, width: int, depth: int):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 1
        for _ in range(depth):
            blocks += [
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Dropout(p),
            ]
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.view(-1, 1, 8, 8))
        return self.fc(x.mean((2, 3)))


def build(arch: str, p: float, width: int, depth: int) -> nn.Module:
    return mlp(p, width, depth) if arch == "mlp" else ConvNet(p, width, depth)


def digits(test_fraction: float) -> tuple[torch.Tensor, ...]:
    """Standardised 8×8 digits as 64-vectors, stratified split with a fixed seed (0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=test_fraction, stratify=data.target, random_state=0
    )
    x_tr, x_te = (torch.tensor(a, dtype=torch.float32) for a in (x_tr, x_te))
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)
    return (x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, seed: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout / Uout masks
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - args.batch_size + 1, args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    x = x[: len(x) // size * size]  # equal batches: the cumulative average weighs batches
    return [x[i : i + size] for i in range(0, len(x), size)]


def shift(model: nn.Module, norms: list[str], probe: list[torch.Tensor]) -> float:
    """Mean over the victim BNs of the variance-shift ratio, with the model's own statistics."""
    ratios = measure_variance_shift(model, probe, norms=norms, fill=False, num_batches=len(probe))
    return statistics.fmean(ratios.values()) if ratios else float("nan")


def run_seed(seed: int, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    init = build(args.arch, args.p, args.width, args.depth)
    findings = lint(init)
    norms = list(dict.fromkeys(f.norm for f in findings))
    probe = batches(x_tr, args.batch_size)
    out: dict[str, Any] = {"seed": seed, "findings": len(findings), "victims": norms}

    def scores(model: nn.Module) -> dict[str, float]:
        return {
            "acc": accuracy(model, x_te, y_te),
            "train_acc": accuracy(model, x_tr, y_tr),
            "shift": shift(model, norms, probe),
        }

    buggy = train(copy.deepcopy(init), x_tr, y_tr, args, seed)
    out["buggy"] = scores(buggy)
    out["recalibrated"] = scores(recalibrate_bn(copy.deepcopy(buggy), probe))

    example = x_tr[:8]
    for name, recipe in (
        ("uout", {"uout": {"beta": args.beta}}),
        ("after_last_bn", {"dropout_fix": "after_last_bn"}),
    ):
        model = retrofit.apply(copy.deepcopy(init), recipe, example_input=example)
        assert lint(model) == [], f"{name}: lint still reports findings"
        out[name] = scores(train(model, x_tr, y_tr, args, seed))

    plain = copy.deepcopy(init)
    for m in plain.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    out["no_dropout"] = scores(train(plain, x_tr, y_tr, args, seed))
    return out


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    table = {}
    for v in VARIANTS:
        accs = [r[v]["acc"] for r in runs]
        table[v] = {
            "acc_mean": statistics.fmean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_min": min(accs),
            "train_acc_mean": statistics.fmean(r[v]["train_acc"] for r in runs),
            "shift_mean": statistics.fmean(r[v]["shift"] for r in runs),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--p", type=float, default=0.5, help="dropout probability (default 0.5)")
    ap.add_argument("--beta", type=float, default=0.1, help="Uout beta (default 0.1)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = digits(args.test_fraction)
    runs = [run_seed(s, data, args) for s in args.seeds]
    table = summarise(runs)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    if args.json:
        print(json.dumps({"config": config, "summary": table, "runs": runs}, indent=2))
        return 0
    first = runs[0]
    print(
        f"digits ({len(data[0])} train / {len(data[2])} test), {args.arch} width {args.width} "
        f"depth {args.depth}, Dropout p={args.p}, {args.epochs} epochs, seeds {args.seeds}"
    )
    print(f"lint: {first['findings']} finding(s), victim BNs: {', '.join(first['victims'])}")
    print()
    print(
        f"{'variant':<15}{'test acc (mean ± std)':>24}{'min':>9}{'train acc':>11}"
        f"{'variance shift':>16}"
    )
    for v in VARIANTS:
        row = table[v]
        acc = f"{100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f} %"
        print(
            f"{v:<15}{acc:>24}{100 * row['acc_min']:>8.2f}%{100 * row['train_acc_mean']:>10.2f}%"
            f"{row['shift_mean']:>15.3f}x"
        )
    print()
    print("per seed (test acc %):")
    for r in runs:
        print(f"  seed {r['seed']}: " + "  ".join(f"{v} {100 * r[v]['acc']:.2f}" for v in VARIANTS))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
