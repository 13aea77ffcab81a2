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


# --- every registry is derived from the records, in both directions ------------------------


def _planned_edits() -> dict[str, list[Edit]]:
    """Each model-editing technique's edits on a small model that has its sites."""
    from tests.user_models import dropout_before_bn, tiny_resnet

    recipes = {
        "stochastic_depth": (tiny_resnet(width=4, depth=3), {}),
        "shakedrop": (tiny_resnet(width=4, depth=3), {}),
        "dropblock": (tiny_resnet(width=4, depth=3), {"stages": [1], "block_size": 3}),
        "uout": (dropout_before_bn(), {}),
        "dropout_fix": (dropout_before_bn(), "after_last_bn"),
    }
    assert set(recipes) == set(model_edits())  # a new technique adds its model here
    out = {}
    for name, (model, section) in recipes.items():
        plan = retrofit.plan(model, {name: section}, example_input=torch.randn(2, 3, 16, 16))
        out[name] = plan.edits
    return out


def test_each_records_pieces_are_what_the_program_uses():
    from retrofit.report import _renderer

    edits = _planned_edits()
    for name, t in TECHNIQUES.items():
        if t.spec is not None:
            assert t.parse == t.spec.parse and set(t.spec.field_names()) <= set(t.fields), name
        # the plan table is the record's own (or the generic one)
        assert t.table is None or _renderer(name) is t.table, name
        if not t.edits_model:
            continue
        assert edits[name], name
        for edit in edits[name]:
            assert edit.kind == name and edit.action in t.actions, (name, edit.action)
            # typed settings → layer; params are their JSON form
            assert edit.settings is not None and edit.params == _params(edit.settings)
            layer = t.layer(edit)
            assert not list(layer.parameters()), name
            if t.layer_class is not None:
                assert isinstance(layer, t.layer_class), name
        used = {e.action for e in edits[name]}
        assert used <= set(t.actions), name


def _params(settings: Any) -> dict[str, Any]:
    from dataclasses import asdict

    to_params = getattr(settings, "params", None)
    return to_params() if callable(to_params) else asdict(settings)


def test_every_registry_entry_comes_from_a_record():
    from retrofit.edit import ACTIONS
    from retrofit.rewrite import execute

    # rewrite actions: every one is used by some record and implemented by the rewrite
    used = {a for t in TECHNIQUES.values() for a in t.actions}
    assert used == set(ACTIONS)
    graph = {name for name, a in ACTIONS.items() if a.graph}
    assert graph == {*execute._GRAPH_EDITS, "outline"}
    assert set(ACTIONS) - graph == set(execute._MODULE_EDITS)
    # layers: every module class retrofit.layers exports is a record's layer, of its kind
    exported = {
        v
        for v in vars(retrofit.layers).values()
        if isinstance(v, type) and issubclass(v, nn.Module)
    }
    records = {t.layer_class: t for t in TECHNIQUES.values() if t.layer_class is not None}
    assert exported == set(records)
    for cls, t in records.items():
        assert cls.kind == t.name
    # the figures: what metrics.jsonl logs and the statistics report are the records' own
    from retrofit.techniques import logged

    assert logged() == {k: v for t in TECHNIQUES.values() for k, v in t.figures.logged.items()}
    assert set(logged()) == {"sd_kept", "keep_prob", "shakedrop_kept"}
    # excluded sections name techniques
    for t in TECHNIQUES.values():
        assert set(t.excludes) <= set(TECHNIQUES), t.name


def test_the_figures_come_from_each_technique():
    from tests.user_models import tiny_resnet

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    for name, keys, wording in (
        ("stochastic_depth", {"sd_survival", "sd_planned", "sd_kept"}, r"kept \d\.\d\d \(planned "
         r"0\.67\), survival 0\.67"),
        ("shakedrop", {"shakedrop_kept", "shakedrop_planned"}, r"ShakeDrop kept \d\.\d\d "
         r"\(planned 0\.67\)"),
    ):  # fmt: skip
        model = retrofit.apply(tiny_resnet(width=4, depth=3), {name: {}}, example_input=x)
        model.train()
        model(x)
        summary = retrofit.schedule.summary(retrofit.schedule.current_rates(model))
        assert set(summary) == keys, name
        from retrofit.techniques import console_parts

        assert re.fullmatch(wording, ", ".join(console_parts(summary))), summary


def test_verification_passes_come_from_the_records():
    from retrofit.layers import StochasticDepthGate
    from retrofit.techniques import liveness_paths
    from tests.user_models import tiny_resnet

    x = torch.randn(2, 3, 16, 16)
    labels = {}
    for mode in ("row", "batch"):
        model = tiny_resnet(width=4, depth=2)
        retrofit.apply(model, {"stochastic_depth": {"mode": mode}}, example_input=x)
        paths = liveness_paths(model)
        labels[mode] = [label for label, _, _ in paths]
        gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
        assert all(set(layers) == set(gates) for _, layers, _ in paths)
        if mode == "batch":
            with paths[1][2]():
                assert [g.forced for g in gates] == [False, False]
            assert [g.forced for g in gates] == [None, None]
    assert labels == {
        "row": ["every stochastic-depth branch kept"],
        "batch": ["every stochastic-depth branch kept", "every stochastic-depth branch dropped"],
    }
    shaken = retrofit.apply(tiny_resnet(width=4), {"shakedrop": {}}, example_input=x)
    assert liveness_paths(shaken) == []  # its branches always run: one pass as it draws


def test_the_trainer_applies_the_records_input_transforms():
    from retrofit.layers import cutout
    from retrofit.train import distributed as D
    from retrofit.train.loop import _regularizers, _transform

    recipe = retrofit.load_recipe({"cutout": {"n_holes": 2, "length": 4}})
    hooks = _regularizers(nn.Identity(), recipe, D.DistEnv())
    assert len(hooks.transforms) == 1 and hooks.cut_gen is not None
    x = torch.ones(3, 1, 8, 8)
    hooks.cut_gen.manual_seed(7)
    got = _transform(hooks, x)
    expected = cutout(x, 2, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, expected) and (got == 0).any()
    none = _regularizers(nn.Identity(), retrofit.load_recipe({"uout": {}}), D.DistEnv())
    assert none.transforms == [] and none.cut_gen is None


# Technique names that may appear as string literals outside retrofit/techniques/ and the recipe
# schema, each with why it is not dispatch.
_ALLOWED_NAMES = {
    # a name models give their own drop-path modules (torchvision's ``stochastic_depth``
    # attribute), matched to recognise an existing slot: the model's name, not the technique's
    ("retrofit/analysis/residual.py", "stochastic_depth"),
}


def _not_dispatch(tree: Any) -> set[int]:
    """String constants that name without dispatching: docstrings, ``__all__`` entries, the
    functional forms registered with ``torch.fx.wrap("…")``, a layer's ``kind = "…"`` (which its
    record reads: checked above)."""
    import ast

    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            out.add(id(body[0].value))
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("__all__", "kind") for t in node.targets
        ):
            out |= {id(c) for c in ast.walk(node.value)}
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "wrap":
            out |= {id(c) for c in node.args}
    return out


def test_nothing_outside_the_records_dispatches_on_a_technique_name():
    import ast

    found = set()
    for path in (ROOT / "retrofit").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("retrofit/techniques/") or rel == "retrofit/recipe.py":
            continue
        tree = ast.parse(path.read_text())
        skip = _not_dispatch(tree)
        found |= {
            (rel, node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in TECHNIQUES and id(node) not in skip
        }
    assert found == _ALLOWED_NAMES


def test_the_trainer_reaches_layers_only_through_their_protocols():
    """No module of retrofit/train imports a layer (the gate, ``is_gate``, its counters or seeded
    draws) or a technique's module: what it needs of layers (seeding under DDP, the counters a
    checkpoint carries) is typed in ``retrofit.layers.protocol``, what it needs of techniques is
    read from the records."""
    import ast

    found = set()
    for path in sorted((ROOT / "retrofit" / "train").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for m in modules:
                layer = m.startswith("retrofit.layers") and m not in (
                    "retrofit.layers.protocol",
                    *(f"retrofit.layers.protocol.{n}" for n in protocol.__all__),
                )
                technique = m.startswith("retrofit.techniques.") and m.split(".")[2] in TECHNIQUES
                if layer or technique:
                    found.add((rel, m))
    assert found == set()
    assert "is_gate" not in (ROOT / "retrofit/train/loop.py").read_text()
    assert "is_gate" not in (ROOT / "retrofit/train/distributed.py").read_text()


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
