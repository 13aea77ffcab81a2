"""timm's ``train.py``: the two-line hook.

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

Put line 1 before the model is moved to the GPU, wrapped in DDP or compiled (``apply`` verifies
the eval output on a probe batch; the gates add no parameters). With batch-mode stochastic depth
under DDP, also pass ``find_unused_parameters=True`` to timm's DDP wrap and set
``stochastic_depth.seed``. Checkpoints ``CheckpointSaver`` writes need nothing: the state_dict has
the original keys. Before exporting the model itself (``torch.jit``, ONNX, ``torch.save(model)``)
call ``retrofit.strip(model)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from retrofit.integrations import progress
from retrofit.schedule import update

__all__ = ["ScheduledLR", "scheduled"]


class ScheduledLR:
    """timm's lr scheduler, plus ``retrofit.schedule.update`` on every step.

    Every attribute and method other than ``step``/``step_update`` is the wrapped scheduler's
    (``state_dict``, ``get_last_lr`` …); ``scheduler`` is that object (None when the script runs
    without an lr schedule: then only the regularizers are stepped).
    """

    def __init__(
        self, scheduler: Any, model: nn.Module, *, num_epochs: int, updates_per_epoch: int
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
        self.progress = 0.0
        update(model, 0.0)  # the first step runs before the first step_update

    def step_update(self, num_updates: int, metric: Any = None) -> None:
        # Called after update number ``num_updates``: the next step runs at that progress.
        self.progress = progress(num_updates, self.total_updates)
        update(self.model, self.progress)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=num_updates, metric=metric)

    def step(self, epoch: int, metric: Any = None) -> None:
        self.progress = progress(epoch * self.updates_per_epoch, self.total_updates)
        update(self.model, self.progress)
        if self.scheduler is not None:
            self.scheduler.step(epoch, metric)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set above: everything else is the wrapped scheduler's.
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None:
            raise AttributeError(name)
        return getattr(scheduler, name)


def scheduled(
    lr_scheduler: Any, model: nn.Module, *, num_epochs: int, updates_per_epoch: int
) -> ScheduledLR:
    """Hook line 2 for timm's ``train.py`` (module docstring): ``lr_scheduler`` as before, and
    every ``step_update``/``step`` also sets the regularizers' rates of ``model`` for
    t = updates / (num_epochs · updates_per_epoch)."""
    return ScheduledLR(
        lr_scheduler, model, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch
    )
