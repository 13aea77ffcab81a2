"""PyTorch Lightning: :class:`RetrofitCallback`.

    from retrofit.integrations.lightning import RetrofitCallback

    trainer = lightning.Trainer(max_epochs=10, callbacks=[RetrofitCallback("recipes/sd.yaml")])
    trainer.fit(lit_module)          # lit_module.model is retrofitted, trained, stripped

What it does, in Lightning's hooks (one :class:`retrofit.lifecycle.Lifecycle`; see
``retrofit.integrations`` for the contract):

* ``setup(stage="fit")``: ``retrofit.apply`` and ``retrofit.lint`` on the LightningModule's
  ``module`` attribute (``"model"`` when it has one, else the LightningModule itself, which then
  needs a ``forward``). ``setup`` runs before the strategy moves the model, wraps it in DDP and
  builds the optimizers, so the rewrite is in place before anything holds a reference to the
  old forward; the gates add no parameters, so the optimizer is unaffected either way. On global
  rank 0 the plan summary and the lint verdict are printed (``rank_zero_info``) and logged as
  hyper-parameters (``retrofit/plan``, ``retrofit/lint``, ``retrofit/lint_findings``) to every
  logger the Trainer has.
* ``on_train_batch_start``: ``retrofit.schedule.update(model, global_step / estimated_stepping_batches)``.
* ``on_train_batch_end``: ``retrofit/sd_survival``, ``retrofit/sd_kept``, ``retrofit/sd_planned``
  and ``retrofit/keep_prob`` (with ``per_block=True`` every layer's too) through
  ``LightningModule.log_dict``, so to whatever logger the Trainer has; the kept-fraction window
  restarts every ``log_every_n_steps`` steps, so a logged kept fraction covers the steps since
  the previous logged one. Validation logs nothing of retrofit's.
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

from retrofit.integrations import defines_forward, progress, suggest_module, target_module
from retrofit.lifecycle import Lifecycle, Report
from retrofit.recipe import Recipe

try:
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_info
except ImportError:  # the older package name
    try:
        from pytorch_lightning import LightningModule
        from pytorch_lightning.callbacks import Callback
        from pytorch_lightning.utilities import rank_zero_info
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
        example_input: probe input for the eval-equivalence check and the lint (see
            ``retrofit.apply``).
        training_call: what a training-mode forward of the network is called with, for the
            liveness check (``retrofit.apply``'s ``training_call``: a detector's targets …).
        verify: check that the eval output is unchanged (``retrofit.apply``'s ``verify``).
        log: log the rates through ``LightningModule.log_dict``.
        per_block: also log every inserted layer's survival / kept fraction / keep_prob.

    Attributes:
        last_report: the latest :class:`~retrofit.lifecycle.Report` (its ``blocks`` are the
            per-layer rates), for a logger of your own.
    """

    def __init__(
        self,
        recipe: Recipe | dict | str,
        *,
        module: str | None = None,
        example_input: Any = None,
        training_call: Any = None,
        verify: bool = True,
        log: bool = True,
        per_block: bool = False,
    ) -> None:
        super().__init__()
        self.lifecycle = Lifecycle(
            recipe, example_input=example_input, verify=verify, training_call=training_call
        )
        self.recipe = self.lifecycle.recipe
        self.module = module
        self.log = log
        self.per_block = per_block
        self.last_report: Report | None = None

    @property
    def progress(self) -> float:
        return self.lifecycle.progress

    def _resolve(self, pl_module: nn.Module) -> nn.Module:
        name = self.module
        if name is None:
            if isinstance(getattr(pl_module, "model", None), nn.Module):
                name = "model"
            elif not defines_forward(pl_module, LightningModule):
                # Tracing a module without forward fails deep inside torch.fx: say what to pass.
                raise ValueError(suggest_module(pl_module, "RetrofitCallback"))
            else:
                name = ""
        return target_module(pl_module, name)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        start = self.lifecycle.start(self._resolve(pl_module), t=0.0)
        if not getattr(trainer, "is_global_zero", True):
            return
        for line in start.lines():
            rank_zero_info(f"retrofit {line}")
        for logger in getattr(trainer, "loggers", None) or ():
            logger.log_hyperparams(start.params())

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.lifecycle.model is None:
            return
        self.lifecycle.update(progress(trainer.global_step, trainer.estimated_stepping_batches))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.lifecycle.model is None:
            return
        # Lightning writes the values of every log_every_n_steps-th step: the window closes there.
        closes = trainer.global_step % max(int(trainer.log_every_n_steps), 1) == 0
        report = self.lifecycle.report(reset=closes)
        if report is None:
            return
        self.last_report = report
        values = report.scalars(per_block=self.per_block)
        if self.log and values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, logger=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._strip()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._strip()

    def _strip(self) -> None:
        self.lifecycle.strip()

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """What a Lightning checkpoint records about the retrofit: the resolved recipe and the
        training progress it had reached (the model's own state_dict needs no change)."""
        return {"recipe": self.recipe.to_dict(), "progress": self.progress}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lifecycle.progress = float(state_dict.get("progress", 0.0))
