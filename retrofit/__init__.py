"""retrofit: add regularizers to a PyTorch vision model by reading its torch.fx graph.

    model = torchvision.models.resnet50()
    plan = retrofit.plan(model, "recipes/sd.yaml")     # dry run: where, which depth, which p_l
    retrofit.apply(model, "recipes/sd.yaml")           # in place; eval output verified unchanged
    ...train; call retrofit.schedule.update(model, t) once per step...
    retrofit.strip(model)                              # the original architecture again

Pipeline: trace (graph/trace.py) → find sites (graph/residual.py …) → plan (plan.py) →
rewrite (rewrite.py) → verify (verify.py); lint beside it, train after it.
"""

from __future__ import annotations

from typing import Any

from retrofit import schedule
from retrofit.api import RetrofitWarning, apply
from retrofit.errors import (
    ModelError,
    PartialError,
    RecipeError,
    RefusedError,
    RewriteError,
    TraceError,
    VerifyError,
)
from retrofit.fixes import recalibrate_bn

# ``retrofit.lint`` and ``retrofit.plan`` are the functions; their modules are reached with
# ``from retrofit.lint import format_report`` (importing them here binds the functions last).
from retrofit.lint import Finding, lint, measure_variance_shift  # noqa: E402
from retrofit.plan import Edit, Plan, plan
from retrofit.recipe import Recipe, load_recipe
from retrofit.rewrite import applied_plan, strip

__version__ = "0.1.0"

__all__ = [
    "Edit",
    "Finding",
    "ModelError",
    "PartialError",
    "Plan",
    "Recipe",
    "RecipeError",
    "RefusedError",
    "RetrofitWarning",
    "RewriteError",
    "TraceError",
    "VerifyError",
    "applied_plan",
    "apply",
    "lint",
    "load_recipe",
    "measure_variance_shift",
    "plan",
    "recalibrate_bn",
    "schedule",
    "strip",
]


def __getattr__(name: str) -> Any:
    # The stage analysis loads on first use.
    if name in ("stages", "Stage"):
        from retrofit.graph import stages as _stages

        return getattr(_stages, name)
    raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
