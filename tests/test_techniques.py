"""One record per technique: every registry is read from it, and a new technique is one module.

The test technique at the bottom is what adding a technique costs: a spec, a planner, a layer
and the record (here in one file, as it would be one module in retrofit/techniques/). Nothing
else in the package is edited, and the recipe, the planner run, the rewrite, verification and
the trainer's "does this recipe edit the model" all pick it up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import retrofit
from retrofit.capture.existing import is_existing_regularizer
from retrofit.edit import Edit
from retrofit.layers import protocol
from retrofit.plan import planners
from retrofit.recipe import top_level
from retrofit.spec import Spec, check_keys, number
from retrofit.techniques import TECHNIQUES, Technique, model_edits
from retrofit.train.prepare import has_model_edits

ROOT = Path(__file__).resolve().parents[1]


def test_every_registry_is_read_from_the_techniques():
    assert top_level() == (*TECHNIQUES, "train")
    assert set(planners()) == {n for n, t in TECHNIQUES.items() if t.planner is not None}
    assert model_edits() == tuple(planners())
    for name, t in TECHNIQUES.items():
        assert t.name == name
        # a technique that edits the model inserts something, and only such a one does
        assert (t.layer is not None) == t.edits_model, name


def test_every_retrofit_layer_is_a_leaf_and_reports_its_rates():
    layer_classes = [
        v
        for v in vars(retrofit.layers).values()
        if isinstance(v, type) and issubclass(v, nn.Module)
    ]
    assert len(layer_classes) >= 4
    for cls in layer_classes:
        module = cls()
        assert is_existing_regularizer(module), cls  # a trace keeps it as one node
        assert isinstance(module, protocol.Reporting), cls
        assert module.kind in TECHNIQUES, cls
        assert set(module.rates()) and "kind" not in module.rates()


def test_every_technique_has_a_recipe_card():
    cards = (ROOT / "recipes" / "README.md").read_text()
    for name in TECHNIQUES:
        assert re.search(rf"\b{name}\b", cards), f"recipes/README.md has no card for {name}"


# --- adding a technique: ShakeDrop-style branch noise (Yamada et al. 2019), test-only ----------


class BranchNoise(nn.Module):
    """Multiplies a residual branch by (1 + α·u), u ~ U(−1, 1) per sample, in training; the
    identity in eval (the forward half of Yamada et al.'s ShakeDrop, "ShakeDrop Regularization
    for Deep Residual Learning", 2019, with its expectation 1)."""

    kind = "branch_noise"

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        u = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) * 2 - 1
        return x * (1 + self.alpha * u)

    def rates(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


@dataclass(frozen=True)
class BranchNoiseSpec(Spec):
    section: ClassVar[str] = "branch_noise"
    alpha: float = 0.5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BranchNoiseSpec:
        check_keys(cls.section, d, cls.field_names())
        return cls(alpha=number("branch_noise.alpha", d.get("alpha", cls.alpha), low=0, high=1))


def plan_branch_noise(analysis: Any, spec: BranchNoiseSpec) -> list[Edit]:
    return [
        Edit.at(
            site,
            kind="branch_noise",
            action="wrap_arg",
            arg=site.branch_arg,
            params={"alpha": spec.alpha},
        )  # fmt: skip
        for site in analysis.residual_sites
    ]


BRANCH_NOISE = Technique(
    name="branch_noise",
    parse=BranchNoiseSpec.parse,
    fields=BranchNoiseSpec.field_names(),
    planner=plan_branch_noise,
    layer=lambda edit: BranchNoise(edit.params["alpha"]),
)


@pytest.fixture
def with_branch_noise(monkeypatch):
    monkeypatch.setitem(TECHNIQUES, "branch_noise", BRANCH_NOISE)


def test_a_new_technique_is_one_record(with_branch_noise):
    from tests.user_models import tiny_resnet

    recipe = retrofit.load_recipe({"branch_noise": {"alpha": 0.3}})
    assert recipe.branch_noise == BranchNoiseSpec(alpha=0.3)
    assert recipe.techniques() == ["branch_noise"] and has_model_edits(recipe)
    with pytest.raises(retrofit.RecipeError, match="branch_noise.alpha"):
        retrofit.load_recipe({"branch_noise": {"alpha": 2}})
    with pytest.raises(retrofit.RecipeError, match="belongs inside the 'branch_noise:'"):
        retrofit.load_recipe({"alpha": 0.3})

    torch.manual_seed(0)
    model = tiny_resnet(width=4, depth=3)
    x = torch.randn(2, 3, 8, 8)
    # apply verifies: eval output unchanged and every inserted BranchNoise live in training
    retrofit.apply(model, recipe, example_input=x)
    noise = [m for m in model.modules() if isinstance(m, BranchNoise)]
    assert len(noise) == 3 and all(m.alpha == 0.3 for m in noise)
    rates = retrofit.schedule.current_rates(model)
    assert [r["kind"] for r in rates.values()] == ["branch_noise"] * 3
    retrofit.strip(model)
    assert not any(isinstance(m, BranchNoise) for m in model.modules())
