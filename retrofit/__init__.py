"""retrofit: add regularizers to a PyTorch vision model by reading its torch.fx graph.

    model = torchvision.models.resnet50()
    plan = retrofit.plan(model, "recipes/sd.yaml")     # dry run: where, which depth, which p_l
    retrofit.apply(model, "recipes/sd.yaml")           # in place; eval output verified unchanged
    ...train; call retrofit.schedule.update(model, t) once per step...
    retrofit.strip(model)                              # the original architecture again

Pipeline: trace (capture/trace.py) → find sites (analysis/residual.py …) → plan (plan.py) →
rewrite (rewrite/execute.py) → verify (verify/checks.py); lint beside it, train after it.

The public names load on first use (PEP 562 ``__getattr__``): ``import retrofit`` costs no torch
import, so ``retrofit-cli --help`` and argument errors answer at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from retrofit.errors import (
    ModelError,
    PartialError,
    RecipeError,
    RefusedError,
    RewriteError,
    TraceError,
    VerifyError,
)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from retrofit import schedule
    from retrofit.analysis.context import stages
    from retrofit.analysis.stages import Stage
    from retrofit.api import RetrofitWarning, apply
    from retrofit.fixes import recalibrate_bn
    from retrofit.lint import Finding, lint, measure_variance_shift
    from retrofit.plan import Edit, Plan, plan
    from retrofit.recipe import Recipe, load_recipe
    from retrofit.rewrite.execute import applied_plan, strip
    from retrofit.verify.training_call import TrainingCall

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
    "Stage",
    "TraceError",
    "TrainingCall",
    "VerifyError",
    "applied_plan",
    "apply",
    "lint",
    "load_recipe",
    "measure_variance_shift",
    "plan",
    "recalibrate_bn",
    "schedule",
    "stages",
    "strip",
]

# Public name → the module that defines it.
_LAZY = {
    "apply": "retrofit.api",
    "RetrofitWarning": "retrofit.api",
    "recalibrate_bn": "retrofit.fixes",
    "Stage": "retrofit.analysis.stages",
    "stages": "retrofit.analysis.context",
    "Finding": "retrofit.lint",
    "lint": "retrofit.lint",
    "measure_variance_shift": "retrofit.lint",
    "Edit": "retrofit.plan",
    "Plan": "retrofit.plan",
    "plan": "retrofit.plan",
    "Recipe": "retrofit.recipe",
    "load_recipe": "retrofit.recipe",
    "applied_plan": "retrofit.rewrite.execute",
    "strip": "retrofit.rewrite.execute",
    "TrainingCall": "retrofit.verify.training_call",
}
_SUBMODULES = ("schedule",)  # ``retrofit.schedule`` is the module itself
# Functions named like their module: ``retrofit.lint`` and ``retrofit.plan`` stay the functions
# even after ``import retrofit.lint`` (the import system sets the package attribute to the module).
_SHADOWED = ("lint", "plan")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
