"""The public entry point ``apply``: plan, rewrite, verify — all or nothing.

``plan``, ``lint`` and ``stages`` live with their analyses; ``strip`` with the rewrite.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.utils._pytree import tree_flatten

from retrofit.analysis.context import Analysis
from retrofit.capture import detection
from retrofit.capture.patching import trace_session
from retrofit.capture.sandbox import Snapshot, unchanged, young_objects_only
from retrofit.errors import (
    ModelError,
    PartialError,
    RecipeError,
    RefusedError,
    RewriteError,
    TraceError,
    VerifyError,
)
from retrofit.plan import plan
from retrofit.recipe import Recipe, load_recipe
from retrofit.rewrite.execute import edited_eval, is_retrofitted, rewrite, strip
from retrofit.techniques import eval_neutral, liveness_paths
from retrofit.verify.checks import (
    TrainingStepError,
    check_live,
    compare,
    eval_output,
    output_tensors,
    training_step_error,
)
from retrofit.verify.training_call import TrainingCall, training_call_for

__all__ = ["RetrofitWarning", "apply"]


class RetrofitWarning(UserWarning):
    """A plan is partial: a requested technique found no site, or modules were skipped unread."""


def _module(model: Any, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"retrofit.{what} expects a torch.nn.Module, got {type(model).__name__}")
    return model


def apply(
    model: nn.Module,
    recipe: Recipe | dict | str | None,
    *,
    example_input: Any = None,
    verify: bool = True,
    allow_partial: bool = True,
    training_call: TrainingCall | Any = None,
) -> nn.Module:
    """Add the recipe's regularizers to ``model`` in place and return it.

    The model keeps its class, methods and ``state_dict`` keys. With ``verify=True`` (default)
    two things are checked on a probe input (``example_input``, else a random batch sized from
    the model's config, else 224²): the eval-mode output is unchanged, and a training step
    (forward and backward) with every stochastic-depth branch kept calls every inserted
    regularizer, and works again with every branch dropped (liveness; a model that cannot train
    as written gets the forwards only). Applying again replaces the earlier
    edits: one gate per site.

    The training forward is ``training_call`` — a :class:`~retrofit.verify.training_call.TrainingCall`
    (arguments and loss), or a tuple of positional / dict of keyword arguments — for a model
    whose training forward needs more than its input (``model(x, y)``). Without it: the probe,
    or for a torchvision detector (its ``transform`` says so) the probe images with one box
    per image (and a mask / keypoints for Mask / Keypoint R-CNN); a detector's eval
    equivalence is checked on its backbone's and heads' outputs and on its detections with
    every ``score_thresh`` at 0 (random weights otherwise detect nothing).

    All or nothing: whatever fails — reading the model, planning, rewriting, verifying — the model
    is handed back exactly as it came (same forward, modules and state) and a retrofit error
    says where and why: :class:`~retrofit.errors.TraceError` (the model could not be read),
    :class:`~retrofit.errors.RewriteError` (an edit could not be made),
    :class:`~retrofit.errors.VerifyError` (the output changed, or a regularizer would never
    run). A plan that found no site for a requested technique, or skipped modules it could not
    read, warns (:class:`RetrofitWarning`), or with ``allow_partial=False`` is refused with
    :class:`~retrofit.errors.PartialError` (what ``retrofit-cli`` does unless ``--allow-partial``).
    """
    _module(model, "apply")
    recipe = load_recipe(recipe)
    # Every trace of the apply (the model, each block owner, each rewritten forward's first
    # call) under one patching of nn.Module (capture/patching.py).
    with young_objects_only(), trace_session(model):
        return _apply(model, recipe, example_input, verify, allow_partial, training_call)


def _apply(
    model: nn.Module,
    recipe: Recipe,
    example_input: Any,
    verify: bool,
    allow_partial: bool,
    training_call: TrainingCall | Any,
) -> nn.Module:
    snapshot = Snapshot(model)
    phase = "planning"
    try:
        clean: Snapshot | None = snapshot
        if is_retrofitted(model):
            strip(model)
            clean = None
        analysis = Analysis(model, example_input)
        # Planning only reads the model: its sandboxed traces restore to the snapshot above.
        with unchanged(clean):
            the_plan = plan(model, recipe, analysis=analysis)
        partial = the_plan.partial()
        if partial and not allow_partial:
            raise PartialError("; ".join(partial) + " (allow a partial result to proceed)")
        for reason in partial:
            # stacklevel 3: the line that called apply (through its young_objects_only frame)
            warnings.warn(f"retrofit: {reason}", RetrofitWarning, stacklevel=3)
        if verify:
            phase = "running the original model on the probe input"
            x = analysis.example_input
            _check_real(x)
            call = training_call_for(model, x, training_call)
            watch = detection.watched(model) if detection.is_detector(model) else ()
            # The planning's recording forward, if one ran, already ran the original on x.
            recorded = None if watch else analysis.recorded_output()
            reference = None if recorded is None else output_tensors(recorded)
            if reference is None:
                with detection.verifying(model):
                    reference = eval_output(model, x, watch=watch)
        phase = "rewriting"
        record = rewrite(model, the_plan, seeds=analysis.seed)
        if verify:
            phase = "verifying"
            with eval_neutral(model), edited_eval(model), detection.verifying(model):
                compare(reference, eval_output(model, x, watch=watch))
            try:
                check_live(model, call, record.live(), paths=liveness_paths(model))
            except TrainingStepError:
                # Blame the rewrite only if the model as written trains: put it back, try it.
                snapshot.restore()
                if training_step_error(model, call) is None:
                    raise
                phase = "rewriting"
                record = rewrite(model, the_plan, seeds=analysis.seed)
                phase = "verifying"
                check_live(model, call, record.live(), backward=False, paths=liveness_paths(model))
    except (RefusedError, RecipeError, ModelError):
        snapshot.restore()
        raise
    except Exception as exc:
        snapshot.restore()  # nothing half-written: hand back the model as it came
        raise _refusal(phase, exc) from exc
    except BaseException:  # KeyboardInterrupt and friends: still all or nothing
        snapshot.restore()
        raise
    return model


def _check_real(x: Any) -> None:
    leaves, _ = tree_flatten(x)
    if any(getattr(t, "device", None) is not None and t.device.type == "meta" for t in leaves):
        raise VerifyError(
            "verify=True needs real weights, but the model is on the meta device "
            "(use retrofit.plan for a dry run, or apply(..., verify=False))"
        )


def _refusal(phase: str, exc: BaseException) -> RefusedError:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if phase == "planning":
        return TraceError(f"the model could not be read while {phase}: {text}")
    if phase == "rewriting":
        return RewriteError(f"the model could not be rewritten: {text}")
    return VerifyError(f"failed while {phase}: {text}")
