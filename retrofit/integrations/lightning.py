"""PyTorch Lightning: :class:`RetrofitCallback`.

    from retrofit.integrations.lightning import RetrofitCallback

    trainer = lightning.Trainer(max_epochs=10, callbacks=[RetrofitCallback("recipes/sd.yaml")])
    trainer.fit(lit_module)          # lit_module.model is retrofitted, trained, stripped

What it does, in Lightning's hooks (see ``retrofit.integrations`` for the contract):

* ``setup(stage="fit")``: ``retrofit.apply`` on the LightningModule's ``module`` attribute
  (``"model"`` when it has one, else the LightningModule itself). ``setup`` runs before the
  strategy moves the model, wraps it in DDP and builds the optimizers, so the rewrite is in place
  before anything holds a reference to the old forward; the gates add no parameters, so the
  optimizer is unaffected either way.
* ``on_train_batch_start``: ``retrofit.schedule.update(model, global_step / estimated_stepping_batches)``.
* ``on_train_batch_end``: ``retrofit/sd_survival``, ``retrofit/sd_kept`` and
  ``retrofit/keep_prob`` through ``LightningModule.log_dict`` (so to whatever logger the Trainer
  has); the kept-fraction window restarts every ``log_every_n_steps`` steps.
* ``on_fit_end`` and ``on_exception``: ``retrofit.strip``; ``trainer.save_checkpoint`` during fit
  needs nothing (the state_dict has the original keys), and what ``to_onnx``/``to_torchscript``
  see after fit is the original architecture.

Batch-mode stochastic depth under DDP skips branches: use
``strategy=DDPStrategy(find_unused_parameters=True)`` and a ``stochastic_depth.seed`` so that
every rank skips the same ones.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from retrofit.api import apply
from retrofit.integrations import logged, progress, reset_gate_stats, target_module
from retrofit.recipe import Recipe, load_recipe
from retrofit.rewrite import is_retrofitted, strip
from retrofit.schedule import update

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError(
            "retrofit.integrations.lightning needs PyTorch Lightning: "
            "pip install 'retrofit[lightning]'"
        ) from e

__all__ = ["RetrofitCallback"]


class RetrofitCallback(Callback):
    """Apply a recipe at fit start, drive its schedules, log its rates, strip at the end.

    Args:
        recipe: a recipe path, dict or :class:`~retrofit.Recipe`.
        module: attribute path of the network inside the LightningModule (``"model"``,
            ``"net.backbone"``); None: ``"model"`` if the LightningModule has it, else itself.
        example_input: probe input for the eval-equivalence check (see ``retrofit.apply``).
        verify: check that the eval output is unchanged (``retrofit.apply``'s ``verify``).
        log: log the rates through ``LightningModule.log_dict``.
    """

    def __init__(
        self,
        recipe: Recipe | dict | str,
        *,
        module: str | None = None,
        example_input: Any = None,
        verify: bool = True,
        log: bool = True,
    ) -> None:
        super().__init__()
        self.recipe = load_recipe(recipe)
        self.module = module
        self.example_input = example_input
        self.verify = verify
        self.log = log
        self.progress = 0.0
        self._target: nn.Module | None = None

    def _resolve(self, pl_module: nn.Module) -> nn.Module:
        name = self.module
        if name is None:
            name = "model" if isinstance(getattr(pl_module, "model", None), nn.Module) else ""
        return target_module(pl_module, name)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        target = self._resolve(pl_module)
        apply(target, self.recipe, example_input=self.example_input, verify=self.verify)
        self._target = target
        self.progress = 0.0
        update(target, 0.0)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._target is None:
            return
        self.progress = progress(trainer.global_step, trainer.estimated_stepping_batches)
        update(self._target, self.progress)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._target is None or not self.log:
            return
        values = logged(self._target)
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, logger=True)
        if trainer.global_step % max(int(trainer.log_every_n_steps), 1) == 0:
            reset_gate_stats(self._target)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._strip()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._strip()

    def _strip(self) -> None:
        if self._target is not None and is_retrofitted(self._target):
            strip(self._target)
        self._target = None

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """What a Lightning checkpoint records about the retrofit: the resolved recipe and the
        training progress it had reached (the model's own state_dict needs no change)."""
        return {"recipe": self.recipe.to_dict(), "progress": self.progress}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress = float(state_dict.get("progress", 0.0))
