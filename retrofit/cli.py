"""``retrofit-cli``: plan, apply, train and lint from the command line.

::

    retrofit-cli --model resnet50 --recipe recipes/sd.yaml            # print the plan (dry run)
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --json     # the plan as JSON
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --out DIR  # write retrofitted weights
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --train    # fine-tune (digits default)
    retrofit-cli --model resnet50 --stages                            # DropBlock's stage indices
    retrofit-cli lint --model densenet121 --model-kwargs drop_rate=0.2

Exit codes: 0 ok; 1 lint findings (``lint``, and ``--train --strict-lint``); 2 bad input (recipe,
model name, kwargs, weights, data, device, output directory, a full disk), reported as one line on
stderr with nothing half-written; 3 retrofit refused the model (it cannot be traced, or the rewrite
would change its inference output), again with nothing written; 70 an internal error (one line and
where its traceback went); 130/143 a training run interrupted by SIGINT/SIGTERM after saving its
checkpoint. :mod:`retrofit.cli_errors` is the boundary that maps exceptions to these.

The heavy parts (tracing, planning, training) are imported inside the commands, so ``--help`` and
argument errors are instant and the CLI imports even while a piece of the package is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from retrofit import cli_errors
from retrofit.cli_errors import (
    EXIT_BAD_INPUT,
    EXIT_FINDINGS,
    EXIT_OK,
    EXIT_REFUSED,
    ArgumentParser,
)
from retrofit.errors import RecipeError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FINDINGS", "EXIT_OK", "EXIT_REFUSED", "main"]

PROG = cli_errors.PROG
_BadInput = cli_errors.BadInput
_LintFailed = cli_errors.LintFailed


# --- parsers ----------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="NAME",
        help="tv:NAME, timm:NAME, hf:CONFIG_DIR or hf:HUB_ID (transformers), "
        "package.module:factory, or a bare NAME (torchvision first when both zoos have it)",
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
    p = ArgumentParser(
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
    p = ArgumentParser(
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
    is_lint = bool(argv) and argv[0] == "lint"
    parser = _lint_parser() if is_lint else _main_parser()
    try:
        args = parser.parse_args(argv[1:] if is_lint else argv)
    except SystemExit as e:  # argparse exits 2 on bad flags and 0 on --help
        return int(e.code or 0)
    args.argv = argv  # to print the command that resumes an interrupted run
    command = (lambda: _lint(args)) if is_lint else (lambda: _run(args))
    return cli_errors.run(command, debug=cli_errors.debug_requested(args), prog=PROG)


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
    if args.max_steps is not None and args.max_steps < 0:
        raise _BadInput(f"--max-steps {args.max_steps}: allowed: an integer >= 0")
    if args.device is not None:
        from retrofit.train.distributed import check_device

        check_device(args.device)

    kwargs = parse_kwargs(args.model_kwargs)
    recipe = _load_recipe(args) if args.recipe else None
    out = Path(args.out) if args.out else None
    if out is not None:
        from retrofit.train.rundir import check_out_dir

        check_out_dir(out, resume=args.resume)

    if args.stages:
        model, info = create_model(args.model, kwargs=kwargs, meta=True)
        return _print_stages(args, model, info)

    # Only planning needs no weights: build on the meta device (no memory, no init time).
    real = bool(args.train or out)
    if args.train:
        # --seed seeds everything, the model's initial weights included (fit seeds the rest).
        from retrofit.train.loop import seed_all
        from retrofit.train.prepare import train_config_of

        seed_all(train_config_of(recipe).seed)
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
        try:
            recipe = Recipe.from_dict(d)
        except RecipeError as e:
            key = e.field.removeprefix("train.")
            if key not in overrides:
                raise _BadInput(f"{args.recipe} with the command line's overrides: {e}") from None
            # Name the flag, not the recipe field: the flag is what the user typed.
            flag = "--" + key.replace("_", "-")
            raise _BadInput(
                f"{flag} {overrides[key]!r} ({e.field}): allowed: {e.allowed}"
            ) from None
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


def _write_out(out: Path, model: Any, recipe: Any, plan: dict[str, Any], info: Any) -> None:
    """Write weights, recipe and plan into a temp dir beside ``out``, then rename it into place.

    The rename is atomic on one filesystem, so ``out`` either holds all three files or nothing;
    ``out`` is locked meanwhile (:func:`retrofit.train.rundir.lock_run_dir`), so a concurrent run
    into it refuses instead of mixing files. The temp dir's name carries this process's pid, so
    one a killed run left behind is recognised and removed by the next.
    """
    from safetensors.torch import save

    from retrofit.train.checkpoint import WriteError
    from retrofit.train.rundir import lock_run_dir

    metadata = {"format": "pt", "model": info.spec, "kwargs": json.dumps(info.kwargs, default=str)}
    blob = save(_state_for_safetensors(model), metadata=metadata)
    with lock_run_dir(out, fresh=True):
        _remove_stale_out_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            (tmp / "model.safetensors").write_bytes(blob)
            (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
            (tmp / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
            out.rmdir()  # empty (checked under the lock): rename cannot replace a directory everywhere
            os.replace(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _BadInput(
                    f"--out {str(out)!r}: another process wrote it while this one was writing; "
                    "nothing of this run was written"
                ) from None
            raise WriteError(out, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _remove_stale_out_temps(out: Path) -> None:
    """Temp dirs of ``--out`` writes whose process is gone (killed mid-write)."""
    prefix = f".{out.name}.tmp-"
    for p in out.parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


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
    from retrofit.train.checkpoint import WriteError
    from retrofit.train.prepare import LintFindingsError
    from retrofit.train.rundir import lock_run_dir

    try:
        # Locked from here (fit locks it too): a second run into --out refuses, nothing mixes.
        with lock_run_dir(out, fresh=not args.resume) if out is not None else nullcontext():
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
    except WriteError as e:
        hint = f"once it can be written, continue with: {_resume_command(args)}"
        raise _BadInput(f"{e}; {hint}") from None
    if args.json:
        print(json.dumps(_run_dict(result, info), indent=2, default=str))
    else:
        print(_model_line(info))
        print(_run_summary(result))
    if result.stop_reason in ("SIGINT", "SIGTERM"):
        # A scheduler must tell an interrupted run from a finished one: 128 + the signal number.
        saved = (
            f"checkpoint of step {result.step} saved in {result.checkpoint}; continue with: "
            f"{_resume_command(args)}"
            if result.checkpoint
            else "nothing was saved (no --out)"
        )
        print(f"{PROG}: interrupted by {result.stop_reason}; {saved}", file=sys.stderr)
        return cli_errors.exit_code_for_signal(result.stop_reason)
    return EXIT_OK


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the same arguments, with ``--resume``."""
    argv = [a for a in getattr(args, "argv", None) or [] if a != "--resume"]
    return shlex.join([PROG, *argv, "--resume"])


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
