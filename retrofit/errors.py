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


class RefusedError(RuntimeError):
    """retrofit refused the model and handed it back exactly as it came (CLI exit code 3).

    The message names the module, the source line where known, and the cause.
    """


class TraceError(RefusedError):
    """The model (or the part a technique needs) could not be read as a graph."""


class RewriteError(RefusedError):
    """A planned edit could not be made, or a rewritten forward could not be specialised for a
    call (the owner's code does not match the plan for it)."""


class VerifyError(RefusedError):
    """The rewritten model's eval output differs from the original's, or an inserted
    regularizer is never called in training (not live)."""


class PartialError(RefusedError):
    """A requested technique found no site, or modules were skipped unread: refused unless the
    caller allows a partial result (``apply(..., allow_partial=True)``, ``--allow-partial``)."""
