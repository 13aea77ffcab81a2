"""Hugging Face ``Trainer``: :class:`RetrofitTrainerCallback`.

    from retrofit.integrations.hf import RetrofitTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    RetrofitTrainerCallback("recipes/sd.yaml", module="resnet").attach(trainer)
    trainer.train()            # model.resnet is retrofitted, trained, stripped

Needs ``transformers`` and ``accelerate`` (the ``Trainer`` requires it): ``pip install
'retrofit[hf]'``. What it does, in the Trainer's events (see ``retrofit.integrations``):

* ``on_train_begin``: ``retrofit.apply`` on ``module`` of the model (default: the whole model).
  The optimizer exists by then; the gates add no parameters, so it is unaffected.
* ``on_step_begin``: ``retrofit.schedule.update(model, global_step / max_steps)``.
* ``on_log``: ``retrofit/sd_survival``, ``retrofit/sd_kept``, ``retrofit/keep_prob`` are added
  to the logs and to ``state.log_history``; the kept-fraction window restarts at each log.
  The Trainer hands one ``logs`` dict to its callbacks in order, and reporting integrations
  (TensorBoard, W&B, …) are registered before user callbacks: :meth:`attach` puts this callback
  first, so they receive the values too (passed as ``callbacks=[…]`` they reach the console and
  ``log_history`` only).
* ``on_train_end``: ``retrofit.strip``. Checkpoints saved during training need nothing: the
  state_dict has the original keys (``model.safetensors`` loads into the original class).
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
        example_input: probe input for the eval-equivalence check (see ``retrofit.apply``).
        verify: check that the eval output is unchanged.
    """

    def __init__(
        self,
        recipe: Recipe | dict | str,
        *,
        module: str | None = None,
        example_input: Any = None,
        verify: bool = True,
    ) -> None:
        self.recipe = load_recipe(recipe)
        self.module = module
        self.example_input = example_input
        self.verify = verify
        self.progress = 0.0
        self._target: nn.Module | None = None

    def attach(self, trainer: Any) -> RetrofitTrainerCallback:
        """Register with ``trainer`` ahead of its other callbacks (see the module docstring)."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is None:
            raise ValueError("RetrofitTrainerCallback: the Trainer passed no model")
        target = target_module(model, self.module)
        apply(target, self.recipe, example_input=self.example_input, verify=self.verify)
        self._target = target
        self.progress = progress(state.global_step, state.max_steps)
        update(target, self.progress)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        if self._target is None:
            return
        self.progress = progress(state.global_step, state.max_steps)
        update(self._target, self.progress)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any):
        if self._target is None:
            return
        values = logged(self._target)
        if logs is not None:
            logs.update(values)
        # The Trainer appended a copy of the logs before calling us: add ours to it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        reset_gate_stats(self._target)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if self._target is not None and is_retrofitted(self._target):
            strip(self._target)
        self._target = None
