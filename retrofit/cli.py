"""``retrofit-cli``: plan, apply, train and lint from the command line.

::

    retrofit-cli --model resnet50 --recipe recipes/sd.yaml            # print the plan (dry run)
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --json     # the plan as JSON
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --out DIR  # write retrofitted weights
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --train    # fine-tune (digits default)
    retrofit-cli --model resnet50 --stages                            # DropBlock's stage indices
    retrofit-cli lint --model densenet121 --model-kwargs drop_rate=0.2
    retrofit-cli compare --model resnet18 --recipes a.yaml b.yaml --seeds 5 --out DIR

Exit codes: 0 ok; 1 lint findings (``lint``, and ``--train --strict-lint``); 2 bad input (recipe,
model name, kwargs, weights, data, output directory), reported as one line on stderr with nothing
written; 3 retrofit refused the model (it cannot be traced, or the rewrite would change its
inference output), again with nothing written.

The heavy parts (tracing, planning, training) are imported inside the commands, so ``--help`` and
argument errors are instant and the CLI imports even while a piece of the package is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrofit.errors import ModelError, RecipeError, TraceError, VerifyError

__all__ = ["main"]

PROG = "retrofit-cli"
EXIT_OK, EXIT_FINDINGS, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3


class _BadInput(Exception):
    """A user error found by the CLI itself (flag combinations, output directory)."""


class _LintFailed(Exception):
    """``--strict-lint`` refused to train; carries the trainer's message."""


# --- parsers ----------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="NAME",
        help="tv:NAME, timm:NAME, package.module:factory, or a bare NAME "
        "(torchvision first when both zoos have it)",
    )
    p.add_argument(
        "--model-kwargs",
        metavar="K=V",
        nargs="+",
        action="extend",
        default=[],
        help="keyword arguments for the model builder, e.g. num_classes=10 drop_rate=0.2",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Add regularizers (stochastic depth, DropBlock, Uout, Cutout) to a "
        "torchvision/timm/user model by reading its torch.fx graph, and fine-tune it.",
        epilog=f"Lint for Dropout before BatchNorm: {PROG} lint --model NAME [--json]. "
        "Exit codes: 0 ok, 1 lint findings, 2 bad input, 3 model refused (untraceable, or the "
        "rewrite would change its output).",
    )
    _add_model_args(p)
    p.add_argument("--recipe", metavar="FILE", help="recipe YAML (see recipes/)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write the retrofitted weights (model.safetensors), the resolved recipe and the "
        "plan to DIR (a new or empty directory); with --train, the run directory",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the eval-mode equivalence check of the rewritten model",
    )
    p.add_argument("--stages", action="store_true", help="list the model's stages and exit")

    t = p.add_argument_group("training (with --train)")
    t.add_argument("--train", action="store_true", help="fine-tune the retrofitted model")
    t.add_argument(
        "--data",
        metavar="PATH",
        help="ImageFolder tree, local CIFAR directory, or 'synthetic[:N]'; "
        "default: the embedded digits data",
    )
    t.add_argument("--pretrained", action="store_true", help="start from the zoo's weights")
    t.add_argument("--weights", metavar="FILE", help="start from a local checkpoint")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--strict-lint", action="store_true", help="refuse to train on lint findings")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--batch-size", type=int, help="override train.batch_size")
    t.add_argument("--lr", type=float, help="override train.lr")
    t.add_argument("--seed", type=int, help="override train.seed")
    t.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _lint_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} lint",
        description="Find every Dropout whose output reaches a BatchNorm (Li et al. 2019, "
        "'variance shift'). Exit 1 with findings, 0 when clean, 2 on bad input.",
    )
    _add_model_args(p)
    p.add_argument(
        "--measure",
        action="store_true",
        help="run probe batches and report each flagged BatchNorm's variance-shift ratio",
    )
    p.add_argument("--data", metavar="PATH", help="probe batches for --measure (default: random)")
    return p


_TRAIN_ONLY = ("data", "resume", "strict_lint", "device", "max_steps", "no_progress")
# Flags that override the recipe's train: section (same names as TrainConfig's fields).
_TRAIN_OVERRIDES = ("epochs", "batch_size", "lr", "seed")


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:  # its own parser and exit codes: retrofit/compare/command.py
        from retrofit.compare import main as compare

        return compare(argv[1:])
    is_lint = bool(argv) and argv[0] == "lint"
    parser = _lint_parser() if is_lint else _main_parser()
    try:
        args = parser.parse_args(argv[1:] if is_lint else argv)
    except SystemExit as e:  # argparse exits 2 on bad flags and 0 on --help
        return int(e.code or 0)
    try:
        return _lint(args) if is_lint else _run(args)
    except (RecipeError, ModelError, FileNotFoundError, _BadInput) as e:
        return _fail(e, EXIT_BAD_INPUT)
    except _LintFailed as e:
        return _fail(e, EXIT_FINDINGS)
    except (TraceError, VerifyError) as e:
        return _fail(e, EXIT_REFUSED)
    except Exception as e:
        if _is_data_error(e):
            return _fail(e, EXIT_BAD_INPUT)
        raise


def _fail(e: BaseException, code: int) -> int:
    # One line, so scripts and CI logs show the whole reason.
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        text = f"no such file: {e.filename}"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def _is_data_error(e: BaseException) -> bool:
    try:
        from retrofit.train.data import DataError
    except ImportError:
        return False
    return isinstance(e, DataError)


def _api(name: str) -> Any:
    """``retrofit.<name>`` as a function, whether the package exports it or only the submodule."""
    import importlib
    import types

    import retrofit

    obj = getattr(retrofit, name, None)
    if obj is None or isinstance(obj, types.ModuleType):
        module = obj if obj is not None else importlib.import_module(f"retrofit.{name}")
        obj = getattr(module, name)
    return obj


# --- main command -----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from retrofit.models import create_model, load_weights, parse_kwargs

    if not args.model:
        raise _BadInput("--model NAME is required (e.g. --model resnet50 --recipe recipes/sd.yaml)")
    if not args.recipe and not args.stages:
        raise _BadInput(
            "nothing to do: give --recipe FILE to plan (add --out DIR to write weights, --train "
            f"to fine-tune), --stages to list stages, or run '{PROG} lint --model NAME'"
        )
    if not args.train:
        used = [
            f"--{k.replace('_', '-')}" for k in (*_TRAIN_ONLY, *_TRAIN_OVERRIDES) if _given(args, k)
        ]
        if used:
            raise _BadInput(f"{', '.join(used)} only apply with --train")
        if (args.pretrained or args.weights) and not args.out:
            raise _BadInput("--pretrained/--weights only apply with --out DIR or --train")
    if args.resume and not args.out:
        raise _BadInput("--resume needs --out DIR (the run to continue)")
    if args.weights and args.pretrained:
        raise _BadInput("give --pretrained or --weights FILE, not both")
    if args.stages and (args.train or args.out):
        raise _BadInput("--stages only lists the stages; run it without --train/--out")
    if args.weights and not Path(args.weights).is_file():
        raise _BadInput(f"--weights {args.weights!r}: no such file")

    kwargs = parse_kwargs(args.model_kwargs)
    recipe = _load_recipe(args) if args.recipe else None
    out = Path(args.out) if args.out else None
    if out is not None and not args.resume:
        _check_out_dir(out)

    if args.stages:
        model, info = create_model(args.model, kwargs=kwargs, meta=True)
        return _print_stages(args, model, info)

    # Only planning needs no weights: build on the meta device (no memory, no init time).
    real = bool(args.train or out)
    if args.train:  # torch seeds itself at random per process: random initial weights need a seed
        _seed_weights(recipe)
    model, info = create_model(args.model, pretrained=args.pretrained, kwargs=kwargs, meta=not real)
    if args.weights:
        load_weights(model, args.weights)

    if args.train:
        return _train(args, model, info, recipe, out)

    if out is None:
        plan = _api("plan")(model, recipe)
    else:
        model = _api("apply")(model, recipe, verify=not args.no_verify)
        # The plan apply executed (no second trace); None when it had nothing to change.
        plan = _api("applied_plan")(model) or _api("plan")(model, recipe)
        _write_out(out, model, recipe, _plan_dict(plan, info), info)
    if args.json:
        payload = _plan_dict(plan, info)
        if out is not None:
            payload["out"] = str(out)
        print(json.dumps(payload, indent=2))
    else:
        print(_model_line(info))
        print(plan.table())
        if recipe.cutout is not None and not any(e.kind == "cutout" for e in plan.edits):
            # Cutout acts on the input images, not the model: the trainer applies it per batch.
            print("cutout: applied to the input batches by the trainer (--train); no model edit")
        if out is not None:
            print(f"wrote {out}/ (model.safetensors, recipe.yaml, plan.json)")
    return EXIT_OK


def _seed_weights(recipe: Any) -> None:
    import torch

    from retrofit.train.prepare import train_config_of

    torch.manual_seed(train_config_of(recipe).seed)


def _given(args: argparse.Namespace, key: str) -> bool:
    value = getattr(args, key)
    return value not in (None, False)


def _load_recipe(args: argparse.Namespace) -> Any:
    from retrofit.recipe import Recipe, load_recipe

    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as e:
        # Name the file too: a CLI user may pass several recipes in a script.
        raise _BadInput(f"{args.recipe}: {e}") from None
    overrides = {k: getattr(args, k) for k in _TRAIN_OVERRIDES if getattr(args, k) is not None}
    if overrides:
        d = recipe.to_dict()
        d["train"] = {**d.get("train", {}), **overrides}
        recipe = Recipe.from_dict(d)
    return recipe


def _model_line(info: Any) -> str:
    line = f"model: {info.spec} ({info.source})"
    if info.kwargs:
        line += " " + " ".join(f"{k}={v!r}" for k, v in info.kwargs.items())
    if info.note:
        line += f"; {info.note}"
    return line


def _plan_dict(plan: Any, info: Any) -> dict[str, Any]:
    body = plan.to_dict()
    # The plan's own "model" is the class name; the CLI's is the name the user gave.
    head = {
        "model": info.name,
        "source": info.source,
        "spec": info.spec,
        "kwargs": dict(info.kwargs),
        "note": info.note,
        "class": body.pop("model", None),
    }
    return head | body


# --- --out ------------------------------------------------------------------------------------


def _check_out_dir(out: Path) -> None:
    """Refuse before any work: --out must be new or an empty directory, never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _BadInput(
            f"--out {str(out)!r} exists and is not an empty directory; choose a new one "
            "(with --train, --resume continues the run in it)"
        )


def _write_out(out: Path, model: Any, recipe: Any, plan: dict[str, Any], info: Any) -> None:
    """Write weights, recipe and plan into a temp dir beside ``out``, then rename it into place.

    The rename is atomic on one filesystem, so ``out`` either holds all three files or nothing.
    """
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        metadata = {
            "format": "pt",
            "model": info.spec,
            "kwargs": json.dumps(info.kwargs, default=str),
        }
        save_file(_state_for_safetensors(model), str(tmp / "model.safetensors"), metadata=metadata)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked before): rename cannot replace a directory everywhere
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _state_for_safetensors(model: Any) -> dict[str, Any]:
    """The state_dict with its keys unchanged, in a form safetensors accepts.

    safetensors refuses tensors that share memory (tied weights); ``save_model`` would drop the
    duplicates and change the keys, so shared tensors are copied instead.
    """
    seen: set[tuple[int, int]] = set()
    state = {}
    for key, value in model.state_dict().items():
        t = value.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        seen.add(ident)
        state[key] = t.cpu()
    return state


# --- --stages ---------------------------------------------------------------------------------


def _print_stages(args: argparse.Namespace, model: Any, info: Any) -> int:
    stages = _api("stages")(model)
    rows = [_as_dict(s) for s in stages]
    if args.json:
        head = {"model": info.name, "source": info.source, "spec": info.spec}
        print(json.dumps(head | {"stages": rows}, indent=2))
        return EXIT_OK
    print(_model_line(info))
    if not rows:
        print("DropBlock does not apply: no conv feature maps")
        return EXIT_OK
    header = ("stage", "module", "shape", "reduction")
    table = [
        (str(r.get("index")), str(r.get("module")), _shape(r.get("shape")), str(r.get("reduction")))
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return EXIT_OK


def _shape(shape: Any) -> str:
    if isinstance(shape, (tuple, list)):
        return "×".join(str(int(s)) for s in shape)
    return str(shape)


def _as_dict(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


# --- --train ----------------------------------------------------------------------------------


def _train(args: argparse.Namespace, model: Any, info: Any, recipe: Any, out: Path | None) -> int:
    try:
        from retrofit.train import fit
    except ImportError:  # the package may not re-export it (yet)
        from retrofit.train.loop import fit
    from retrofit.train.prepare import LintFindingsError

    try:
        result = fit(
            model,
            recipe,
            args.data,
            out=out,
            device=args.device,
            resume=args.resume,
            strict_lint=args.strict_lint,
            progress=not args.no_progress,
            max_steps=args.max_steps,
            model_name=info.spec,
        )
    except LintFindingsError as e:
        raise _LintFailed(str(e)) from None
    if args.json:
        print(json.dumps(_run_dict(result, info), indent=2, default=str))
    else:
        print(_model_line(info))
        print(_run_summary(result))
    return EXIT_OK


def _run_dict(result: Any, info: Any) -> dict[str, Any]:
    keys = ("out", "num_classes", "step", "total_steps", "epoch", "completed", "stop_reason")
    d = {"model": info.name, "source": info.source, "spec": info.spec}
    d |= {k: getattr(result, k) for k in keys}
    d |= {"metrics": result.metrics, "weights": result.weights, "checkpoint": result.checkpoint}
    return d


def _run_summary(result: Any) -> str:
    metrics = result.metrics or {}
    parts = [f"trained {result.step}/{result.total_steps} steps ({result.epoch} epochs)"]
    if result.stop_reason:
        parts.append(f"stopped: {result.stop_reason}")
    for key in ("val_top1", "val_loss"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key} {metrics[key]:.4g}")
    if result.weights:
        parts.append(
            f"weights: {result.weights} (load into the original class with "
            f"num_classes={result.num_classes})"
        )
    if result.checkpoint and not result.completed:
        parts.append(f"resume with --resume --out {result.out}")
    return "; ".join(parts)


# --- lint -------------------------------------------------------------------------------------


def _lint(args: argparse.Namespace) -> int:
    from retrofit.lint import format_report, lint, measure_variance_shift
    from retrofit.models import create_model, parse_kwargs

    if not args.model:
        raise _BadInput(f"--model NAME is required (e.g. {PROG} lint --model densenet121)")
    if args.data and not args.measure:
        raise _BadInput("--data only applies with --measure")
    kwargs = parse_kwargs(args.model_kwargs)
    # Finding paths needs only the graph; measuring runs batches, so it needs real weights.
    model, info = create_model(args.model, kwargs=kwargs, meta=not args.measure)
    findings = lint(model)
    shifts = None
    if args.measure:
        shifts = measure_variance_shift(model, data=args.data, findings=findings)
    if args.json:
        body = findings.to_dict() if hasattr(findings, "to_dict") else {}
        payload: dict[str, Any] = {
            "model": info.name,
            "source": info.source,
            "spec": info.spec,
            "class": body.pop("model", type(model).__name__),
            "findings": [f.to_dict() for f in findings],
        }
        payload |= body
        if shifts is not None:
            payload["variance_shift"] = shifts
        print(json.dumps(payload, indent=2))
    else:
        print(_model_line(info))
        print(format_report(findings, shifts))
    return EXIT_FINDINGS if findings else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
