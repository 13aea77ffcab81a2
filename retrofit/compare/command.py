"""The ``retrofit-cli compare`` command: arguments, checks, the runs with a progress bar, the table.

Exit codes: 0 every run finished (the table is complete); 2 bad input (a recipe, the model name,
kwargs, data, weights, seeds, baseline, output directory), one line on stderr naming it, before
any run starts; 3 retrofit refused the model for a variant (with the variant and the reason);
130 interrupted (Ctrl-C / SIGTERM): the finished runs are kept, the table so far is written, and
the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrofit.compare.variants import CompareError, RunSpec, Settings, Variant, load_variants
from retrofit.errors import ModelError, RecipeError, TraceError, VerifyError
from retrofit.techniques import TECHNIQUES

PROG = "retrofit-cli compare"
EXIT_OK, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 2, 3, 130
SETTINGS_NAME = "settings.json"
TABLE_MD, TABLE_JSON, PLOT = "table.md", "table.json", "plot.png"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a model with each recipe and several seeds, then compare: one table "
        "(test accuracy mean ± 95% CI, generalization gap, Welch's t-test against a baseline, "
        "seconds per epoch) as Markdown and JSON, and one plot. Resumable: run the same "
        "command again to continue; finished runs are not redone.",
        epilog="A recipe file may add 'model_kwargs: {drop_rate: 0.5}' (builder arguments for "
        "that variant only, e.g. the model's own dropout as a baseline). Writes DIR/table.md, "
        "DIR/table.json, DIR/plot.png and DIR/runs/<variant>/seed<k>/. Exit codes: 0 ok, "
        "2 bad input, 3 model refused, 130 interrupted (rerun to resume).",
    )
    p.add_argument("--model", metavar="NAME", required=True,
                   help="tv:NAME, timm:NAME, package.module:factory, or a bare NAME")  # fmt: skip
    p.add_argument("--model-kwargs", metavar="K=V", nargs="+", action="extend", default=[],
                   help="builder arguments for every variant, e.g. num_classes=10 in_chans=1")  # fmt: skip
    p.add_argument("--recipes", metavar="FILE", nargs="+", required=True,
                   help="recipe YAML files, one variant each, named by the file's stem")  # fmt: skip
    p.add_argument("--seeds", metavar="N", type=int, default=5,
                   help="runs per recipe, with train.seed 0..N-1 (default 5)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", required=True,
                   help="a new or empty directory, or one this command wrote (to resume)")  # fmt: skip
    p.add_argument("--baseline", metavar="NAME",
                   help="the variant the others are tested against (default: the first recipe)")  # fmt: skip
    p.add_argument("--data", metavar="PATH",
                   help="ImageFolder tree, CIFAR directory, 'digits[:classes=A-B][:per_class=N]' "
                   "or 'synthetic[:N]'; default: the embedded digits")  # fmt: skip
    p.add_argument("--weights", metavar="FILE", help="start every run from a local checkpoint")
    p.add_argument("--pretrained", action="store_true", help="start from the zoo's weights")
    p.add_argument("--train-kwargs", metavar="K=V", nargs="+", action="extend", default=[],
                   help="override train.K in every recipe, e.g. epochs=40 lr=2e-3 img_size=16")  # fmt: skip
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (results on CPU are reproducible at a fixed N)")  # fmt: skip
    p.add_argument("--title", help="title of the table and the plot (default: model on data)")
    p.add_argument("--json", action="store_true", help="print the table as JSON, not Markdown")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and plot from the runs finished so far")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar or run lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``retrofit-cli compare``; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad flags, 0 on --help
        return int(e.code or 0)
    try:
        return _compare(args, argv)
    except (CompareError, RecipeError, ModelError, FileNotFoundError) as e:
        return _fail(e, EXIT_BAD_INPUT)
    except (TraceError, VerifyError) as e:
        return _fail(e, EXIT_REFUSED)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if type(e).__name__ == "DataError":  # retrofit.train.data.DataError (not imported here)
            return _fail(e, EXIT_BAD_INPUT)
        raise


def _fail(e: BaseException, code: int) -> int:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        text = f"no such file: {e.filename}"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


# --- checks before any run --------------------------------------------------------------------


def _kwargs(items: list[str], flag: str) -> dict[str, Any]:
    from retrofit.models import parse_kwargs

    try:
        return parse_kwargs(items)
    except ModelError as e:
        raise CompareError(str(e).replace("--model-kwargs", flag)) from None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {str(out)!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / SETTINGS_NAME).is_file():
        raise CompareError(
            f"--out {str(out)!r} is not empty and holds no comparison ({SETTINGS_NAME}); "
            "give a new or empty directory, or one this command wrote"
        )


def _preflight(variants: list[Variant], settings: Settings, seeds: int) -> None:
    """Everything that can be checked before hours of training: model names and kwargs, that
    each recipe plans on the model (a stage index out of range, an untraceable model), the data."""
    from retrofit.capture.detection import is_detector
    from retrofit.models import create_model
    from retrofit.recipe import Recipe
    from retrofit.train.prepare import has_model_edits, train_config_of
    from retrofit.train.tasks import get_task, resolve_task

    _warn_unequal_training(variants)
    planned: set[str] = set()
    data_checked = False
    for v in variants:
        kwargs = {**settings.model_kwargs, **v.model_kwargs}
        try:
            model, _ = create_model(settings.model, kwargs=kwargs, meta=True)
            if is_detector(model):  # read on a real forward (NMS has no meta kernel)
                model, _ = create_model(settings.model, kwargs=kwargs)
        except ModelError as e:
            raise CompareError(f"{v.path}: {e}" if v.model_kwargs else str(e)) from None
        recipe = Recipe.from_dict(v.recipe_for(0))
        key = json.dumps(
            [kwargs, {k: x for k, x in v.recipe.items() if k != "train"}],
            sort_keys=True,
            default=str,
        )
        if has_model_edits(recipe) and key not in planned:
            import retrofit

            try:
                retrofit.plan(model, recipe)
            except (TraceError, VerifyError) as e:
                raise type(e)(f"variant {v.name!r} ({v.path}): {e}") from None
            except RecipeError as e:
                raise CompareError(f"{v.path}: {e}") from None
            planned.add(key)
        if not data_checked:
            # The task's data: the digits, or COCO / VOC for detectors and segmenters.
            task = get_task(resolve_task(None, model)[0])
            task.build_data(settings.data, model, train_config_of(recipe))
            data_checked = True
        for name in TECHNIQUES:  # any technique whose section fixes its own seed
            section = v.recipe.get(name)
            seed = section.get("seed") if isinstance(section, dict) else None
            if seeds > 1 and seed is not None:
                print(
                    f"{PROG}: warning: {v.path} fixes {name}.seed={seed}: every seed of the "
                    "comparison draws the same gates (remove it to let train.seed decide)",
                    file=sys.stderr,
                )


def _warn_unequal_training(variants: list[Variant]) -> None:
    """Say when the variants train differently: every difference is then part of what is compared
    (a recipe with ``train: {epochs: 3}`` against one without a ``train:`` section, 10 epochs)."""
    from retrofit.finetune_config import TrainConfig

    configs = {v.name: TrainConfig.from_dict(v.recipe.get("train")).to_dict() for v in variants}
    first = next(iter(configs.values()))
    differ = sorted({k for c in configs.values() for k in c if c[k] != first[k] and k != "seed"})
    if differ:
        detail = "; ".join(
            f"{k}: " + ", ".join(f"{n}={c[k]}" for n, c in configs.items()) for k in differ
        )
        print(
            f"{PROG}: warning: the recipes train differently ({detail}); the table compares "
            "those settings too. --train-kwargs K=V sets one value for all",
            file=sys.stderr,
        )


# --- the command ------------------------------------------------------------------------------


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    out, variants, baseline, settings = _checked(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _preflight(variants, settings, args.seeds)

    from retrofit.compare import runs

    device_type = runs.device_type(args.device)
    meta = _metadata(args, argv, variants, settings, baseline, device_type)
    if args.report_only:
        # The table describes the command that trained the runs, not this one.
        prior = json.loads((out / SETTINGS_NAME).read_text())
        meta["command"] = prior.get("command", meta["command"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_json(out / SETTINGS_NAME, meta)

    digest = runs.weights_digest(args.weights)
    specs = [RunSpec(v, s, settings, out) for s in range(args.seeds) for v in variants]
    records, interrupted = _run_all(args, specs, device_type, digest)

    names = [v.name for v in variants]
    _, text = _write_report(out, meta, records, names, baseline)
    if args.json:
        print(json.dumps(json.loads((out / TABLE_JSON).read_text()), indent=2))
    else:
        print(text, end="")
    if interrupted:
        print(f"{PROG}: {interrupted}; {len(records)}/{len(specs)} runs finished, the table "
              "covers those; run the same command again to resume", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    if len(records) < len(specs):
        print(f"{PROG}: {len(records)}/{len(specs)} runs finished, the table covers those; "
              f"wrote {out / TABLE_MD}, {out / TABLE_JSON}, {out / PLOT}", file=sys.stderr)  # fmt: skip
        return EXIT_OK
    print(f"{PROG}: {len(specs)} runs; wrote {out / TABLE_MD}, {out / TABLE_JSON}, {out / PLOT}",
          file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _checked(args: argparse.Namespace) -> tuple[Path, list[Variant], str, Settings]:
    """The arguments checked against each other (no torch yet): the output directory, the
    variants, the baseline's name and the settings shared by every run."""
    if args.seeds < 1:
        raise CompareError(f"--seeds {args.seeds}: give a number of seeds >= 1")
    if args.threads is not None and args.threads < 1:
        raise CompareError(f"--threads {args.threads}: give a number >= 1")
    if args.weights and args.pretrained:
        raise CompareError("give --pretrained or --weights FILE, not both")
    if args.weights and not Path(args.weights).is_file():
        raise CompareError(f"--weights {args.weights!r}: no such file")
    out = Path(args.out)
    _check_out(out)
    if args.report_only and not (out / SETTINGS_NAME).is_file():
        raise CompareError(f"--report-only: --out {str(out)!r} holds no comparison to report")
    train_overrides = _kwargs(args.train_kwargs, "--train-kwargs")
    if "seed" in train_overrides:
        raise CompareError("--train-kwargs: seed is set by --seeds (train.seed = 0..N-1)")
    variants = load_variants(args.recipes, train_overrides)
    names = [v.name for v in variants]
    baseline = args.baseline or names[0]
    if baseline not in names:
        raise CompareError(f"--baseline {baseline!r} is not one of the recipes: {', '.join(names)}")
    settings = Settings(
        model=args.model,
        model_kwargs=_kwargs(args.model_kwargs, "--model-kwargs"),
        data=args.data,
        weights=args.weights,
        pretrained=args.pretrained,
        device=args.device,
    )
    return out, variants, baseline, settings


def _metadata(
    args: argparse.Namespace,
    argv: list[str],
    variants: list[Variant],
    settings: Settings,
    baseline: str,
    device_type: str,
) -> dict[str, Any]:
    """What ``settings.json`` records: enough to rerun the comparison and to head its table."""
    import torch

    return {
        "title": args.title or f"{args.model} on {args.data or 'digits'}",
        "command": " ".join(["retrofit-cli", "compare", *map(shlex.quote, argv)]),
        "settings": settings.to_dict(),
        "baseline": baseline,
        "seeds": list(range(args.seeds)),
        "variants": [
            {
                "name": v.name,
                "path": str(v.path),
                "recipe": v.recipe,
                "model_kwargs": v.model_kwargs,
            }
            for v in variants
        ],
        "device": device_type,
        "threads": torch.get_num_threads(),
    }


def _run_all(
    args: argparse.Namespace, specs: list[RunSpec], device_type: str, digest: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Train the runs not finished yet (none with ``--report-only``); returns every finished
    run's record and, when interrupted, why."""
    from retrofit.compare import runs

    records: list[dict[str, Any]] = []
    todo = []
    for sp in specs:
        fp = sp.fingerprint(device_type, digest)
        rec = runs.finished(sp, fp)
        if rec is not None:
            records.append(rec)
        elif not args.report_only:
            todo.append((sp, fp))
    interrupted: str | None = None
    bar = _Progress(len(specs), len(records), enabled=not args.no_progress)
    try:
        for sp, fp in todo:
            bar.start(sp)
            try:
                rec = runs.run(sp, fp)
            except (TraceError, VerifyError) as e:
                raise type(e)(f"variant {sp.variant.name!r} seed {sp.seed}: {e}") from None
            records.append(rec)
            bar.done(sp, rec)
    except (runs.Interrupted, KeyboardInterrupt) as e:
        interrupted = str(e) or "interrupted"
    finally:
        bar.close()
    return records, interrupted


def _write_report(
    out: Path, meta: dict[str, Any], records: list[dict[str, Any]], names: list[str], baseline: str
) -> tuple[list[dict[str, Any]], str]:
    from retrofit.compare import report
    from retrofit.train.checkpoint import atomic_write

    order = {(n, s): i for i, (s, n) in enumerate((s, n) for s in meta["seeds"] for n in names)}
    records = sorted(records, key=lambda r: order.get((r["variant"], r["seed"]), 0))
    rows = report.summarise(records, names, baseline)
    text = _table_header(meta, records) + report.markdown(rows, baseline)
    atomic_write(out / TABLE_MD, lambda f: f.write(text.encode()))
    payload = json.dumps(report.to_json(rows, records, meta), indent=2, default=str) + "\n"
    atomic_write(out / TABLE_JSON, lambda f: f.write(payload.encode()))
    report.plot(rows, out / PLOT, meta["title"])
    return rows, text


def _table_header(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    from retrofit.compare.runs import metric_name

    s = meta["settings"]
    r0 = records[0] if records else {}
    name = metric_name(records)  # accuracy, or the task's metric: mAP (COCO), mIoU
    kw = " ".join(f"{k}={v}" for k, v in s["model_kwargs"].items())
    data = r0.get("data", s["data"] or "digits")
    start = f"weights `{s['weights']}`" if s["weights"] else (
        "the zoo's pretrained weights" if s["pretrained"] else "random initialisation"
    )  # fmt: skip
    epochs = sorted({r["epochs"] for r in records})
    seeds = sorted({r["seed"] for r in records}) or meta["seeds"]
    # The threads the runs trained on (a --report-only invocation trains nothing: its own
    # thread count says nothing about the table).
    ran_on = sorted({int(r["threads"]) for r in records if r.get("threads")})
    threads = "/".join(map(str, ran_on)) if ran_on else str(meta["threads"])
    lines = [
        f"**{meta['title']}.** Model `{s['model']}`{f' ({kw})' if kw else ''} from {start}; data: "
        f"{data}; {', '.join(map(str, epochs)) or '?'} epochs; seeds {seeds[0]}–{seeds[-1]} "
        f"(train.seed, and the initialisation of what is not loaded); {meta['device']}, "
        f"{threads} thread(s). Test {name} is measured on the held-out split after the "
        f"last epoch in eval mode; train {name} on the training split, in eval mode, without "
        "augmentation; the gap is their difference.",
        "",
    ]
    return "\n".join(lines) + "\n"


class _Progress:
    """A tqdm bar across runs on a terminal; one line per finished run otherwise (logs)."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self.total, self.count, self.enabled = total, done, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=done, unit="run", desc="compare", dynamic_ncols=True
            )

    def start(self, spec: RunSpec) -> None:
        if self.bar is not None:
            self.bar.set_description(spec.label)

    def done(self, spec: RunSpec, rec: dict[str, Any]) -> None:
        self.count += 1
        line = (
            f"[{self.count}/{self.total}] {spec.label}: test {rec['test_acc'] * 100:.1f}%, "
            f"{rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU"
        )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"last: test {rec['test_acc'] * 100:.1f}%")
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
