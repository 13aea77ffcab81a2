"""Do the regularizers regularize? A results table on the embedded digits data, CPU, several seeds.

Two experiments, every run through ``retrofit.train.fit`` (data=None: scikit-learn's 1797 8×8
digits, upsampled; its stratified 80/20 split; the "test" accuracy is that held-out 20%):

* **regularizers** — torchvision ResNet-18 (random init, 10 classes) at ``--img-size`` (32: the
  digits are 8×8, upsampling further adds no information): baseline (empty recipe) vs
  stochastic depth (``row``, ``batch``) vs DropBlock vs Cutout vs their combination.
* **dropout_bn** — the Dropout-before-BN ConvNet of ``tools/lint_experiment.py`` (Li et al. 2019's
  variance shift) trained as written ("buggy") vs its fixes: ``uout``, ``after_last_bn`` (recipes
  applied before training), ``recalibrated`` (the buggy model after ``retrofit.recalibrate_bn``
  on the training images) and ``no_dropout`` (p = 0, for reference).

Reported per variant: mean ± std over seeds of test accuracy, train accuracy − test accuracy (the
gap, both measured in eval mode after training), seconds per epoch; and against the experiment's
reference (baseline / buggy) Welch's t-test on test accuracy (``scipy.stats.ttest_ind``,
``equal_var=False``): an effect is called significant only at p < 0.05.

Every run appends one JSON line to the results file (resumable: finished (experiment, variant,
seed) runs are skipped). Then ``docs/results_short.md`` and ``docs/results_*.png`` are written
(``docs/results.md`` is the longer study of ``tools/study.py``)::

    python tools/results.py                    # all runs (resumes), then the docs
    python tools/results.py --docs             # docs only, from the results file
    python tools/results.py --seeds 0 1 2 3 4 --epochs 8
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
DEFAULT_RESULTS = ROOT / "runs" / "results" / "results.jsonl"
DOCS = ROOT / "docs"

SD_ROW = {"stochastic_depth": {"p_L": 0.5, "mode": "row"}}
SD_BATCH = {"stochastic_depth": {"p_L": 0.5, "mode": "batch"}}
DROPBLOCK = {"dropblock": {"stages": [1, 2], "block_size": 3, "keep_prob": 0.9}}
CUTOUT = {"cutout": {"n_holes": 1, "length": 8}}

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "regularizers": {
        "reference": "baseline",
        "variants": {
            "baseline": {},
            "sd_row": SD_ROW,
            "sd_batch": SD_BATCH,
            "dropblock": DROPBLOCK,
            "cutout": CUTOUT,
            "combined": {**SD_ROW, **DROPBLOCK, **CUTOUT},
        },
    },
    "dropout_bn": {
        "reference": "buggy",
        "variants": {
            "buggy": None,
            "recalibrated": None,  # measured on the buggy run's model
            "uout": {"uout": {"beta": 0.1}},
            "after_last_bn": {"dropout_fix": "after_last_bn"},
            "no_dropout": None,
        },
    },
}


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), 256):
            correct += int((model(images[i : i + 256]).argmax(1) == labels[i : i + 256]).sum())
    return correct / len(labels)


def _config(args: argparse.Namespace, experiment: str, seed: int):
    from retrofit.finetune_config import TrainConfig

    if experiment == "regularizers":
        return TrainConfig(
            epochs=args.epochs, batch_size=64, lr=2e-3, seed=seed, img_size=args.img_size
        )
    return TrainConfig(
        epochs=args.bn_epochs, batch_size=64, lr=2e-3, seed=seed, img_size=8, weight_decay=0.0
    )


def _model(experiment: str, variant: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if experiment == "regularizers":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    from lint_experiment import ConvNet

    model = ConvNet(0.0 if variant == "no_dropout" else 0.5, 32, 3)
    # a user model: the trainer takes input size, mean and std from timm's data config, which
    # reads this (without it the digits would come as 3-channel ImageNet-normalised images)
    model.pretrained_cfg = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)}
    return model


def run_one(args: argparse.Namespace, experiment: str, variant: str, seed: int) -> list[dict]:
    """One training run; the buggy run also yields the recalibrated record."""
    from retrofit.fixes import recalibrate_bn
    from retrofit.train import fit
    from retrofit.train.data import build_data

    cfg = _config(args, experiment, seed)
    model = _model(experiment, variant, seed)
    bundle = build_data(None, model, cfg)
    recipe = EXPERIMENTS[experiment]["variants"][variant]
    t0 = time.perf_counter()
    result = fit(model, recipe, data=bundle, config=cfg, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    if not result.completed:  # fit stops early on SIGINT/SIGTERM: such a run is not a result
        raise RuntimeError(f"{experiment}/{variant}/{seed} stopped early: {result.stop_reason}")
    epochs = [h for h in result.history if h.get("kind") == "epoch"]
    tr, va = bundle.train, bundle.val

    def record(name: str, m: nn.Module, extra: dict | None = None) -> dict:
        train_acc, test_acc = _accuracy(m, tr.images, tr.labels), _accuracy(m, va.images, va.labels)
        return {
            "experiment": experiment,
            "variant": name,
            "seed": seed,
            "test_acc": test_acc,
            "train_acc": train_acc,
            "gap": train_acc - test_acc,
            "epoch_time": statistics.fmean(h["epoch_time"] for h in epochs),
            "epochs": len(epochs),
            "seconds": round(seconds, 2),
            "edits": len((result.plan or {}).get("edits", [])),
            "img_size": int(va.images.shape[-1]),
            "load_avg": round(os.getloadavg()[0], 2),
            **(extra or {}),
        }

    out = [record(variant, result.model)]
    if variant == "buggy":
        fixed = copy.deepcopy(result.model)
        t1 = time.perf_counter()
        batches = [tr.images[i : i + 64] for i in range(0, len(tr.labels) - 63, 64)]
        recalibrate_bn(fixed, batches)
        rec = record("recalibrated", fixed, {"recalibrate_s": round(time.perf_counter() - t1, 2)})
        out.append(rec)
    return out


def _key(r: dict) -> tuple[str, str, int]:
    return (r["experiment"], r["variant"], r["seed"])


def read(path: Path) -> list[dict]:
    out: dict[tuple, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[_key(r)] = r
    return list(out.values())


# --- statistics and docs ----------------------------------------------------------------------


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p (nan when undefined: < 2 runs), as compare reports it."""
    from retrofit.compare.stats import welch as welch_test

    w = welch_test(a, b)
    return w.t, w.p


def summarise(recs: list[dict]) -> dict[str, list[dict]]:
    tables: dict[str, list[dict]] = {}
    for exp, spec in EXPERIMENTS.items():
        ref = [
            r["test_acc"]
            for r in recs
            if r["experiment"] == exp and r["variant"] == spec["reference"]
        ]
        rows = []
        for variant in spec["variants"]:
            rs = sorted(
                (r for r in recs if r["experiment"] == exp and r["variant"] == variant),
                key=lambda r: r["seed"],
            )
            if not rs:
                continue
            acc = [r["test_acc"] for r in rs]
            row = {
                "variant": variant,
                "n": len(rs),
                "seeds": [r["seed"] for r in rs],
                "test": _ms(acc),
                "train": _ms([r["train_acc"] for r in rs]),
                "gap": _ms([r["gap"] for r in rs]),
                "epoch_time": _ms([r["epoch_time"] for r in rs]),
                "edits": rs[0]["edits"],
                "acc": acc,
            }
            if variant != spec["reference"]:
                t, p = welch(acc, ref)
                row["t"], row["p"] = t, p
                row["delta"] = statistics.fmean(acc) - statistics.fmean(ref) if ref else math.nan
                lo, hi = row["test"][0] - 2 * row["test"][1], row["test"][0] + 2 * row["test"][1]
                rm, rsd = _ms(ref) if ref else (math.nan, 0.0)
                row["overlap_2sd"] = not (hi < rm - 2 * rsd or lo > rm + 2 * rsd)
            rows.append(row)
        tables[exp] = rows
    return tables


def _pm(ms: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


def _verdict(row: dict) -> str:
    if "p" not in row:
        return "reference"
    p = row["p"]
    if math.isnan(p):
        return "n/a (too few runs)"
    sign = "better" if row["delta"] > 0 else "worse"
    if p < 0.05:
        return f"**{sign}**, significant (p = {p:.3f})"
    return f"not significant (p = {p:.2f})"


def plot(tables: dict[str, list[dict]], docs: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for exp, rows in tables.items():
        if not rows:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        labels = [r["variant"] for r in rows]
        xs = range(len(rows))
        for ax, key, title, scale in (
            (axes[0], "test", "test accuracy (%)", 100),
            (axes[1], "gap", "train − test accuracy (points)", 100),
            (axes[2], "epoch_time", "seconds per epoch", 1),
        ):
            means = [r[key][0] * scale for r in rows]
            stds = [r[key][1] * scale for r in rows]
            ax.bar(xs, means, yerr=stds, capsize=4, color="#4c72b0")
            if key == "test":
                for i, r in enumerate(rows):
                    ax.scatter([i] * len(r["acc"]), [a * 100 for a in r["acc"]], color="k", s=8)
                lo = min(min(r["acc"]) for r in rows) * 100
                ax.set_ylim(max(0, lo - 5), 100)
            ax.set_xticks(list(xs), labels, rotation=30, ha="right")
            ax.set_title(title)
        n = max(r["n"] for r in rows)
        fig.suptitle(f"{exp}: mean ± std over {n} seeds (dots: single runs)")
        fig.tight_layout()
        name = f"results_{exp}.png"
        fig.savefig(docs / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _load(recs: list[dict]) -> str:
    loads = [r["load_avg"] for r in recs if "load_avg" in r]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded"


def write_docs(path: Path, args: argparse.Namespace, docs: Path = DOCS) -> None:
    want = {"regularizers": args.epochs, "dropout_bn": args.bn_epochs}
    recs = [r for r in read(path) if r["epochs"] == want[r["experiment"]]]
    dropped = len(read(path)) - len(recs)
    if dropped:
        print(f"ignored {dropped} runs with another number of epochs", file=sys.stderr)
    tables = summarise(recs)
    docs.mkdir(parents=True, exist_ok=True)
    images = plot(tables, docs)
    cfg = {r["experiment"]: r for r in recs}
    lines = [
        "# Results: do the regularizers regularize (at this scale)?",
        "",
        "Generated by `python tools/results.py` from "
        f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`; do not edit by hand.",
        "",
        "Data: the embedded digits (scikit-learn, 1797 real 8×8 images; 1437 train / 360 test, "
        "stratified), CPU, one thread, random initialisation, `retrofit.train.fit` defaults "
        "(AdamW, cosine schedule, label smoothing 0.1) unless stated. Accuracies are measured "
        "in eval mode after the last epoch; the gap is train − test accuracy in points. "
        "Significance: Welch's t-test of each variant's test accuracies against the "
        "reference's, two-sided, called significant only at p < 0.05; also whether the ±2 std "
        "intervals overlap.",
        "",
        "Seconds per epoch are wall-clock on a shared 2-core machine while other jobs ran "
        f"(1-minute load average during the runs: {_load(recs)}): they compare variants only "
        "roughly; `tools/bench_*.py` measure speed properly.",
        "",
    ]
    for exp, rows in tables.items():
        spec = EXPERIMENTS[exp]
        if not rows:
            lines += [f"## {exp}", "", "Not run.", ""]
            continue
        r0 = cfg[exp]
        if exp == "regularizers":
            lines += [
                "## Regularizers on ResNet-18",
                "",
                f"torchvision `resnet18(num_classes=10)`, {r0['img_size']}×{r0['img_size']} "
                f"input, {r0['epochs']} epochs, batch 64, lr 2e-3. Recipes: `sd_row` = "
                f"`{SD_ROW}`, `sd_batch` = `{SD_BATCH}`, `dropblock` = `{DROPBLOCK}` (stages 1–2: "
                "at this input size stages 3–4 are 2×2 and 1×1 maps), `cutout` = "
                f"`{CUTOUT}`, `combined` = sd_row + dropblock + cutout.",
                "",
                "Read this as a short fine-tune from random weights, far from convergence: a "
                "regularizer that slows fitting shows up as lower train *and* test accuracy "
                "(under-fitting), not as a smaller gap. Huang et al. and Ghiasi et al. report "
                "their gains at convergence (hundreds of epochs); this table cannot confirm or "
                "refute those.",
                "",
            ]
        else:
            lines += [
                "## Dropout before BatchNorm (variance shift) and its fixes",
                "",
                "`tools/lint_experiment.py`'s ConvNet ([Conv → BN → ReLU → Dropout(0.5)] × 3, "
                f"width 32) on the 8×8 images, {r0['epochs']} epochs, batch 64, lr 2e-3, no "
                "weight decay. `recalibrated` is each buggy run's model after "
                "`retrofit.recalibrate_bn` on the training images (no retraining).",
                "",
            ]
        lines += [
            "| variant | seeds | edits | test acc % | train acc % | gap (points) | s / epoch | "
            f"vs {spec['reference']} (Welch) | ±2 std overlap |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in rows:
            overlap = "" if "overlap_2sd" not in r else ("yes" if r["overlap_2sd"] else "no")
            delta = f"{r['delta'] * 100:+.1f} pts, " if "delta" in r else ""
            lines.append(
                f"| {r['variant']} | {r['n']} | {r['edits']} | {_pm(r['test'])} | "
                f"{_pm(r['train'])} | {_pm(r['gap'])} | {_pm(r['epoch_time'], 1, 2)} | "
                f"{delta}{_verdict(r)} | {overlap} |"
            )
        sig = [r["variant"] for r in rows if r.get("p", 1) < 0.05]
        nonsig = [r["variant"] for r in rows if "p" in r and not r.get("p", 1) < 0.05]
        lines += [
            "",
            f"**In plain words:** significant at p < 0.05 against {spec['reference']}: "
            + (", ".join(f"`{v}`" for v in sig) if sig else "none")
            + ". Not significant at this scale: "
            + (", ".join(f"`{v}`" for v in nonsig) if nonsig else "none")
            + f". With {rows[0]['n']} seeds per variant the test only resolves large effects; a "
            "'not significant' here means this experiment cannot tell, not that the "
            "technique does nothing.",
            "",
        ]
        img = f"results_{exp}.png"
        if img in images:
            lines += [f"![{exp}]({img})", ""]
    (docs / "results_short.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {docs / 'results_short.md'} and {', '.join(images)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3, help="ResNet-18 epochs")
    ap.add_argument("--bn-epochs", type=int, default=15, help="dropout-BN ConvNet epochs")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--experiment", choices=list(EXPERIMENTS), nargs="+", default=list(EXPERIMENTS))
    ap.add_argument("--variant", nargs="+", default=None, help="only these variants")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument(
        "--docs", action="store_true", help="only regenerate docs/results_short.md and its plots"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("retrofit").setLevel(logging.WARNING)
    if not args.docs:
        from tqdm import tqdm

        args.results.parent.mkdir(parents=True, exist_ok=True)
        want = {"regularizers": args.epochs, "dropout_bn": args.bn_epochs}
        done = {_key(r) for r in read(args.results) if r["epochs"] == want[r["experiment"]]}
        todo = [
            (exp, v, s)
            for s in args.seeds
            for exp in args.experiment
            for v in EXPERIMENTS[exp]["variants"]
            if v != "recalibrated"
            and (args.variant is None or v in args.variant)
            and (exp, v, s) not in done
        ]
        for exp, v, s in tqdm(todo, desc="runs", unit="run"):
            recs = run_one(args, exp, v, s)
            with args.results.open("a") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
    write_docs(args.results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
