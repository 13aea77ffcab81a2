"""Resize a model's classifier to the data's number of classes.

timm models know how (``reset_classifier(n)``). torchvision models keep their head under one of
a few names (``fc``, ``classifier[-1]``, ``heads.head``, ``head``) and user models anywhere, so
the general rule is structural: the head is the *last* ``nn.Linear`` whose ``out_features`` is
the model's current number of classes. It is replaced by a fresh ``nn.Linear`` with the same
``in_features`` and bias, on the same device and dtype, so the state_dict keys stay the same and
the trained weights load into ``OriginalClass(num_classes=n)``.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("retrofit.train")


def num_classes_of(model: nn.Module) -> int | None:
    """The model's current number of classes, or None if it cannot be told."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last = _last_linear(model)
    return last[1].out_features if last else None


def _last_linear(model: nn.Module, out_features: int | None = None) -> tuple[str, nn.Linear] | None:
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (out_features is None or m.out_features == out_features):
            found = (name, m)
    return found


def resize_classifier(model: nn.Module, num_classes: int) -> str | None:
    """Give ``model`` a fresh ``num_classes``-way head if it has another size; in place.

    Returns:
        The qualified name of the replaced layer (``"reset_classifier"`` for timm models), or None
        when the head already had ``num_classes`` outputs and was kept (pretrained heads survive).

    Raises:
        ValueError: no classifier could be found; the message says what was looked for.
    """
    current = num_classes_of(model)
    if current == num_classes:
        return None
    if hasattr(model, "reset_classifier") and callable(model.reset_classifier):
        model.reset_classifier(num_classes)
        return "reset_classifier"
    found = _last_linear(model, current) if current else None
    if found is None:
        raise ValueError(
            f"cannot resize the classifier of {type(model).__name__} to {num_classes} classes: no "
            f"reset_classifier() and no nn.Linear with out_features == num_classes ({current}); "
            "build the model with the data's number of classes instead"
        )
    name, old = found
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes  # torchvision ViT/others keep it as an attribute
    log.info("classifier %s resized: %d -> %d classes", name, old.out_features, num_classes)
    return name
