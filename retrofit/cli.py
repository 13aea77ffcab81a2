"""``retrofit-cli``: plan, apply, train and lint from the command line.

::

    retrofit-cli --model resnet50 --recipe recipes/sd.yaml            # print the plan (dry run)
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --json     # the plan as JSON
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --out DIR  # write retrofitted weights
    retrofit-cli --model resnet50 --recipe recipes/sd.yaml --train    # fine-tune (digits default)
    retrofit-cli --model resnet50 --stages [--img-size 64]            # DropBlock's stage indices
    retrofit-cli lint --model densenet121 --model-kwargs drop_rate=0.2 [--max 5]
    retrofit-cli models 'resnet*'                                     # names the zoos know
    retrofit-cli recipes                                              # the shipped recipe cards
    retrofit-cli compare --model resnet18 --recipes a.yaml b.yaml --seeds 5 --out DIR

Exit codes: 0 ok; 1 lint findings (``lint``, and ``--train --strict-lint``); 2 bad input (recipe,
model name, kwargs, weights, data, device, output directory, a full disk), reported as one line on
stderr with nothing half-written; 3 retrofit refused the model (it cannot be traced, or the rewrite
would change its inference output), again with nothing written; 70 an internal error (one line and
where its traceback went); 130/143 a training run interrupted by SIGINT/SIGTERM after saving its
checkpoint. :mod:`retrofit.cli_errors` is the boundary that maps exceptions to these.

Every parser is built and every flag checked before torch is imported: ``--help`` and argument
errors answer at once (``tests/test_cli_ux.py`` checks ``sys.modules``). A subcommand is one entry
in :data:`SUBCOMMANDS`: a parser builder and a function that runs it.
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
from collections.abc import Callable, Sequence
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
from retrofit.errors import PartialError, RecipeError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FINDINGS",
    "EXIT_OK",
    "EXIT_REFUSED",
    "SUBCOMMANDS",
    "Subcommand",
    "main",
]

PROG = cli_errors.PROG
# The recipe cards in the source tree (an editable install, as the README sets up).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_BadInput = cli_errors.BadInput
_LintFailed = cli_errors.LintFailed


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """``retrofit-cli NAME ...``: ``parser()`` builds its argparse parser (without importing
    torch), ``run(args)`` does the work and returns the exit code."""

    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]
    help: str


# --- parsers ----------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="NAME",
        help="tv:NAME, timm:NAME, hf:CONFIG_DIR or hf:HUB_ID (transformers), "
        "package.module:factory, or a bare NAME "
        f"(torchvision first when both zoos have it; '{PROG} models' lists them)",
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
    commands = "; ".join(f"{PROG} {name} ({c.help})" for name, c in SUBCOMMANDS.items())
    p = ArgumentParser(
        prog=PROG,
        description="Add regularizers (stochastic depth, DropBlock, Uout, Cutout) to a "
        "torchvision/timm/user model by reading its torch.fx graph, and fine-tune it.",
        epilog=f"Other commands: {commands}. Exit codes: 0 ok, 1 lint findings, 2 bad input, "
        "3 model refused (untraceable, or the rewrite would change its output).",
    )
    _add_model_args(p)
    p.add_argument(
        "--recipe",
        metavar="FILE",
        help=f"recipe YAML, or the name of a shipped one (sd, dropblock, …: '{PROG} recipes')",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write the retrofitted weights (model.safetensors), the resolved recipe and the "
        "plan to DIR (a new or empty directory); with --train, the run directory",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the eval-mode equivalence and liveness checks of the rewritten model",
    )
    p.add_argument(
        "--training-example",
        metavar="FILE",
        help="the training forward the liveness check runs, for a model whose training call "
        "needs more than its input: a torch.save'd tuple of positional arguments, or a dict "
        "{'args': [...], 'kwargs': {...}} (loaded with weights_only=True); torchvision "
        "detectors need none (built-in targets)",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="go on when a requested technique finds no site in the model or modules could not "
        "be read (default: refuse, exit 3)",
    )
    p.add_argument("--stages", action="store_true", help="list the model's stages and exit")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings (recipe with the flags below applied, device, data) "
        "and exit",
    )
    _add_training_args(p)
    return p


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """The three groups of ``--train`` flags: what to train on, the recipe's train: settings,
    what training prints."""
    _add_run_args(p)
    _add_setting_args(p)
    _add_output_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training (with --train)")
    t.add_argument("--train", action="store_true", help="fine-tune the retrofitted model")
    t.add_argument(
        "--data",
        metavar="PATH",
        help="ImageFolder tree, local CIFAR directory, or 'synthetic[:N]'; "
        "default: the embedded digits data",
    )
    t.add_argument(
        "--task",
        choices=("classification", "detection", "segmentation"),
        help="what to fine-tune for (default: inferred from the model: torchvision's detection "
        "and segmentation models, else classification); --data then reads COCO JSON "
        "(detection) or VOC image + mask folders (segmentation), default the embedded digits "
        "on canvases",
    )
    t.add_argument("--pretrained", action="store_true", help="start from the zoo's weights")
    t.add_argument("--weights", metavar="FILE", help="start from a local checkpoint")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--strict-lint", action="store_true", help="refuse to train on lint findings")
    t.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")


def _add_setting_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("training settings (each overrides the recipe's train: section)")
    o.add_argument("--epochs", type=int, metavar="N", help="train.epochs")
    o.add_argument("--batch-size", type=int, metavar="N", help="train.batch_size (per process)")
    o.add_argument("--lr", type=float, metavar="LR", help="train.lr (peak, after warmup)")
    o.add_argument("--opt", metavar="NAME", help="train.opt: a timm optimizer (adamw, sgd, …)")
    o.add_argument("--weight-decay", type=float, metavar="WD", help="train.weight_decay")
    o.add_argument("--warmup-epochs", type=float, metavar="E", help="train.warmup_epochs")
    o.add_argument("--label-smoothing", type=float, metavar="EPS", help="train.label_smoothing")
    o.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.ema: also keep and evaluate an EMA of the weights",
    )
    o.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        help="train.amp: mixed precision on CUDA (CPU runs fp32 under auto)",
    )
    o.add_argument(
        "--img-size",
        type=int,
        metavar="N",
        help="train.img_size: input side in pixels; with --stages, the size stages are shown for",
    )
    o.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="train.workers: data-loader processes for file datasets "
        "(default: what the machine has, never above its CPU count)",
    )
    o.add_argument("--seed", type=int, help="train.seed")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("what training prints")
    r.add_argument("--quiet", action="store_true", help="only the final summary (and errors)")
    r.add_argument(
        "--log-json",
        action="store_true",
        help="one JSON object per line: start, every metrics record, result",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    p.add_argument(
        "--max",
        type=int,
        default=10,
        metavar="N",
        help="dropouts shown in detail after the summary (default 10; 0: the summary only; "
        "--json has every finding)",
    )
    return p


def _models_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} models",
        description="List the model names --model accepts: torchvision's and timm's registries, "
        "and transformers' image-classification architectures when it is installed.",
    )
    p.add_argument(
        "pattern",
        nargs="?",
        help="shell-style pattern ('resnet*', '*vit*'), or a plain substring; case-insensitive",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of lists")
    return p


def _recipes_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} recipes",
        description="List the shipped recipe cards (recipes/*.yaml) with one line each; "
        "--recipe takes a path or one of these names.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    return p


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:  # its own parser and exit codes: retrofit/compare/command.py
        from retrofit.compare import main as compare

        return compare(argv[1:])
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    if command is not None:
        parser, run, argv = command.parser(), command.run, argv[1:]
    else:
        parser, run = _main_parser(), _run
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad flags and 0 on --help
        return int(e.code or 0)
    args.argv = argv  # to print the command that resumes an interrupted run
    return cli_errors.run(lambda: run(args), debug=cli_errors.debug_requested(args), prog=PROG)


# --- main command -----------------------------------------------------------------------------

_TRAIN_ONLY = ("data", "resume", "strict_lint", "device", "max_steps", "task")
# Flags that override the recipe's train: section (same names as TrainConfig's fields).
_TRAIN_OVERRIDES = (
    "epochs",
    "batch_size",
    "lr",
    "opt",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "ema",
    "amp",
    "img_size",
    "workers",
    "seed",
)
_REPORTING = ("quiet", "log_json", "no_progress")


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def _check_flags(args: argparse.Namespace) -> None:
    """Every check that needs no model and no torch, so a wrong command line answers at once."""
    if not args.model:
        raise _BadInput("--model NAME is required (e.g. --model resnet50 --recipe recipes/sd.yaml)")
    if not args.recipe and not args.stages:
        raise _BadInput(
            "nothing to do: give --recipe FILE to plan (add --out DIR to write weights, --train "
            f"to fine-tune), --stages to list stages, or run '{PROG} lint --model NAME'"
        )
    if args.training_example and (args.train or not args.out):
        # Only `--out DIR` applies the recipe here; a plan runs nothing, and the trainer runs
        # its own training steps on its data.
        raise _BadInput("--training-example applies with --out DIR (not with --train, nor alone)")
    if args.stages:
        used = [_flag(k) for k in (*_TRAIN_ONLY, *_TRAIN_OVERRIDES, *_REPORTING) if _given(args, k)]
        used = [f for f in used if f != "--img-size"]
        if args.train or args.out or args.print_config or used:
            raise _BadInput(
                "--stages only lists the stages (with --img-size N for another input size); "
                f"run it without {', '.join(used) or '--train/--out/--print-config'}"
            )
    elif not args.train and not args.print_config:
        used = [_flag(k) for k in (*_TRAIN_ONLY, *_TRAIN_OVERRIDES, *_REPORTING) if _given(args, k)]
        if used:
            raise _BadInput(f"{', '.join(used)} only apply with --train")
        if (args.pretrained or args.weights) and not args.out:
            raise _BadInput("--pretrained/--weights only apply with --out DIR or --train")
    if args.quiet and args.log_json:
        raise _BadInput("give --quiet or --log-json, not both")
    if args.json and args.log_json:
        raise _BadInput("give --json (one result document) or --log-json (a line per event)")
    if args.resume and not args.out:
        raise _BadInput("--resume needs --out DIR (the run to continue)")
    if args.weights and args.pretrained:
        raise _BadInput("give --pretrained or --weights FILE, not both")
    if args.weights and not Path(args.weights).is_file():
        raise _BadInput(f"--weights {args.weights!r}: no such file")
    if args.max_steps is not None and args.max_steps < 0:
        raise _BadInput(f"--max-steps {args.max_steps}: allowed: an integer >= 0")
    if args.out and not args.print_config:
        from retrofit.train.rundir import check_out_dir, writes_run_dir

        # Under torchrun rank 0 alone writes --out; the other ranks only read a resumed run's
        # checkpoint there, and a new run's directory may already hold rank 0's first files.
        if args.resume or writes_run_dir():
            check_out_dir(Path(args.out), resume=args.resume)


def _run(args: argparse.Namespace) -> int:
    _check_flags(args)
    if args.device is not None:
        from retrofit.train.distributed import check_device

        check_device(args.device)
    recipe_path = _recipe_path(args.recipe) if args.recipe else None
    from retrofit.models import create_model, parse_kwargs
    from retrofit.weights import load_weights

    kwargs = parse_kwargs(args.model_kwargs)
    recipe = _load_recipe(args, recipe_path) if recipe_path else None
    out = Path(args.out) if args.out else None
    training_call = _training_example(args.training_example)  # a bad file: before any build

    if args.stages:
        model, info = create_model(args.model, kwargs=kwargs, meta=True)
        return _print_stages(args, model, info)
    if args.print_config:
        return _print_config(args, recipe, recipe_path)

    # Only planning needs no weights: build on the meta device (no memory, no init time).
    real = bool(args.train or out)
    if args.train:
        # --seed seeds everything, the model's initial weights included (fit seeds the rest):
        # torch seeds itself at random per process.
        from retrofit.train.loop import seed_all
        from retrofit.train.prepare import train_config_of

        seed_all(train_config_of(recipe).seed)
    if args.train:
        kwargs = _task_kwargs(args, kwargs)
    model, info = create_model(args.model, pretrained=args.pretrained, kwargs=kwargs, meta=not real)
    if not real:
        from retrofit.capture.detection import is_detector

        if is_detector(model):
            # A detector's heads are read on the calls one real forward makes (they loop over
            # the feature maps it is given), and its NMS has no meta kernel: build it for real.
            model, info = create_model(args.model, kwargs=kwargs)
    if args.weights:
        load_weights(model, args.weights)

    if args.train:
        return _train(args, model, info, recipe, out)

    import retrofit

    if out is None:
        plan = retrofit.plan(model, recipe)
    else:
        model = retrofit.apply(
            model,
            recipe,
            verify=not args.no_verify,
            allow_partial=args.allow_partial,
            training_call=training_call,
        )
        # The plan apply executed (no second trace); None when it had nothing to change.
        plan = retrofit.applied_plan(model) or retrofit.plan(model, recipe)
        _write_out(out, model, recipe, _plan_dict(plan, info), info)
    if args.json:
        payload = _plan_dict(plan, info)
        if out is not None:
            payload["out"] = str(out)
        print(json.dumps(payload, indent=2))
    else:
        print(_model_line(info))
        print(plan.table())
        if out is not None:
            print(f"wrote {out}/ (model.safetensors, recipe.yaml, plan.json)")
    partial = plan.partial()
    if partial and not args.allow_partial:
        # The plan was shown; what it lacks refuses the model unless the user accepts it.
        raise PartialError("; ".join(partial) + " (--allow-partial to accept it)")
    return EXIT_OK


def _task_kwargs(args: argparse.Namespace, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Builder kwargs a task implies: a torchvision detector trained on the embedded canvases is
    built to take them at their own size (its default resizes every image to 800 px, 12× the
    canvas: a CPU run would take hours); ``--model-kwargs min_size=… max_size=…`` overrides."""
    from retrofit.train.tasks import task_of_name
    from retrofit.train.tasks.canvas import is_canvas_spec, parse_canvas_spec

    task = args.task or task_of_name(args.model)
    if (
        task == "detection"
        and task_of_name(args.model) == "detection"
        and is_canvas_spec(args.data)
    ):
        side = parse_canvas_spec(args.data).side
        if "min_size" not in kwargs and "max_size" not in kwargs:
            kwargs = {**kwargs, "min_size": side, "max_size": side}
    return kwargs


def _training_example(path: str | None) -> Any:
    """``--training-example FILE`` as a TrainingCall (None without the flag)."""
    if path is None:
        return None
    import torch

    from retrofit.verify.training_call import TrainingCall

    flag = f"--training-example {path!r}"
    if not Path(path).is_file():
        raise _BadInput(f"{flag}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs code, a truncated file, not torch.save's format
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _BadInput(f"{flag}: not a torch.save'd example ({first[:200]})") from None
    if isinstance(saved, list | tuple):
        return TrainingCall(args=tuple(saved))
    if isinstance(saved, dict) and set(saved) <= {"args", "kwargs"} and saved:
        args, kwargs = saved.get("args", ()), saved.get("kwargs", {})
        if isinstance(args, list | tuple) and isinstance(kwargs, dict):
            return TrainingCall(args=tuple(args), kwargs=dict(kwargs))
    raise _BadInput(
        f"{flag}: holds {type(saved).__name__}{sorted(saved) if isinstance(saved, dict) else ''};"
        " allowed: a tuple/list of positional arguments, or {'args': [...], 'kwargs': {...}}"
    )


def _given(args: argparse.Namespace, key: str) -> bool:
    value = getattr(args, key)
    return value not in (None, False)


def _recipe_path(spec: str) -> Path:
    """A recipe file: the path as given, else a shipped card by name (``sd``, ``sd.yaml``)."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = _shipped_recipes()
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    names = ", ".join(shipped) or f"none found in {RECIPES_DIR}"
    raise _BadInput(f"--recipe {spec!r}: no such file; shipped recipes: {names}")


def _shipped_recipes() -> dict[str, Path]:
    if not RECIPES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def _load_recipe(args: argparse.Namespace, path: Path) -> Any:
    from retrofit.recipe import Recipe, load_recipe

    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        # Name the file too: a CLI user may pass several recipes in a script.
        raise _BadInput(f"{args.recipe}: {e}") from None
    overrides = {k: getattr(args, k) for k in _TRAIN_OVERRIDES if getattr(args, k) is not None}
    if overrides:
        d = recipe.to_dict()
        d["train"] = {**(d.get("train") or {}), **overrides}
        try:
            recipe = Recipe.from_dict(d)
        except RecipeError as e:
            key = e.field.removeprefix("train.")
            if key not in overrides:
                flags = ", ".join(_flag(k) for k in overrides)
                raise _BadInput(f"{e} (from {flags} over {args.recipe})") from None
            # Name the flag first: the flag is what the user typed.
            raise _BadInput(f"{_flag(key)} {overrides[key]!r}: {e}") from None
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


# --- --print-config ---------------------------------------------------------------------------


def _print_config(args: argparse.Namespace, recipe: Any, recipe_path: Path | None) -> int:
    """The recipe as training would use it (flags applied, every default filled in), and the
    run's other settings; the YAML form loads back as a recipe."""
    import yaml

    from retrofit.finetune_config import TrainConfig, available_cpus, resolve_workers
    from retrofit.models import ModelInfo, parse_kwargs, resolve_model_name
    from retrofit.train.prepare import recipe_dict, train_config_of

    source, name, _ = resolve_model_name(args.model)
    cfg: TrainConfig = train_config_of(recipe)
    settings = recipe_dict(recipe, cfg)
    settings["train"]["workers"] = resolve_workers(cfg.workers)
    run = {
        "model": ModelInfo(source, name).spec,
        "model_kwargs": parse_kwargs(args.model_kwargs),
        "recipe": str(recipe_path),
        "data": args.data or "digits (embedded, scikit-learn)",
        "device": args.device or _default_device(),
        "out": args.out,
        "cpus": available_cpus(),
    }
    if args.json:
        print(json.dumps({"run": run, "recipe": settings}, indent=2))
        return EXIT_OK
    print("# resolved settings; the YAML below loads as a recipe (--recipe FILE)")
    for key, value in run.items():
        print(f"# {key}: {value}")
    if cfg.workers is None:
        print(f"# train.workers: auto = {settings['train']['workers']} on this machine")
    elif cfg.workers > settings["train"]["workers"]:
        print(f"# train.workers: {cfg.workers} asked, at most the CPU count is used")
    print(yaml.safe_dump(settings, sort_keys=False).rstrip())
    return EXIT_OK


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- --out ------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_out(out: Path, model: Any, recipe: Any, plan: dict[str, Any], info: Any) -> None:
    """Write weights, recipe and plan into a temp dir beside ``out``, then rename it into place.

    The rename is atomic on one filesystem, so ``out`` either holds all three files or nothing;
    ``out`` is locked meanwhile (:func:`retrofit.train.rundir.lock_run_dir`), so a concurrent run
    into it refuses instead of mixing files. The temp dir's name carries this process's pid, so
    one a killed run left behind is recognised and removed by the next. mkdtemp makes a private
    (0700) directory; it gets the user's umask before it becomes ``out``.
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
            mask = _umask()
            for f in tmp.iterdir():
                f.chmod(0o666 & ~mask)
            tmp.chmod(0o777 & ~mask)
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
    import torch

    import retrofit
    from retrofit.capture.probe import probe_input_size

    channels, h, w = probe_input_size(model)  # what stages() probes with by default
    example = None
    if args.img_size is not None:
        h = w = args.img_size
        example = torch.empty(1, channels, h, w, device="meta")
    rows = [_as_dict(s) for s in retrofit.stages(model, example_input=example)]
    if args.json:
        head = {"model": info.name, "source": info.source, "spec": info.spec}
        print(json.dumps(head | {"input_size": [channels, h, w], "stages": rows}, indent=2))
        return EXIT_OK
    print(_model_line(info))
    if not rows:
        print("DropBlock does not apply: no conv feature maps")
        return EXIT_OK
    more = "" if args.img_size else " (--img-size N for another)"
    print(f"for a {channels}×{h}×{w} input{more}")
    header = ("stage", "module", "shape", "reduction")
    table = [
        (str(r.get("index")), str(r.get("module")), _shape(r.get("shape")), str(r.get("reduction")))
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
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


def _console(args: argparse.Namespace, info: Any) -> Any:
    from retrofit.train.console import Console

    # --json prints one document at the end, so nothing else may reach stdout.
    mode = "json" if args.log_json else "silent" if args.json else "quiet" if args.quiet else "text"
    hint = f"--resume --out {args.out}" if args.out else "--out DIR next time (nothing was saved)"
    if args.out and _launch() is not None:  # under torchrun: the whole command, launcher first
        hint = _resume_command(args)
    return Console(mode, progress=not args.no_progress, resume_hint=hint, header=_model_line(info))


def _train(args: argparse.Namespace, model: Any, info: Any, recipe: Any, out: Path | None) -> int:
    from retrofit.train import LintFindingsError, fit
    from retrofit.train.checkpoint import ResumeError, WriteError
    from retrofit.train.console import result_record
    from retrofit.train.rundir import lock_run_dir, writes_run_dir

    console = _console(args, info)
    try:
        # Locked from here (fit locks it too) by the one process that writes it (rank 0 under
        # torchrun): a second run into --out refuses, nothing mixes.
        locked = out if out is not None and writes_run_dir() else None
        with lock_run_dir(locked, fresh=not args.resume):
            result = fit(
                model,
                recipe,
                args.data,
                out=out,
                device=args.device,
                resume=args.resume,
                strict_lint=args.strict_lint,
                max_steps=args.max_steps,
                model_name=info.spec,
                report=console,
                allow_partial=args.allow_partial,
                task=args.task,
            )
    except LintFindingsError as e:
        raise _LintFailed(str(e)) from None
    except ResumeError as e:
        # The checkpoint's run had another number of processes: say how to continue it.
        raise _BadInput(f"{e}; resume it with: {_resume_command(args, e.launch)}") from None
    except WriteError as e:
        hint = f"once it can be written, continue with: {_resume_command(args)}"
        raise _BadInput(f"{e}; {hint}") from None
    if args.json:
        head = {"model": info.name, "source": info.source, "spec": info.spec}
        record = result_record(result)
        record.pop("kind")
        print(json.dumps(head | record, indent=2, default=str))
    if result.stop_reason in ("SIGINT", "SIGTERM"):
        # A scheduler must tell an interrupted run from a finished one: 128 + the signal number.
        saved = (
            f"checkpoint of step {result.step} saved in {result.checkpoint}; continue with: "
            f"{_resume_command(args)}"
            if result.checkpoint
            else "nothing was saved (no --out)"
        )
        if writes_run_dir():  # once per run, not once per torchrun process
            print(f"{PROG}: interrupted by {result.stop_reason}; {saved}", file=sys.stderr)
        return cli_errors.exit_code_for_signal(result.stop_reason)
    return EXIT_OK


def _launch() -> tuple[list[str], list[str]] | None:
    from retrofit.train.distributed import launch_command

    return launch_command()


def _resume_command(
    args: argparse.Namespace, launch: tuple[list[str], list[str]] | None | bool = True
) -> str:
    """The command line that continues this run: the same arguments, with ``--resume``, under
    the launcher it was started with (``torchrun --nproc_per_node 2 … -m retrofit.cli …``).

    ``launch``: ``(launcher, entry)`` of the run to continue; True (default): this process's own
    (:func:`retrofit.train.distributed.launch_command`); None: no launcher (``retrofit-cli``).
    """
    argv = [a for a in getattr(args, "argv", None) or [] if a != "--resume"]
    if launch is True:
        launch = _launch()
    if launch:
        launcher, entry = launch
        return shlex.join([*launcher, *entry, *argv, "--resume"])
    return shlex.join([PROG, *argv, "--resume"])


# --- lint -------------------------------------------------------------------------------------


def _lint(args: argparse.Namespace) -> int:
    if not args.model:
        raise _BadInput(f"--model NAME is required (e.g. {PROG} lint --model densenet121)")
    if args.data and not args.measure:
        raise _BadInput("--data only applies with --measure")
    if args.max < 0:
        raise _BadInput(f"--max {args.max}: give a number of dropouts >= 0")
    from retrofit.lint import format_report, lint, measure_variance_shift
    from retrofit.models import create_model, parse_kwargs

    kwargs = parse_kwargs(args.model_kwargs)
    # Finding paths needs only the graph; measuring runs batches, so it needs real weights.
    model, info = create_model(args.model, kwargs=kwargs, meta=not args.measure)
    findings = lint(model)
    shifts = None
    if args.measure:
        batches = None
        if args.data:
            # The trainer's data stack reads --data (a bad path is a DataError, exit 2, even when
            # there is nothing to measure); the lint itself never imports the trainer.
            from retrofit.train.data import build_data

            batches = build_data(args.data, model).train.iter_epoch(0)
        shifts = measure_variance_shift(model, batches, findings=findings)
    if args.json:
        body = findings.to_dict()
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
        print(format_report(findings, shifts, model=model, max_dropouts=args.max))
    return EXIT_FINDINGS if findings else EXIT_OK


# --- models, recipes --------------------------------------------------------------------------


def _models(args: argparse.Namespace) -> int:
    from retrofit.models import list_model_names

    zoos = list_model_names(args.pattern)
    if args.json:
        print(json.dumps(zoos, indent=2))
        return EXIT_OK
    how = {
        "torchvision": "--model tv:NAME (or a bare NAME: torchvision first)",
        "timm": "--model timm:NAME",
        "transformers": "model types of AutoModelForImageClassification; build one with a "
        "factory --model package.module:function",
    }
    total = 0
    for zoo, names in zoos.items():
        if not names:
            continue
        print(f"# {zoo}: {len(names)} ({how.get(zoo, '')})")
        for name in names:
            print(name)
        total += len(names)
    if total == 0:
        print(f"no model name matches {args.pattern!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _recipes(args: argparse.Namespace) -> int:
    import yaml

    shipped = _shipped_recipes()
    if not shipped:
        raise _BadInput(f"no recipe cards in {RECIPES_DIR} (they ship with the source tree)")
    rows = []
    for name, path in shipped.items():
        text = path.read_text(encoding="utf-8")
        sections = yaml.safe_load(text) or {}
        techniques = {k: v for k, v in sections.items() if k != "train"}
        train = sections.get("train") or {}
        rows.append(
            {
                "name": name,
                "path": str(path),
                "paper": _paper(text),
                "techniques": techniques,
                "epochs": train.get("epochs"),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    print(f"# {RECIPES_DIR}: --recipe NAME or --recipe PATH; the cards are in recipes/README.md")
    for r in rows:
        parts = [f"{k} {_flow(v)}" for k, v in r["techniques"].items()]
        if r["epochs"]:
            parts.append(f"train {r['epochs']} epoch(s)")
        paper = f"  ({r['paper']})" if r["paper"] else ""
        print(f"{r['name'].ljust(width)}  {'; '.join(parts)}{paper}")
    return EXIT_OK


def _paper(card: str) -> str:
    """ "Huang et al. 2016" from a card's first comment line ("Stochastic depth — Huang, Sun, …")."""
    import re

    first = next((ln for ln in card.splitlines() if ln.startswith("#")), "")
    authors = first.partition("— ")[2].split('"')[0].strip(" ,")
    names = [a.strip() for a in re.split(r",|&", authors) if a.strip()]
    if len(names) > 2 and "et al." not in authors:
        authors = f"{names[0]} et al."
    year = re.findall(r"\b(?:19|20)\d\d\b", card.split("\n\n")[0])
    return f"{authors} {year[0]}" if authors and year else authors


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, (bool, type(None))) else str(value)


# Subcommands, by the word that follows ``retrofit-cli``; anything else is the main command.
SUBCOMMANDS: dict[str, Subcommand] = {
    "lint": Subcommand(_lint_parser, _lint, "Dropout before BatchNorm"),
    "models": Subcommand(_models_parser, _models, "model names"),
    "recipes": Subcommand(_recipes_parser, _recipes, "shipped recipes"),
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
