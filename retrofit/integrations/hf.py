"""Hugging Face ``Trainer``: :class:`RetrofitTrainerCallback`.

    from retrofit.integrations.hf import RetrofitTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    RetrofitTrainerCallback("recipes/sd.yaml", module="resnet").attach(trainer)
    trainer.train()            # model.resnet is retrofitted, trained, stripped

Needs ``transformers`` and ``accelerate`` (the ``Trainer`` requires it): ``pip install
'retrofit[hf]'``. What it does, in the Trainer's events (one
:class:`retrofit.lifecycle.Lifecycle`; see ``retrofit.integrations``):

* ``on_train_begin``: ``retrofit.apply`` and ``retrofit.lint`` on ``module`` of the model
  (default: the whole model); the main process prints ``retrofit plan: …`` and
  ``retrofit lint: …`` once (as the Trainer prints its logs). The optimizer exists by then; the
  gates add no parameters, so it is unaffected.
* ``on_step_begin``: ``retrofit.schedule.update(model, global_step / max_steps)``.
* ``on_log``, for training logs only (those with a ``loss``): ``retrofit/sd_survival``,
  ``retrofit/sd_kept``, ``retrofit/sd_planned``, ``retrofit/keep_prob`` (with ``per_block=True``
  every layer's too) are added to the logs and to ``state.log_history``; the kept fraction covers
  the steps since the previous training log. Evaluation logs and the end-of-training summary get
  none of them: they are training statistics, and there was no training in their window.
  The Trainer hands one ``logs`` dict to its callbacks in order, and reporting integrations
  (TensorBoard, W&B, …) are registered before user callbacks: :meth:`attach` puts this callback
  first, so they receive the values too (passed as ``callbacks=[…]`` they reach the console and
  ``log_history`` only).
* ``on_train_end``: ``retrofit.strip``. Checkpoints saved during training need nothing: the
  state_dict has the original keys (``model.safetensors`` loads into the original class).
"""

from __future__ import annotations

from typing import Any

from retrofit.integrations import progress, target_module
from retrofit.lifecycle import Lifecycle, Report
from retrofit.recipe import Recipe

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError(
        "retrofit.integrations.hf needs transformers (and accelerate for its Trainer): "
        "pip install 'retrofit[hf]'"
    ) from e

__all__ = ["RetrofitTrainerCallback"]


class RetrofitTrainerCallback(TrainerCallback):
    """Apply a recipe when training begins, drive its schedules, log its rates, strip at the end.

    Args:
        recipe: a recipe path, dict or :class:`~retrofit.Recipe`.
        module: attribute path of the network to retrofit inside the Trainer's model (e.g.
            ``"resnet"`` of ``ResNetForImageClassification``); None: the whole model.
        example_input: probe input for the eval-equivalence check and the lint (see
            ``retrofit.apply``).
        training_call: what a training-mode forward of the network is called with, for the
            liveness check (``retrofit.apply``'s ``training_call``: a detector's targets …).
        verify: check that the eval output is unchanged.
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
        per_block: bool = False,
    ) -> None:
        self.lifecycle = Lifecycle(
            recipe, example_input=example_input, verify=verify, training_call=training_call
        )
        self.recipe = self.lifecycle.recipe
        self.module = module
        self.per_block = per_block
        self.last_report: Report | None = None

    @property
    def progress(self) -> float:
        return self.lifecycle.progress

    def attach(self, trainer: Any) -> RetrofitTrainerCallback:
        """Register with ``trainer`` ahead of its other callbacks (see the module docstring)."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is None:
            raise ValueError("RetrofitTrainerCallback: the Trainer passed no model")
        t = progress(state.global_step, state.max_steps)
        start = self.lifecycle.start(target_module(model, self.module), t=t)
        if state.is_world_process_zero:
            for line in start.lines():
                print(f"retrofit {line}", flush=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        if self.lifecycle.model is not None:
            self.lifecycle.update(progress(state.global_step, state.max_steps))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any):
        # Only the Trainer's training logs carry "loss"; eval logs have eval_*, the final
        # summary train_*: neither gets a training statistic.
        if logs is None or "loss" not in logs:
            return
        report = self.lifecycle.report()
        if report is None:
            return
        self.last_report = report
        values = report.scalars(per_block=self.per_block)
        logs.update(values)
        # The Trainer appended a copy of the logs before calling us: add ours to it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self.lifecycle.strip()
