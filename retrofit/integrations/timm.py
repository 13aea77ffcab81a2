"""timm's ``train.py``: the two-line hook, and a third line for ``summary.csv``.

timm's training script builds the model, then its lr scheduler, and calls
``lr_scheduler.step_update(num_updates=...)`` after every optimizer update and
``lr_scheduler.step(epoch)`` at every epoch boundary (and once when it resumes). Wrapping that
scheduler is the one place that sees training progress without editing the loop::

    import retrofit.integrations.timm                                   # at the top
    model = create_model(args.model, ...)                               # timm's line
    model = retrofit.apply(model, "recipe.yaml")                        # hook line 1
    ...
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, ...)      # timm's line
    lr_scheduler = retrofit.integrations.timm.scheduled(                # hook line 2
        lr_scheduler, model, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch)
    ...
    train_metrics = train_one_epoch(...)                                # timm's line
    train_metrics.update(lr_scheduler.retrofit_metrics())               # line 3 (summary.csv)

With the two lines the regularizers follow the schedule, and timm's log (its console and
``--log-path`` file: logger ``retrofit.integrations.timm`` through the root handler that timm's
``setup_default_logging`` installs) gets, from the process of rank 0, the plan summary and lint
verdict once (``retrofit plan: …``, ``retrofit lint: …``) and at every epoch boundary the figures
the CLI prints (``retrofit: epoch 3: kept 0.93 (planned 0.95), survival 0.95, DropBlock keep_prob
0.900``). ``summary.csv`` is written by ``timm.utils.update_summary`` from the dict that
``train_one_epoch`` returns, which nothing outside the loop can reach: line 3 adds the epoch's
``sd_kept``, ``sd_planned``, ``sd_survival`` and ``keep_prob``, which become the columns
``train_sd_kept`` … (and go to W&B with ``--log-wandb``, which logs the same row).

Put line 1 before the model is moved to the GPU, wrapped in DDP or compiled (``apply`` verifies
the eval output on a probe batch; the gates add no parameters). With batch-mode stochastic depth
under DDP, also pass ``find_unused_parameters=True`` to timm's DDP wrap and set
``stochastic_depth.seed``. Checkpoints ``CheckpointSaver`` writes need nothing: the state_dict has
the original keys. Before exporting the model itself (``torch.jit``, ONNX, ``torch.save(model)``)
call ``retrofit.strip(model)``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from retrofit.integrations import is_rank_zero, progress
from retrofit.lifecycle import Lifecycle, Report

__all__ = ["ScheduledLR", "scheduled"]

log = logging.getLogger("retrofit.integrations.timm")


class ScheduledLR:
    """timm's lr scheduler, plus ``retrofit.schedule.update`` on every step and the run's
    retrofit figures in timm's log.

    Every attribute and method other than ``step``/``step_update``/``retrofit_metrics`` is the
    wrapped scheduler's (``state_dict``, ``get_last_lr`` …); ``scheduler`` is that object (None
    when the script runs without an lr schedule: then only the regularizers are stepped).
    ``lifecycle`` is the :class:`~retrofit.lifecycle.Lifecycle` of ``model`` (already retrofitted
    by hook line 1); ``last_report`` the latest epoch's :class:`~retrofit.lifecycle.Report`
    (``blocks``: the per-layer rates).
    """

    def __init__(
        self,
        scheduler: Any,
        model: nn.Module,
        *,
        num_epochs: int,
        updates_per_epoch: int,
        per_block: bool = False,
    ) -> None:
        if num_epochs < 1 or updates_per_epoch < 1:
            raise ValueError(
                f"num_epochs and updates_per_epoch have to be >= 1, but got {num_epochs} and "
                f"{updates_per_epoch}"
            )
        self.scheduler = scheduler
        self.model = model
        self.total_updates = num_epochs * updates_per_epoch
        self.updates_per_epoch = updates_per_epoch
        self.per_block = per_block
        self.last_report: Report | None = None
        self._taken: Report | None = None  # the epoch's report, once retrofit_metrics took it
        self.lifecycle = Lifecycle()
        # The model was retrofitted by hook line 1: adopt it (lint it, set the rates of step 0).
        start = self.lifecycle.start(model, apply=False, t=0.0)
        if is_rank_zero():
            if start.plan is None:
                log.warning(
                    "retrofit: %s is not retrofitted, so the schedules have nothing to drive: "
                    "call model = retrofit.apply(model, recipe) before scheduled()",
                    type(model).__name__,
                )
            for line in start.lines():
                log.info("retrofit %s", line)

    @property
    def progress(self) -> float:
        return self.lifecycle.progress

    def step_update(self, num_updates: int, metric: Any = None) -> None:
        # Called after update number ``num_updates``: the next step runs at that progress.
        self.lifecycle.update(progress(num_updates, self.total_updates))
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=num_updates, metric=metric)

    def step(self, epoch: int, metric: Any = None) -> None:
        # train.py calls step(e + 1) when epoch e ends (and step(start) when it resumes).
        report = self._taken or self.lifecycle.report()
        self._taken = None
        if report is not None:
            self.last_report = report
            if is_rank_zero():
                log.info("retrofit: epoch %d: %s", epoch - 1, report.line())
        self.lifecycle.update(progress(epoch * self.updates_per_epoch, self.total_updates),
                              new_step=False)  # fmt: skip
        if self.scheduler is not None:
            self.scheduler.step(epoch, metric)

    def retrofit_metrics(self) -> dict[str, float]:
        """Hook line 3: the epoch's figures for ``train_metrics`` (so for ``summary.csv``):
        ``sd_kept``, ``sd_planned``, ``sd_survival``, ``keep_prob`` (and every layer's with
        ``per_block``). Call it once per epoch, after ``train_one_epoch``; the epoch's log line
        reports the same numbers."""
        report = self._taken or self.lifecycle.report()
        if report is None:
            return {}
        self._taken = report
        return report.scalars(prefix="", per_block=self.per_block)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set above: everything else is the wrapped scheduler's.
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None:
            raise AttributeError(name)
        return getattr(scheduler, name)


def scheduled(
    lr_scheduler: Any,
    model: nn.Module,
    *,
    num_epochs: int,
    updates_per_epoch: int,
    per_block: bool = False,
) -> ScheduledLR:
    """Hook line 2 for timm's ``train.py`` (module docstring): ``lr_scheduler`` as before, and
    every ``step_update``/``step`` also sets the regularizers' rates of ``model`` for
    t = updates / (num_epochs · updates_per_epoch); the plan, the lint verdict and each epoch's
    figures go to timm's log."""
    return ScheduledLR(
        lr_scheduler, model, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch,
        per_block=per_block,
    )  # fmt: skip
