"""Exceptions raised by retrofit. Each names the thing that was wrong and what would be valid."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe field has a bad value: the message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str, hint: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        msg = f"recipe field '{field}': got {value!r}; allowed: {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ModelError(ValueError):
    """A model name, factory or checkpoint could not be resolved."""


class TraceError(RuntimeError):
    """No part of the model could be traced with torch.fx."""


class VerifyError(RuntimeError):
    """The rewritten model's eval output differs from the original's."""
