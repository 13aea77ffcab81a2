"""The training call: what one training-mode forward of a model is called with, and its loss.

Checking a rewrite runs the model in training mode (liveness: every inserted regularizer must be
called). For a classifier that call is ``model(x)`` on the eval probe; a model whose training
forward needs more than its input — a torchvision detector needs ``targets`` and returns a dict
of losses, a user model may take ``(x, y)`` — needs its own. A :class:`TrainingCall` holds the
positional and keyword arguments of that call and how its output becomes one scalar loss (for a
check that also runs backward).

``retrofit.apply(model, recipe, training_call=...)`` takes one (or a tuple of arguments, a dict
of keyword arguments, a tensor, as ``example_input``); without one, :func:`training_call_for`
builds it: for torchvision's detection API, the probe images with minimal targets
(``capture/detection.py``); for any other model, the eval probe itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from retrofit.capture import detection

__all__ = ["TrainingCall", "as_training_call", "training_call_for"]


def default_loss(output: Any) -> torch.Tensor:
    """One scalar from a training forward's output: a scalar tensor as it is; an object's
    ``loss`` (HF's ``ModelOutput``); a dict of scalar losses (torchvision detectors) summed, as
    their reference training script does; otherwise the sum of every floating output's mean, so
    every output reaches the loss."""
    if isinstance(output, torch.Tensor) and output.ndim == 0:
        return output
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.ndim == 0:
        return loss
    if isinstance(output, Mapping) and output:
        values = list(output.values())
        if all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in values):
            return torch.stack([v.float() for v in values]).sum()
    leaves = [
        t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if not leaves:
        raise TypeError(
            f"the training forward returned no floating tensor ({type(output).__name__}); "
            "give TrainingCall(..., loss=fn) to say how its output becomes a loss"
        )
    return torch.stack([t.float().mean() for t in leaves]).sum()


@dataclass
class TrainingCall:
    """The arguments of one training-mode forward, ``model(*args, **kwargs)``, and ``loss``:
    output → scalar tensor (default :func:`default_loss`).

    >>> images, targets = [torch.rand(3, 64, 64)], [{"boxes": ..., "labels": ...}]
    >>> retrofit.apply(detector, "recipes/sd.yaml", training_call=TrainingCall((images, targets)))
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    loss: Callable[[Any], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.args, tuple):
            raise TypeError(
                f"TrainingCall.args: a tuple of positional arguments, got {type(self.args).__name__}"
            )
        if not isinstance(self.kwargs, dict):
            raise TypeError(
                f"TrainingCall.kwargs: a dict of keyword arguments, got "
                f"{type(self.kwargs).__name__}"
            )

    def run(self, model: nn.Module) -> Any:
        """Call ``model`` with these arguments (in whatever mode it is in)."""
        return model(*self.args, **self.kwargs)

    def loss_of(self, output: Any) -> torch.Tensor:
        return (self.loss or default_loss)(output)


def as_training_call(value: Any) -> TrainingCall:
    """A TrainingCall as it is; a tuple as positional arguments, a dict as keyword arguments,
    anything else as the single argument (the convention of ``example_input``)."""
    if isinstance(value, TrainingCall):
        return value
    if isinstance(value, tuple):
        return TrainingCall(args=value)
    if isinstance(value, dict):
        return TrainingCall(kwargs=value)
    return TrainingCall(args=(value,))


def training_call_for(model: nn.Module, example_input: Any, given: Any = None) -> TrainingCall:
    """The training call checks run: ``given`` (see :func:`as_training_call`) when the user
    passed one; for a torchvision detector, its images (from ``example_input``) with
    :func:`~retrofit.capture.detection.minimal_targets`; else ``example_input`` itself."""
    if given is not None:
        return as_training_call(given)
    if detection.is_detector(model):
        images = example_input[0] if isinstance(example_input, tuple) else example_input
        if isinstance(images, torch.Tensor):
            images = list(images.unbind(0)) if images.ndim == 4 else [images]
        if not isinstance(images, list) or not all(isinstance(i, torch.Tensor) for i in images):
            raise TypeError(
                f"{type(model).__name__} takes a list of 3×H×W images; example_input is "
                f"{type(example_input).__name__} (give ([image, ...],) or training_call=...)"
            )
        return TrainingCall(args=(images, detection.minimal_targets(model, images)))
    return as_training_call(example_input)
