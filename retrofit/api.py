"""The public entry points: apply and strip (plan, lint and stages live with their analyses)."""

from __future__ import annotations

from typing import Any

from torch import nn

from retrofit.errors import VerifyError
from retrofit.plan import Plan, plan
from retrofit.recipe import Recipe, load_recipe
from retrofit.rewrite import is_retrofitted, rewrite, strip
from retrofit.verify import compare, eval_output, paper_gates_neutral, probe_input

__all__ = ["apply"]


def apply(
    model: nn.Module,
    recipe: Recipe | dict | str | None,
    *,
    example_input: Any = None,
    verify: bool = True,
) -> nn.Module:
    """Add the recipe's regularizers to ``model`` in place and return it.

    The model keeps its class, methods and ``state_dict`` keys. With ``verify=True`` (default)
    the eval-mode output on a probe input (``example_input``, else a random batch sized from the
    model's ``pretrained_cfg``, else 224²) must be unchanged, or the model is restored and
    :class:`~retrofit.errors.VerifyError` is raised. Applying again replaces the earlier edits:
    one gate per site.
    """
    recipe = load_recipe(recipe)
    if is_retrofitted(model):
        strip(model)
    the_plan: Plan = plan(model, recipe)
    if verify:
        x = example_input if example_input is not None else probe_input(model)
        reference = eval_output(model, x)
    rewrite(model, the_plan)
    if verify:
        try:
            with paper_gates_neutral(model):
                compare(reference, eval_output(model, x))
        except VerifyError:
            strip(model)  # nothing half-written: hand back the model as it came
            raise
    return model
