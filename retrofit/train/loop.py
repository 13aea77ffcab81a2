"""``fit``: fine-tune a model with a recipe's regularizers, on one device or under torchrun.

A run is three phases around two records: :func:`_setup` builds a ``_Run`` (model, data,
optimizer, hooks: fixed for the run) and a :class:`RunState` (step, epoch, running sums: what a
checkpoint carries); :func:`_run_epoch` / :func:`_step` advance the state; :func:`_finish` strips
the model and exports the weights.

One optimizer step, in order::

    retrofit.schedule.update(model, step / total_steps)      # regularizer rates for this step
    grad_accum × [cutout → forward (autocast) → loss / grad_accum → backward]   (DDP syncs on the last)
    [unscale → clip] → optimizer.step (via the scaler for fp16) → zero_grad
    lr_scheduler.step_update(step + 1) → ema.update

Exact resume rests on three things: the data order is a function of ``(seed, epoch)`` and skips
the batches already consumed (:mod:`retrofit.train.sampler`); every RNG a step draws from (torch
CPU/CUDA, numpy, Python, per rank) is saved with the checkpoint and restored; cutout draws from a
private generator seeded by ``(seed, rank, step, micro-batch)``. Running averages that span the
interruption (the log window, the epoch's training loss) are saved too. Nothing else in a step
reads the wall clock or an unsaved state, so on CPU a resumed run logs exactly the numbers an
uninterrupted one does (timing fields aside).

Loss values stay on the device between log steps: a ``.item()`` per step would synchronise CUDA
and cost throughput.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrofit import schedule
from retrofit.errors import ModelError
from retrofit.finetune_config import TrainConfig
from retrofit.layers.protocol import Resumable, SharedDraws
from retrofit.techniques import TECHNIQUES, epoch_figures, logged, planned_figures
from retrofit.train import distributed as D
from retrofit.train.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    VERSION,
    ResumeError,
    capture_rng,
    export_weights,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from retrofit.train.console import Console, result_record
from retrofit.train.data import DataBundle, DataError
from retrofit.train.data import steps_per_epoch as count_steps
from retrofit.train.interrupt import StopRequest
from retrofit.train.metrics import MetricsLog, correct_counts, require_tensorboard
from retrofit.train.outputs import logits_of
from retrofit.train.plots import plot_curves, plot_survival, regularizer_layers
from retrofit.train.precision import Precision, resolve_precision
from retrofit.train.prepare import (
    Prepared,
    prepare_model,
    recipe_dict,
    resolve_recipe,
    train_config_of,
)
from retrofit.train.rundir import lock_run_dir

log = logging.getLogger("retrofit.train")

# Re-plot after every epoch only when epochs are long: a plot costs ~1 s, a toy epoch less.
LIVE_PLOT_EPOCH_S = 30.0


@dataclass
class RunResult:
    """What a call to :func:`fit` did.

    Attributes:
        model: the trained model; stripped back to its original architecture when the run ended
            normally or at ``max_steps``, still instrumented when it stopped on a signal.
        out: the run directory (None when nothing was written).
        num_classes: classes of the (possibly resized) classifier; build the original class with
            this ``num_classes`` to load ``weights``.
        step: optimizer steps done; ``total_steps`` for the whole schedule.
        epoch: completed epochs.
        completed: every epoch ran.
        stop_reason: None, ``"max_steps"``, ``"SIGINT"`` or ``"SIGTERM"``.
        metrics: the last evaluation (``val_top1``, ``val_top5``, ``val_loss``, …), {} if none ran.
        history: every ``metrics.jsonl`` record of the run.
        weights: the stripped ``model.safetensors`` (None when not written).
        checkpoint: the last checkpoint (resume from it with ``resume=True``).
        findings: lint findings (dicts) on the model as trained.
        plan: the plan that was applied, as a dict.
        seconds: wall-clock time of the call.
    """

    model: nn.Module
    out: Path | None
    num_classes: int
    step: int
    total_steps: int
    epoch: int
    completed: bool
    stop_reason: str | None
    config: TrainConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    weights: Path | None = None
    checkpoint: Path | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    seconds: float = 0.0


def fit(
    model: nn.Module,
    recipe: Any = None,
    data: str | Path | DataBundle | None = None,
    *,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    strict_lint: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    config: TrainConfig | None = None,
    model_name: str | None = None,
    apply: bool = True,
    allow_partial: bool = True,
    report: Console | None = None,
    task: str | None = None,
) -> RunResult:
    """Retrofit ``model`` with ``recipe`` and fine-tune it on ``data``.

    The model is edited in place: classifier resized to the data's classes, then
    ``retrofit.apply(model, recipe)``, then training, then ``retrofit.strip(model)``. Under torchrun
    (``RANK``/``WORLD_SIZE`` in the environment) each process calls ``fit`` alike; rank 0 writes.

    Args:
        model: an unmodified model (pretrained or not); pass ``apply=False`` if it was already
            retrofitted.
        recipe: a Recipe, a recipe path or dict, or None (plain fine-tuning). Its ``train:``
            section is the :class:`TrainConfig` unless ``config`` is given.
        data: see :func:`retrofit.train.data.build_data`; None = embedded digits. A prebuilt
            :class:`DataBundle` is used as is.
        out: run directory (recipe.yaml, plan.json, lint.json, metrics.jsonl, plots, checkpoint.pt,
            model.safetensors, model.json); None writes nothing.
        device: ``"cuda"``, ``"cpu"``, … (default: CUDA when available; ``cuda:LOCAL_RANK`` under torchrun).
        resume: continue from ``out/checkpoint.pt`` if it exists (else start from step 0).
        strict_lint: refuse to train when the lint reports findings.
        progress: show tqdm bars (only on a terminal, only on rank 0).
        max_steps: stop after this many optimizer steps in total (checkpoint saved, resumable).
        config: training settings overriding the recipe's ``train:`` section.
        model_name: architecture name recorded in ``model.json`` (default: timm's, else the class).
        apply: run ``retrofit.apply`` (set False for a model that is already retrofitted).
        allow_partial: go on when a technique finds no site or modules could not be read
            (``retrofit.apply``'s ``allow_partial``; ``retrofit-cli`` refuses unless asked).
        report: how the run reports itself (:class:`~retrofit.train.console.Console`: lines for a
            person, JSON lines, quiet); default: the ``retrofit.train`` logger, and bars if
            ``progress``. Only rank 0 reports.
        task: ``classification``, ``detection`` or ``segmentation`` (:mod:`retrofit.train.tasks`);
            None: a prebuilt ``data`` bundle's task, else inferred from the model's class.

    Raises:
        DataError: ``data`` names nothing readable, or holds fewer images than one optimizer step.
        RecipeError: invalid recipe or train settings.
        ModelError: ``resume`` found a checkpoint that is unreadable or does not fit this model.
        LintFindingsError: ``strict_lint`` and findings.
        DeviceError: ``device`` is not a device name or not available on this machine.
        RunDirError: ``out`` cannot be a run directory, or another run holds it.
        WriteError: the disk refused a write (full, read-only); the previous checkpoint is intact.
    """
    env = D.setup(device)
    out = Path(out) if out is not None else None
    console = report if report is not None else Console("log", progress=progress)
    try:
        # Rank 0 holds the run directory for the whole run: a second run into it refuses, and
        # temp files that killed writes left there are removed first.
        with lock_run_dir(out if env.is_main else None):
            run, state = _setup(model, recipe, data, env=env, out=out, resume=resume,
                                strict_lint=strict_lint,
                                console=console if env.is_main else console.silent(),
                                max_steps=max_steps, config=config, model_name=model_name,
                                apply=apply, allow_partial=allow_partial, task=task)  # fmt: skip
            with StopRequest() as stop:
                while state.epoch < run.cfg.epochs and state.stop_reason is None:
                    _run_epoch(run, state, stop)
            return _finish(run, state)
    finally:
        D.teardown(env)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _mix(*parts: int) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def architecture_name(model: nn.Module) -> str:
    for attr in ("pretrained_cfg", "default_cfg"):
        arch = (getattr(model, attr, None) or {}).get("architecture")
        if arch:
            return str(arch)
    cls = type(model)
    if cls.__module__.startswith("torchvision.models"):
        # torchvision's builders are named like the class in lower case for most models.
        return cls.__name__.lower()
    return f"{cls.__module__}.{cls.__qualname__}"


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Any, env: D.DistEnv, precision: Precision, *, bar: Any = None
) -> dict[str, float]:
    """Top-1/top-5 (%) and mean cross-entropy (no label smoothing) over the whole val split.

    ``bar``: a progress bar (anything with ``update(n)``) advanced once per batch."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, device=env.device, dtype=torch.float64)  # loss, top1, top5, n
    for x, y in batches.iter_epoch():
        x, y = _to_device(x, y, env.device, precision)
        with precision.autocast():
            logits = logits_of(model(x))
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1:3] += correct_counts(logits, y, (1, 5)).to(sums.dtype)
        sums[3] += y.numel()
        if bar is not None:
            bar.update(1)
    D.all_reduce_sum(sums, env)
    model.train(was_training)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def _to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    if precision.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _layer_counters(model: nn.Module) -> dict[str, list[int]]:
    """The counters of every ``Resumable`` layer (a stochastic-depth gate's ``[calls, kept,
    draws]``: kept fractions, and the draw counter seeded draws are keyed by, so resuming
    continues the sequence), by module name."""
    return {
        name: [int(v) for v in m.checkpoint_counters()]
        for name, m in model.named_modules()
        if isinstance(m, Resumable)
    }


def _private_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Generators that layers hold themselves (e.g. gates seeded by the recipe): their state is
    RNG state too, and must travel with the checkpoint like the global one."""
    out = {}
    for name, m in model.named_modules():
        for attr in ("generator", "_generator"):
            g = m.__dict__.get(attr)
            if isinstance(g, torch.Generator):
                out[f"{name}.{attr}"] = g
    return out


@dataclass
class _Regularizers:
    """What the steps need of the recipe's regularizers beyond the model's own layers (which
    ``retrofit.schedule`` drives): the inserted layers for the plots, and Cutout on the batch."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # for the plots
    # The recipe's input transforms (each technique record's ``input_transform``: Cutout),
    # applied in recipe order, all drawing from ``cut_gen``.
    transforms: list[Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = field(
        default_factory=list
    )
    cut_gen: torch.Generator | None = None


@dataclass
class _Run:
    """What :func:`_setup` builds: fixed from the first step of a run to its end."""

    model: nn.Module
    train_model: nn.Module  # ``model``, or its DDP / torch.compile wrapper
    recipe: Any
    cfg: TrainConfig
    env: D.DistEnv
    bundle: DataBundle
    prep: Prepared
    precision: Precision
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    ema: Any
    criterion: nn.Module | None
    regularizers: _Regularizers
    metrics: MetricsLog
    arch: str
    out: Path | None
    ckpt_path: Path | None
    writes: bool  # rank 0 with a run directory
    sync_bn: dict[str, type[nn.Module]]
    steps_per_epoch: int
    total_steps: int
    max_steps: int | None
    console: Console
    started: float  # time.perf_counter() when fit began
    task: Any = None  # retrofit.train.tasks: batch → loss, the evaluation pass, the epoch fields
    task_note: str | None = None

    @property
    def images_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.env.world_size


@dataclass
class RunState:
    """What changes from step to step; a checkpoint carries it (with the RNG and the meters).

    ``meters`` are running loss sums kept on the device (see the module docstring); the log
    window (``window_t0``, ``window_steps``) only times ``images_per_s``.
    """

    meters: dict[str, Any]
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (resume point)
    step_in_epoch: int = 0
    stop_reason: str | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    window_t0: float = 0.0
    window_steps: int = 0


# --- setup ------------------------------------------------------------------------------------


def _setup(
    model: nn.Module,
    recipe: Any,
    data: Any,
    *,
    env: D.DistEnv,
    out: Path | None,
    resume: bool,
    strict_lint: bool,
    console: Console,
    max_steps: int | None,
    config: TrainConfig | None,
    model_name: str | None,
    apply: bool,
    allow_partial: bool,
    task: str | None = None,
) -> tuple[_Run, RunState]:
    """Everything before the first step, in an order that matters: seed, data, resize, apply,
    lint, optimizer, resume, and the RNG stream of training last."""
    started = time.perf_counter()
    recipe = resolve_recipe(recipe)
    cfg = config if config is not None else train_config_of(recipe)
    _check_args(cfg, env, out, resume, max_steps)
    writes = env.is_main and out is not None
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    ckpt = _read_checkpoint(ckpt_path) if resume else None
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    the_task, task_note = _task(task, data, model)
    arch, bundle, prep = _prepare(
        model, recipe, data, cfg, env, out=out if writes else None, strict_lint=strict_lint,
        apply=apply, allow_partial=allow_partial, model_name=model_name, task=the_task,
    )  # fmt: skip
    D.broadcast_state(model, env)
    precision, sync_bn = _place(model, cfg, env)
    steps_per_epoch = count_steps(bundle, cfg)
    optimizer, scheduler, scaler, ema = _optimization(model, cfg, precision, steps_per_epoch)

    state = RunState(meters=_new_meters(env.device))
    if resume:
        _check_same_checkpoint(ckpt, ckpt_path, env)
    if ckpt is not None:
        _check_resume_world(ckpt, ckpt_path, cfg, env, steps_per_epoch)
        _load_training_state(ckpt, model, optimizer, scheduler, scaler, ema, bundle, cfg, env)
        _resume_position(state, ckpt, cfg)
    _seed_draws(model, ckpt, cfg, env)

    train_model = _training_wrapper(model, recipe, cfg, env)
    regularizers = _regularizers(model, recipe, env)
    criterion = the_task.criterion(cfg)
    metrics = _metrics_log(out if writes else None, cfg, state.step if ckpt is not None else None)
    run = _Run(model=model, train_model=train_model, recipe=recipe, cfg=cfg, env=env, bundle=bundle,
               prep=prep, precision=precision, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               ema=ema, criterion=criterion, regularizers=regularizers, metrics=metrics, arch=arch,
               out=out, ckpt_path=ckpt_path, writes=writes, sync_bn=sync_bn,
               steps_per_epoch=steps_per_epoch, total_steps=cfg.epochs * steps_per_epoch,
               max_steps=max_steps, console=console, started=started, task=the_task,
               task_note=task_note)  # fmt: skip
    _announce(run, resumed_at=state.step if ckpt is not None else None)

    _start_training_rng(ckpt, state, model, cfg, env)
    # A resumed run reports the last evaluation even if it ends before evaluating again.
    state.last_eval = next((r for r in reversed(metrics.records) if r.get("kind") == "epoch"), {})
    state.window_t0 = time.perf_counter()
    return run, state


def _metrics_log(out: Path | None, cfg: TrainConfig, resume_step: int | None) -> MetricsLog:
    """metrics.jsonl (and TensorBoard's event files when asked) in ``out``; None writes nothing
    (a process that is not the main one, or a run without a directory)."""
    return MetricsLog(
        out / "metrics.jsonl" if out is not None else None,
        resume_step=resume_step,
        tensorboard_dir=out / "tensorboard" if out is not None and cfg.tensorboard else None,
    )


def _task(task: str | None, data: Any, model: nn.Module) -> tuple[Any, str | None]:
    """Which task trains (named, carried by the data bundle, or recognised from the model), and
    the note that says how it was chosen; the loop is the same for every task."""
    from retrofit.train.tasks import get_task, resolve_task

    if task is None and isinstance(data, DataBundle):
        task = data.task
    task_name, task_note = resolve_task(task, model)
    return get_task(task_name), task_note


def _resume_position(state: RunState, ckpt: dict[str, Any], cfg: TrainConfig) -> None:
    """Where a resumed run continues: the checkpoint's step and epoch, and the micro-batches of
    this epoch each process consumed — the same optimizer steps, counted in this run's
    micro-batches (grad_accum may differ when the world size changed)."""
    state.step, state.epoch = int(ckpt["step"]), int(ckpt["epoch"])
    saved_accum = int(ckpt.get("config", {}).get("grad_accum", cfg.grad_accum) or 1)
    state.batch_in_epoch = int(ckpt["batch_in_epoch"]) // saved_accum * cfg.grad_accum


def _seed_draws(
    model: nn.Module, ckpt: dict[str, Any] | None, cfg: TrainConfig, env: D.DistEnv
) -> None:
    """Layers whose draws must agree under DDP (batch-mode stochastic depth: every rank must skip
    the same blocks) draw from train.seed, salted by their kind (``_mix(seed, "stochastic_depth")``
    for the gates, the value runs always had); a resumed run then continues the layers' counters
    (after the seeding restarted the draw counters)."""
    kinds = sorted({m.kind for m in model.modules() if isinstance(m, SharedDraws)})
    for kind in kinds:
        if D.seed_shared_draws(model, _mix(cfg.seed, kind) % 2**31, env, kind=kind) is not None:
            log.info("%s: layers seeded from train.seed so that all ranks draw alike", kind)
    if ckpt is not None:
        _restore_layer_counters(ckpt, model, env)


def _start_training_rng(
    ckpt: dict[str, Any] | None, state: RunState, model: nn.Module, cfg: TrainConfig, env: D.DistEnv
) -> None:
    """The RNG stream of training starts here, identically for fresh and resumed runs."""
    if ckpt is not None:
        _restore_rank_state(ckpt, state.meters, model, env)
    else:
        seed_all(_mix(cfg.seed, env.rank, "train") % 2**31)


def _prepare(
    model: nn.Module,
    recipe: Any,
    data: Any,
    cfg: TrainConfig,
    env: D.DistEnv,
    *,
    out: Path | None,
    strict_lint: bool,
    apply: bool,
    allow_partial: bool,
    model_name: str | None,
    task: Any,
) -> tuple[str, DataBundle, Prepared]:
    """Seed, build the data, resize the head, retrofit and lint; ``out`` only on rank 0."""
    # Seeded before anything random happens: the new classifier's init, apply's verification.
    seed_all(cfg.seed + env.rank)
    model.to(env.device)
    arch = model_name or architecture_name(model)
    bundle = (
        data
        if isinstance(data, DataBundle)
        else task.build_data(
            data, model, cfg, rank=env.rank, world_size=env.world_size, device=env.device
        )
    )
    if bundle.task != task.name:
        raise DataError(
            f"data {bundle.source!r} is {bundle.task} data; the run's task is {task.name}"
        )
    count_steps(bundle, cfg)  # DataError before anything is written
    # Each rank seeds with seed + rank so that dropout masks and gates differ between ranks; the
    # heads they initialise differ too, until broadcast_state hands everyone rank 0's.
    task.resize_head(model, bundle.num_classes)
    if cfg.bn_momentum is not None:
        n = _set_bn_momentum(model, cfg.bn_momentum)
        if n == 0:
            log.warning("train.bn_momentum ignored: %s has no BatchNorm", type(model).__name__)
        else:
            log.info("train.bn_momentum: momentum %s on %d BatchNorm layers", cfg.bn_momentum, n)
    model.to(env.device)
    prep = prepare_model(
        model, recipe, cfg, bundle.input_size, device=env.device,
        out=out, strict_lint=strict_lint, apply=apply, allow_partial=allow_partial,
    )  # fmt: skip
    return arch, bundle, prep


def _set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """``momentum`` on every BatchNorm of ``model`` (not in the state_dict: a resumed run sets it
    again from its config); how many."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = momentum
    return len(norms)


def _training_wrapper(model: nn.Module, recipe: Any, cfg: TrainConfig, env: D.DistEnv) -> nn.Module:
    """What the steps call: the model, under DDP when distributed, compiled when asked."""
    train_model: nn.Module = model
    if env.distributed:
        train_model = D.wrap_ddp(
            model, env, find_unused_parameters=D.needs_find_unused(model, recipe)
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def _check_args(
    cfg: TrainConfig, env: D.DistEnv, out: Path | None, resume: bool, max_steps: int | None
) -> None:
    if resume and out is None:
        raise ValueError("resume=True needs the run directory (out=) that holds checkpoint.pt")
    if cfg.tensorboard and env.is_main and out is not None:
        require_tensorboard()
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")


def _read_checkpoint(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    if not path.is_file():
        log.info("no checkpoint at %s: starting from step 0", path)
        return None
    ckpt = load_checkpoint(path)
    log.info("resuming from %s at step %d", path, ckpt["step"])
    return ckpt


def _place(
    model: nn.Module, cfg: TrainConfig, env: D.DistEnv
) -> tuple[Precision, dict[str, type[nn.Module]]]:
    """Precision and memory format for the device; SyncBatchNorm under torchrun on CUDA."""
    precision = resolve_precision(cfg, env.device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    sync_bn: dict[str, type[nn.Module]] = {}
    if cfg.sync_bn and env.distributed:
        if env.device.type == "cuda":
            sync_bn = D.convert_sync_bn(model)
        else:
            log.warning("sync_bn ignored: SyncBatchNorm needs CUDA")
    return precision, sync_bn


def _optimization(
    model: nn.Module, cfg: TrainConfig, precision: Precision, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler | None, Any]:
    """timm's optimizer, per-update lr scheduler and EMA, and the grad scaler for fp16."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    optimizer = create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.resolved_warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )  # fmt: skip
    scaler = precision.make_scaler()
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    return optimizer, scheduler, scaler, ema


def _new_meters(device: torch.device) -> dict[str, Any]:
    return {"window_loss": torch.zeros((), device=device), "window_n": 0,
            "epoch_loss": torch.zeros((), device=device), "epoch_n": 0}  # fmt: skip


def _regularizers(model: nn.Module, recipe: Any, env: D.DistEnv) -> _Regularizers:
    specs = {name: getattr(recipe, name, None) if recipe is not None else None
             for name in TECHNIQUES}  # fmt: skip
    hooks = _Regularizers(
        layers=regularizer_layers(schedule.current_rates(model)),
        transforms=[
            t.input_transform(specs[name])
            for name, t in TECHNIQUES.items()
            if t.input_transform is not None and specs[name] is not None
        ],
    )
    if hooks.transforms:
        hooks.cut_gen = torch.Generator(device=env.device)
    return hooks


def _announce(run: _Run, resumed_at: int | None) -> None:
    """Plot the planned survival, and tell the console what the run is about to do."""
    if run.writes:
        plot_survival(run.prep.plan, run.out / "survival.png")
    cfg, bundle = run.cfg, run.bundle
    run.console.start(
        {
            "kind": "start",
            "model": run.arch,
            "task": run.task.name,
            "task_note": run.task_note,
            "plan": run.prep.plan_summary,
            "lint": run.prep.lint_verdict,
            "lint_findings": len(run.prep.findings),
            **bundle.describe(),
            "data": bundle.source,
            "epochs": cfg.epochs,
            "steps_per_epoch": run.steps_per_epoch,
            "total_steps": run.total_steps,
            "images_per_step": run.images_per_step,
            "opt": cfg.opt,
            "lr": cfg.lr,
            "sched": cfg.sched,
            "warmup_epochs": cfg.resolved_warmup_epochs,
            "device": str(run.env.device),
            "precision": run.precision.name,
            "processes": run.env.world_size,
            "workers": getattr(bundle.train, "workers", 0),
            "resumed_at": resumed_at,
            "out": str(run.out) if run.out is not None else None,
        }
    )


# --- steps ------------------------------------------------------------------------------------


def _run_epoch(run: _Run, state: RunState, stop: StopRequest) -> None:
    """Train until the epoch ends (then evaluate and checkpoint) or something stops the run."""
    cfg = run.cfg
    epoch_t0 = time.perf_counter()
    batches: Iterator = run.bundle.train.iter_epoch(state.epoch, state.batch_in_epoch)
    state.step_in_epoch = state.batch_in_epoch // cfg.grad_accum
    first_step = state.step
    bar = run.console.epoch_bar(state.epoch, cfg.epochs, run.steps_per_epoch, state.step_in_epoch)
    run.train_model.train()
    while state.step_in_epoch < run.steps_per_epoch:
        if run.max_steps is not None and state.step >= run.max_steps:
            state.stop_reason = "max_steps"
            break
        _step(run, state, batches)
        if bar is not None:
            bar.update(1)
        if _after_step(run, state, stop, bar):
            break
    if bar is not None:
        bar.close()
    if state.stop_reason is not None:
        _checkpoint(run, state, state.step_in_epoch * cfg.grad_accum)
        if run.writes:
            _plot_curves(run)
        return
    state.epoch += 1
    state.batch_in_epoch = 0
    seconds = time.perf_counter() - epoch_t0
    images_per_s = (state.step - first_step) * run.images_per_step / max(seconds, 1e-9)
    state.last_eval = _end_epoch(run, state, seconds, images_per_s)
    _checkpoint(run, state, 0)
    run.console.epoch(
        {**state.last_eval, **_planned(run), "checkpoint": _written(run.ckpt_path, run.writes)},
        epochs=cfg.epochs,
    )
    if run.writes and time.perf_counter() - epoch_t0 > LIVE_PLOT_EPOCH_S:
        _plot_curves(run)  # live curves for long epochs
    state.window_t0, state.window_steps = time.perf_counter(), 0


def _step(run: _Run, state: RunState, batches: Iterator) -> None:
    """One optimizer step and what follows it: counters, lr schedule, EMA, running loss sums."""
    run.prep.lifecycle.update(state.step / run.total_steps)  # retrofit.lifecycle: step 2
    loss_sum = _train_step(run, batches, state.step)
    state.step += 1
    state.step_in_epoch += 1
    state.window_steps += 1
    if run.scheduler is not None:
        run.scheduler.step_update(num_updates=state.step)
    if run.ema is not None:
        run.ema.update(run.model, step=state.step)
    meters = state.meters
    meters["window_loss"] += loss_sum
    meters["window_n"] += 1
    meters["epoch_loss"] += loss_sum
    meters["epoch_n"] += 1


def _after_step(run: _Run, state: RunState, stop: StopRequest, bar: Any) -> bool:
    """Log, look for a stop request, checkpoint mid-epoch; True when the run must stop."""
    cfg, step = run.cfg, state.step
    check_stop = not run.env.distributed or step % cfg.log_every == 0
    if step % cfg.log_every == 0:
        rec = _log_step(run, state)
        run.console.step(rec, bar, epochs=cfg.epochs, total_steps=run.total_steps)
        state.window_t0, state.window_steps = time.perf_counter(), 0
    if check_stop and D.any_rank(stop.requested, run.env):
        state.stop_reason = stop.signal_name or "signal"
        return True
    if (
        cfg.checkpoint_every
        and step % cfg.checkpoint_every == 0
        and (state.step_in_epoch < run.steps_per_epoch)
    ):
        _checkpoint(run, state, state.step_in_epoch * cfg.grad_accum)
    return False


# --- finish -----------------------------------------------------------------------------------


def _finish(run: _Run, state: RunState) -> RunResult:
    """Stopped by a signal: the instrumented model, resumable. Otherwise (done, or at max_steps):
    the original architecture with the trained weights, exported."""
    completed = state.epoch >= run.cfg.epochs
    run.metrics.close()
    fields = dict(model=run.model, out=run.out, num_classes=run.bundle.num_classes, step=state.step,
                  total_steps=run.total_steps, epoch=state.epoch, stop_reason=state.stop_reason,
                  config=run.cfg, metrics=state.last_eval, history=run.metrics.records,
                  findings=run.prep.findings, plan=run.prep.plan)  # fmt: skip
    if state.stop_reason is not None and state.stop_reason != "max_steps":
        (log.warning if run.env.is_main else log.debug)(
            "stopped by %s at step %d; resume with resume=True (--resume)",
            state.stop_reason,
            state.step,
        )
        result = RunResult(**fields, completed=False, checkpoint=run.ckpt_path)
    else:
        _hand_back(run)
        weights = _export(run, state, completed) if run.writes else None
        D.barrier(run.env)
        checkpoint = run.ckpt_path if run.out is not None else None
        result = RunResult(**fields, completed=completed, weights=weights, checkpoint=checkpoint)
    result.seconds = time.perf_counter() - run.started
    run.console.finish(result_record(result))
    return result


def _hand_back(run: _Run) -> None:
    """Model (and EMA): buffers synced across ranks, SyncBatchNorm reverted, retrofit stripped."""
    env, ema = run.env, run.ema
    D.sync_buffers(run.model, env)
    if ema is not None:
        D.sync_buffers(ema.module, env)
    for m in (run.model, ema.module if ema is not None else None):
        if m is None:
            continue
        if run.sync_bn:
            D.revert_sync_bn(m, run.sync_bn)
        run.prep.lifecycle.strip(m)  # retrofit.lifecycle, step 4 (a no-op if never retrofitted)
        if run.precision.channels_last:
            m.to(memory_format=torch.contiguous_format)


def _export(run: _Run, state: RunState, completed: bool) -> Path:
    bundle = run.bundle
    meta = {
        "architecture": run.arch,
        "task": bundle.task,
        "num_classes": bundle.num_classes,
        "input_size": list(bundle.input_size),
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "class_names": list(bundle.class_names),
        "data": bundle.source,
        "step": state.step,
        "epoch": state.epoch,
        "completed": completed,
        "recipe": recipe_dict(run.recipe, run.cfg),
        "metrics": state.last_eval,
    }
    weights = export_weights(run.model, run.out, meta)
    if run.ema is not None:
        export_weights(run.ema.module, run.out, meta, name="model_ema.safetensors")
    _plot_curves(run)
    plot_survival(
        run.prep.plan,
        run.out / "survival.png",
        records=run.metrics.records,
        layers=run.regularizers.layers,
    )
    return weights


def _plot_curves(run: _Run) -> None:
    plot_curves(run.metrics.records, run.out / "curves.png", layers=run.regularizers.layers)


def _train_step(run: _Run, batches: Iterator, step: int) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (on device)."""
    cfg, env, precision, hooks = run.cfg, run.env, run.precision, run.regularizers
    optimizer, scaler, train_model = run.optimizer, run.scaler, run.train_model
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(cfg.grad_accum):
        x, y = next(batches)
        x, y = run.task.to_device(x, y, env.device, precision)
        if hooks.transforms:
            hooks.cut_gen.manual_seed(_mix(cfg.seed, env.rank, step, micro))
            x = run.task.map_images(x, functools.partial(_transform, hooks))
        # DDP all-reduces gradients in backward; skip it on all but the last micro-batch.
        last = micro == cfg.grad_accum - 1
        sync = (
            nullcontext() if last or not hasattr(train_model, "no_sync") else train_model.no_sync()
        )
        with sync:
            with precision.autocast():
                loss = run.task.loss(train_model, x, y, run.criterion)
            scaled = loss / cfg.grad_accum if cfg.grad_accum > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
    if cfg.clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / cfg.grad_accum if cfg.grad_accum > 1 else loss_sum


def _transform(hooks: _Regularizers, x: torch.Tensor) -> torch.Tensor:
    for transform in hooks.transforms:
        x = transform(x, hooks.cut_gen)
    return x


def _log_step(run: _Run, state: RunState) -> dict[str, Any]:
    env, meters = run.env, state.meters
    loss = D.all_reduce_sum(meters["window_loss"].detach().clone(), env).item() / (
        meters["window_n"] * env.world_size
    )
    # Read the clock after .item(): it waits for the device, so the window's time is the GPU's too.
    seconds = time.perf_counter() - state.window_t0
    meters["window_loss"].zero_()
    meters["window_n"] = 0
    rec: dict[str, Any] = {
        "kind": "step",
        "step": state.step,
        "epoch": state.epoch + state.step_in_epoch / run.steps_per_epoch,
        "loss": loss,
        "lr": max(g["lr"] for g in run.optimizer.param_groups),
        "images_per_s": state.window_steps * run.images_per_step / max(seconds, 1e-9),
    }
    # retrofit.lifecycle, step 3: kept_fraction is per log window (since the previous log step).
    report = run.prep.lifecycle.report()
    if report is not None and report.layers:
        # Every technique's logged scalars (sd_kept, keep_prob …), None where it has no layers.
        rec.update({key: report.means.get(key) for key in logged()}, rates=report.blocks)
    return run.metrics.write(rec)


def _end_epoch(run: _Run, state: RunState, seconds: float, images_per_s: float) -> dict[str, Any]:
    env, meters, model, ema = run.env, state.meters, run.model, run.ema
    train_loss = D.all_reduce_sum(meters["epoch_loss"].detach().clone(), env).item() / max(
        meters["epoch_n"] * env.world_size, 1
    )
    meters["epoch_loss"].zero_()
    meters["epoch_n"] = 0
    D.sync_buffers(model, env)
    eval_t0 = time.perf_counter()
    ev = _evaluate(run, model)
    rec: dict[str, Any] = {
        "kind": "epoch",
        "step": state.step,
        "epoch": state.epoch,
        "train_loss": train_loss,
        **run.task.epoch_fields(ev),
        "lr": max(g["lr"] for g in run.optimizer.param_groups),
        "epoch_time": seconds,
        "images_per_s": images_per_s,
    }
    if ema is not None:
        D.sync_buffers(ema.module, env)
        ev_ema = _evaluate(run, ema.module)
        rec.update(run.task.epoch_fields(ev_ema, "ema_val_"))
    rec["eval_time"] = time.perf_counter() - eval_t0
    rec.update(_epoch_rates(run.metrics.records, state.step))
    return run.metrics.write(rec)


def _evaluate(run: _Run, model: nn.Module) -> dict[str, float]:
    bar = run.console.eval_bar(run.bundle.val.num_batches)
    try:
        return run.task.evaluate(model, run.bundle.val, run.env, run.precision, bar=bar,
                                 num_classes=run.bundle.num_classes)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()


def _epoch_rates(records: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """An epoch's figures from the step records written since the previous epoch record: each
    technique's logged scalars (the mean kept fraction, DropBlock's keep_prob at its end …)."""
    since = next((r["step"] for r in reversed(records) if r.get("kind") == "epoch"), 0)
    steps = [r for r in records if r.get("kind") == "step" and since < r["step"] <= step]
    return epoch_figures(steps)


def _planned(run: _Run) -> dict[str, Any]:
    """The plan's planned figures (mean survival p_l …), to read the measured ones against."""
    return planned_figures((run.prep.plan or {}).get("edits", []))


def _written(path: Path | None, writes: bool) -> str | None:
    return path.name if path is not None and writes else None


def _checkpoint(run: _Run, state: RunState, batch_in_epoch: int) -> None:
    path, env, model = run.ckpt_path, run.env, run.model
    if path is None:
        return
    # Every rank's RNG and running sums are gathered (a collective: all ranks call this).
    per_rank = D.gather_objects(
        {
            "rng": capture_rng(env.device),
            "meters": {
                k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in state.meters.items()
            },
            "gates": _layer_counters(model),  # the key of old checkpoints
            "generators": {k: g.get_state() for k, g in _private_generators(model).items()},
        },
        env,
    )
    if run.writes:
        state_dict = {
            "format": FORMAT,
            "version": VERSION,
            "model": model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "per_rank": per_rank,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": batch_in_epoch,
            "world_size": env.world_size,
            "steps_per_epoch": run.steps_per_epoch,
            "launch": _launch_record(),
            "num_classes": run.bundle.num_classes,
            "config": run.cfg.to_dict(),
        }
        save_checkpoint(state_dict, path)
    D.barrier(env)


def _check_same_checkpoint(ckpt: dict[str, Any] | None, path: Path | None, env: D.DistEnv) -> None:
    """Every process resumes from the same step (``--out`` on storage all nodes read), or none."""
    if not env.distributed:
        return
    steps = D.gather_objects(None if ckpt is None else int(ckpt["step"]), env)
    if len(set(steps)) > 1:
        seen = ", ".join(
            f"rank {r}: {'no checkpoint' if s is None else f'step {s}'}"
            for r, s in enumerate(steps)
        )
        raise ModelError(
            f"checkpoint {str(path)!r} differs between the processes ({seen}); put --out on "
            "storage that every node reads, so that all of them resume from one checkpoint"
        )


def _launch_record() -> dict[str, list[str]] | None:
    launch = D.launch_command()
    return None if launch is None else {"launcher": launch[0], "entry": launch[1]}


def _check_resume_world(
    ckpt: dict[str, Any], path: Path | None, cfg: TrainConfig, env: D.DistEnv, steps_per_epoch: int
) -> None:
    """A checkpoint of another number of processes continues only with the same global batch.

    The sampler deals one permutation per epoch (``seed + epoch``) round-robin over the ranks,
    so an optimizer step of ``world × batch_size × grad_accum`` images trains the same images
    whatever the split: with the same product the step count, the lr schedule and the data
    position carry over (RNG streams and per-process BatchNorm batches do not: not bit-exact).
    Any other product would put the schedule's position and the data's out of step; refused,
    saying how to continue.
    """
    saved_world = int(ckpt.get("world_size") or len(ckpt.get("per_rank") or []) or 1)
    if saved_world == env.world_size:
        return
    saved = ckpt.get("config") or {}
    saved_batch = int(saved.get("batch_size", cfg.batch_size))
    saved_accum = int(saved.get("grad_accum", 1) or 1)
    saved_global = saved_world * saved_batch * saved_accum
    now_global = env.world_size * cfg.batch_size * cfg.grad_accum
    saved_steps = ckpt.get("steps_per_epoch")
    if now_global == saved_global and saved_steps in (None, steps_per_epoch):
        log.warning(
            "checkpoint from %d process(es), resuming with %d at the same %d images per step: "
            "the same images in each step and the same schedule, not bit-exact",
            saved_world,
            env.world_size,
            now_global,
        )
        return
    per_process = env.world_size * cfg.grad_accum
    batch_size = saved_global // per_process if saved_global % per_process == 0 else None
    record = ckpt.get("launch")
    if record:
        launch = (list(record["launcher"]), list(record["entry"]))
    elif saved_world > 1:
        launch = (["torchrun", "--nproc_per_node", str(saved_world)], ["-m", "retrofit.cli"])
    else:
        launch = None
    how = f"resume it with {saved_world} process(es)"
    if batch_size is not None:
        how += f", or with {env.world_size} and batch_size {batch_size} (the same global batch)"
    raise ResumeError(
        f"checkpoint {str(path)!r} is of a run with {saved_world} process(es) × batch_size "
        f"{saved_batch}{f' × grad_accum {saved_accum}' if saved_accum > 1 else ''} = "
        f"{saved_global} images per step; this run has {env.world_size} × {cfg.batch_size}"
        f"{f' × grad_accum {cfg.grad_accum}' if cfg.grad_accum > 1 else ''} = {now_global}, "
        f"so its lr schedule and data position would not continue where that run stopped; {how}",
        launch=launch,
        batch_size=batch_size,
    )


def _load_training_state(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    ema: Any,
    bundle: DataBundle,
    cfg: TrainConfig,
    env: D.DistEnv,
) -> None:
    if ckpt.get("num_classes") != bundle.num_classes:
        raise ModelError(
            f"checkpoint was trained for {ckpt.get('num_classes')} classes, the data has {bundle.num_classes}"
        )
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"checkpoint does not fit {type(model).__name__} with this recipe: {e}"
        ) from None
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    # A world-size change that kept the global batch (checked before) changes batch_size alone.
    same_world = int(ckpt.get("world_size") or env.world_size) == env.world_size
    changed = {
        k: (v, getattr(cfg, k, None))
        for k, v in ckpt.get("config", {}).items()
        if getattr(cfg, k, None) != v and (same_world or k not in ("batch_size", "grad_accum"))
    }
    if changed:
        log.warning(
            "resuming with changed train settings (the run will not match the original): %s",
            changed,
        )


def _restore_rank_state(
    ckpt: dict[str, Any], meters: dict[str, Any], model: nn.Module, env: D.DistEnv
) -> None:
    per_rank = ckpt.get("per_rank") or []
    if len(per_rank) != env.world_size:
        # Another world size (same global batch, checked in _setup): the RNG streams cannot
        # continue, so reseed deterministically; the running loss sums are shared out so that
        # the epoch's mean (sum over ranks / (n × world)) stays the mean of the steps done.
        seed_all(_mix(int(ckpt["step"]), env.rank, "resume") % 2**31)
        if per_rank:
            for k, v in per_rank[0]["meters"].items():
                if isinstance(v, torch.Tensor):
                    total = sum(r["meters"][k] for r in per_rank) / len(per_rank)
                    meters[k] = total.to(env.device)
                else:
                    meters[k] = v
        return
    mine = per_rank[env.rank]
    restore_rng(mine["rng"], env.device)
    for k, v in mine["meters"].items():
        meters[k] = v.to(env.device) if isinstance(v, torch.Tensor) else v
    generators = _private_generators(model)
    for key, state in mine.get("generators", {}).items():
        if key in generators:
            generators[key].set_state(state)


def _restore_layer_counters(ckpt: dict[str, Any], model: nn.Module, env: D.DistEnv) -> None:
    """Put back the ``Resumable`` layers' counters (after :func:`D.seed_shared_draws` restarted
    the draw counters): this rank's record, or rank 0's when the world size changed (``own``
    False: only counters the ranks share come back). The key stays ``"gates"``, so checkpoints
    of earlier versions resume and earlier versions resume these."""
    per_rank = ckpt.get("per_rank") or []
    own = len(per_rank) == env.world_size
    mine = per_rank[env.rank] if own else (per_rank or [{}])[0]
    for name, counters in mine.get("gates", {}).items():
        layer = model.get_submodule(name)
        if not isinstance(layer, Resumable):
            raise ModelError(
                f"the checkpoint holds counters for {name}, but this model's "
                f"{type(layer).__name__} keeps none: it was written with another recipe"
            )
        layer.restore_counters(counters, own=own)
