"""One run of a comparison through the trainer, resumable, and the record it leaves.

A run lives in ``out/runs/<variant>/seed<k>/``: the trainer's own run directory (recipe.yaml,
plan.json, metrics.jsonl, checkpoint.pt, model.safetensors) plus two files of ours:

* ``run.json``, written before training: the run's fingerprint (and the cost of earlier,
  interrupted attempts);
* ``result.json``, written atomically after training: the record the table is made of.

What happens on a later invocation, in order:

1. ``result.json`` with the same fingerprint: the run is finished, nothing is redone;
2. ``run.json`` with the same fingerprint and a ``checkpoint.pt``: the run was interrupted and
   resumes from its checkpoint (the trainer's resume is exact on CPU: the same numbers as an
   uninterrupted run);
3. anything else (settings changed, an unreadable checkpoint, a directory without ``run.json``):
   the directory is removed and the run starts from scratch.

The checkpoint is deleted once ``result.json`` is written (the stripped weights stay): a
comparison of many runs would otherwise keep every optimizer state on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from retrofit.compare.variants import RunSpec, file_digest

log = logging.getLogger("retrofit.compare")

RESULT_NAME = "result.json"
RUN_NAME = "run.json"


class Interrupted(Exception):
    """The trainer stopped a run early (SIGINT/SIGTERM); rerunning the comparison resumes it."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    from retrofit.train.checkpoint import atomic_write

    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def finished(spec: RunSpec, fingerprint: str) -> dict[str, Any] | None:
    """The run's record if it finished with these settings, else None."""
    rec = _read_json(spec.dir / RESULT_NAME)
    return rec if rec is not None and rec.get("fingerprint") == fingerprint else None


def device_type(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def weights_digest(weights: str | None) -> str | None:
    return file_digest(weights) if weights else None


def run(spec: RunSpec, fingerprint: str) -> dict[str, Any]:
    """Train one run (or resume it) and return its record; see the module docstring.

    Raises:
        Interrupted: the trainer stopped on a signal; its checkpoint is saved for the next call.
    """
    done = finished(spec, fingerprint)
    if done is not None:
        return done
    d = spec.dir
    prior = _read_json(d / RUN_NAME) if d.exists() else None
    resume = (
        prior is not None
        and prior.get("fingerprint") == fingerprint
        and (d / "checkpoint.pt").is_file()
    )
    if not resume:
        if prior is not None and prior.get("fingerprint") != fingerprint:
            log.warning("%s: settings changed since it ran; starting it again", spec.label)
        prior = _start_over(spec, fingerprint)
    assert prior is not None
    from retrofit.errors import ModelError

    try:
        return _train(spec, fingerprint, prior, resume)
    except ModelError as e:
        if not resume:
            raise
        # An unreadable or foreign checkpoint: the run cannot continue, so it starts over.
        log.warning("%s: cannot resume (%s); starting it again", spec.label, e)
        return _train(spec, fingerprint, _start_over(spec, fingerprint), False)


def _start_over(spec: RunSpec, fingerprint: str) -> dict[str, Any]:
    """An empty run directory holding only ``run.json`` (whatever was there is removed)."""
    if spec.dir.exists():
        shutil.rmtree(spec.dir)
    spec.dir.mkdir(parents=True)
    prior = {"fingerprint": fingerprint, "attempts": [], "variant": spec.variant.name}
    write_json(spec.dir / RUN_NAME, prior)
    return prior


def _train(spec: RunSpec, fingerprint: str, prior: dict[str, Any], resume: bool) -> dict[str, Any]:
    from retrofit.train import loop

    recipe, cfg, model, model_spec, task, bundle = _build(spec)
    device = _torch_device(spec.settings.device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = loop.fit(
        model, recipe, bundle, out=spec.dir, device=device, resume=resume, progress=False,
        config=cfg, model_name=model_spec,
    )  # fmt: skip
    attempt = {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}
    attempt |= {"resumed": resume, "step": result.step}
    attempts = [*prior.get("attempts", []), attempt]
    if not result.completed:
        prior["attempts"] = attempts
        write_json(spec.dir / RUN_NAME, prior)
        raise Interrupted(
            f"{spec.label} stopped at step {result.step}/{result.total_steps} "
            f"({result.stop_reason}); run the same command again to resume it"
        )
    rec = _record(spec, fingerprint, result, task, bundle, model_spec, attempts)
    write_json(spec.dir / RESULT_NAME, rec)
    (spec.dir / "checkpoint.pt").unlink(missing_ok=True)
    return rec


def _torch_device(name: str | None) -> Any:
    """The settings' device (None: the trainer's default)."""
    import torch

    return torch.device(name) if name else None


def _build(spec: RunSpec) -> tuple[Any, Any, Any, str, Any, Any]:
    """One run's recipe, train config, model (weights seeded by the run's seed, or loaded), the
    model's spec, its task and the task's data."""
    import torch

    from retrofit.models import create_model
    from retrofit.recipe import Recipe
    from retrofit.train.prepare import train_config_of
    from retrofit.train.tasks import get_task, resolve_task
    from retrofit.weights import load_weights

    s = spec.settings
    recipe = Recipe.from_dict(spec.variant.recipe_for(spec.seed))
    cfg = train_config_of(recipe)
    # The weights of a model built from scratch are a function of the seed too.
    torch.manual_seed(spec.seed)
    model, info = create_model(s.model, pretrained=s.pretrained, kwargs=spec.model_kwargs())
    if s.weights:
        load_weights(model, s.weights)
    # The task (classification, detection, segmentation) decides the data and the compared
    # metric: top-1, COCO mAP or mIoU (retrofit.train.tasks).
    task = get_task(resolve_task(None, model)[0])
    device = _torch_device(s.device) or device_type(None)
    bundle = task.build_data(s.data, model, cfg, device=device)
    return recipe, cfg, model, info.spec, task, bundle


def _record(
    spec: RunSpec,
    fingerprint: str,
    result: Any,
    task: Any,
    bundle: Any,
    model_spec: str,
    attempts: list[dict[str, Any]],
) -> dict[str, Any]:
    """The finished run's result.json: the compared metric on the validation and the training
    data, the run's cost over all its attempts, its edits and where it ran."""
    import torch

    train_acc = train_metric(task, result.model, bundle)
    epochs = [h for h in result.history if h.get("kind") == "epoch"]
    edits = (result.plan or {}).get("edits", [])
    kinds: dict[str, int] = {}
    for e in edits:
        kinds[e.get("kind", "?")] = kinds.get(e.get("kind", "?"), 0) + 1
    test_acc = float(result.metrics[task.metric]) / 100.0
    return {
        "variant": spec.variant.name,
        "metric": task.metric,
        "seed": spec.seed,
        "fingerprint": fingerprint,
        "test_acc": test_acc,
        "train_acc": train_acc,
        "gap": train_acc - test_acc if train_acc is not None else None,
        "val_loss": result.metrics.get("val_loss"),
        "epochs": result.epoch,
        "steps": result.step,
        "epoch_s": statistics.fmean(e["epoch_time"] for e in epochs) if epochs else None,
        "wall_s": sum(a["wall_s"] for a in attempts),
        "cpu_s": sum(a["cpu_s"] for a in attempts),
        "resumed": any(a["resumed"] for a in attempts),
        "edits": len(edits),
        "edit_kinds": kinds,
        "data": bundle.source,
        "train_samples": bundle.train.num_samples,
        "val_samples": bundle.val.num_samples,
        "model": model_spec,
        "model_kwargs": spec.model_kwargs(),
        "recipe": spec.variant.recipe_for(spec.seed),
        "device": str(_device_of(result.model)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


METRIC_NAMES = {"val_top1": "accuracy", "val_map": "mAP", "val_miou": "mIoU"}


def metric_name(records: list[dict[str, Any]]) -> str:
    """What ``test_acc`` / ``train_acc`` measure in these records (older records: accuracy)."""
    keys = {r.get("metric", "val_top1") for r in records}
    return METRIC_NAMES.get(keys.pop(), "metric") if len(keys) == 1 else "metric"


def train_metric(task: Any, model: Any, bundle: Any) -> float | None:
    """The task's metric (a fraction) on the training split in eval mode, without augmentation."""
    if task.name == "classification":
        return accuracy(model, bundle.train_eval(), _device_of(model))
    from retrofit.finetune_config import TrainConfig
    from retrofit.train import distributed as D
    from retrofit.train.precision import resolve_precision

    env = D.DistEnv(device=_device_of(model))
    precision = resolve_precision(TrainConfig(amp="off", channels_last=False), env.device)
    ev = task.evaluate(model, bundle.train_eval(), env, precision, num_classes=bundle.num_classes)
    return ev[task.metric.removeprefix("val_")] / 100.0


def accuracy(model: Any, batches: Any, device: Any) -> float | None:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode over ``batches``; None if empty."""
    import torch

    from retrofit.train.outputs import logits_of

    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches.iter_epoch():
            x, y = x.to(device), y.to(device)
            correct += int((logits_of(model(x)).argmax(1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    return correct / total if total else None


def _device_of(model: Any) -> Any:
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
