"""The techniques retrofit knows, one record each (``record.py``), in recipe order.

:data:`TECHNIQUES` is the one registry: the recipe's sections, the planners, the layers the
rewrite inserts, the plan's tables, the statistics' scalars, the trainer's logging, plots, input
transforms and DDP flag are read from it (through the helpers below, or a record's fields).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn

from retrofit.techniques import cutout, dropblock, dropout_fix, shakedrop, stochastic_depth, uout
from retrofit.techniques.record import Figures, Technique

__all__ = [
    "TECHNIQUES",
    "Figures",
    "Technique",
    "console_parts",
    "epoch_figures",
    "eval_neutral",
    "liveness_paths",
    "logged",
    "model_edits",
    "planned_figures",
    "unused_parameters",
]

TECHNIQUES: dict[str, Technique] = {
    t.name: t
    for t in (
        stochastic_depth.TECHNIQUE,
        dropblock.TECHNIQUE,
        uout.TECHNIQUE,
        dropout_fix.TECHNIQUE,
        cutout.TECHNIQUE,
        shakedrop.TECHNIQUE,
    )
}


def model_edits() -> tuple[str, ...]:
    """The sections whose technique edits the model (has a planner)."""
    return tuple(name for name, t in TECHNIQUES.items() if t.edits_model)


@contextmanager
def eval_neutral(model: nn.Module) -> Iterator[None]:
    """Every technique's eval-neutral context at once (``Technique.neutral``): under it the
    inserted layers are the identity in eval, which is what verification compares."""
    with ExitStack() as stack:
        for t in TECHNIQUES.values():
            if t.neutral is not None:
                stack.enter_context(t.neutral(model))
        yield


def liveness_paths(model: nn.Module) -> list[tuple[str, list[nn.Module], Any]]:
    """The passes of verification's liveness check (``retrofit.verify.checks.Path``): the
    techniques' first passes together (their kept paths: every inserted layer is called there),
    then each technique's further passes (stochastic depth's dropped path)."""
    per = [p for t in TECHNIQUES.values() if t.liveness is not None for p in [t.liveness(model)]]
    per = [paths for paths in per if paths]
    if not per:
        return []
    firsts = [paths[0] for paths in per]

    @contextmanager
    def together() -> Iterator[None]:
        with ExitStack() as stack:
            for _, _, forcing in firsts:
                stack.enter_context(forcing())
            yield

    label = " and ".join(label for label, _, _ in firsts)
    layers = [m for _, forced, _ in firsts for m in forced]
    return [(label, layers, together), *(p for paths in per for p in paths[1:])]


def unused_parameters(recipe: Any, model: nn.Module) -> bool:
    """Whether a training step may leave parameters without a gradient (DDP's
    ``find_unused_parameters``): some technique of ``recipe`` (or already in ``model``) says so."""
    return any(
        t.unused_parameters(getattr(recipe, name, None) if recipe is not None else None, model)
        for name, t in TECHNIQUES.items()
        if t.unused_parameters is not None
    )


def logged() -> dict[str, str]:
    """Every scalar a step record of metrics.jsonl carries, with its epoch summary rule."""
    return {k: how for t in TECHNIQUES.values() for k, how in t.figures.logged.items()}


def planned_figures(edits: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The planned scalars (``sd_planned`` …) of a plan's edits (``Edit.to_dict`` form)."""
    out: dict[str, float] = {}
    for name, t in TECHNIQUES.items():
        mine = [e for e in edits if e.get("kind") == name]
        if mine:
            out.update(t.figures.planned(mine))
    return out


def epoch_figures(steps: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """An epoch's figures from its step records: each logged scalar's mean or last value."""
    out: dict[str, float] = {}
    for key, how in logged().items():
        values = [r[key] for r in steps if r.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values) if how == "mean" else values[-1]
    return out


def console_parts(values: Mapping[str, Any]) -> list[str]:
    """The console's wording of the figures in ``values``, technique by technique."""
    return [part for t in TECHNIQUES.values() for part in t.figures.parts(values)]
