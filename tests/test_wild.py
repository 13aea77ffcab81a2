"""Acceptance tests of issue 10 on hand-written models (``tests/wild_models.py``).

For each failure class, ``retrofit.apply`` either instruments the model — the exact residual
sites known by construction, eval output unchanged on a fresh input, every module it added,
replaced or re-rated called in one training forward (row and batch mode) — or, where the case
allows it, refuses with a retrofit error and hands the model back exactly as it came.
``retrofit.plan`` is pure and repeatable on every one of them.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import retrofit
from tests.checks import (
    assert_instrumented,
    assert_trains,
    assert_unchanged,
    differences,
    retrofit_errors,
    snapshot,
)
from tests.wild_models import (
    CASES,
    IMAGE,
    AuxOutputNet,
    CifarFlattenNet,
    DropoutBeforeNdimBN,
    FeatureListEncoder,
    HiddenInplaceNet,
    OwnDropPathMixer,
    WildCase,
    WrappedInplaceActNet,
    image,
    sequential_resnet,
)

MODES = ("row", "batch")


def _build(case: WildCase) -> torch.nn.Module:
    torch.manual_seed(0)
    model = case.build()
    if case.eval_first:
        model.eval()
    return model


def _image(case: WildCase, seed: int) -> torch.Tensor:
    """The case's input: the tests' 16-px RGB image, or the shape its ``extra["input"]`` says."""
    return image(seed, size=case.extra.get("input", IMAGE))


def _site_owners(model: torch.nn.Module) -> Counter:
    plan = retrofit.applied_plan(model)
    assert plan is not None, "apply returned but recorded no plan"
    return Counter(e.module for e in plan.by_kind("stochastic_depth"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_apply_instruments_or_refuses_cleanly(case: WildCase, mode: str):
    model = _build(case)
    x_probe, x_fresh = _image(case, 0), _image(case, 1)
    snap = snapshot(model, x_fresh)
    try:
        retrofit.apply(model, {"stochastic_depth": {"mode": mode}}, example_input=x_probe)
    except retrofit_errors() as e:
        assert_unchanged(model, snap, x_fresh)
        assert case.expect == "either", f"{case.failure}: refused ({type(e).__name__}: {e})"
        return
    assert _site_owners(model) == Counter(case.owners), case.failure
    assert_instrumented(model, snap, x_probe, x_fresh)
    assert_trains(model, x_probe)
    retrofit.strip(model)
    assert_unchanged(model, snap, x_fresh)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan_is_pure_and_repeatable(case: WildCase):
    model = _build(case)
    x = _image(case, 1)
    # at the default probe size, or at the case's own input when it is not an RGB image
    given = {"example_input": _image(case, 0)} if "input" in case.extra else {}
    snap = snapshot(model, x)
    first = retrofit.plan(model, {"stochastic_depth": {}}, **given)
    assert not differences(model, snap, x)
    second = retrofit.plan(model, {"stochastic_depth": {}}, **given)
    assert first.to_dict() == second.to_dict()
    assert_unchanged(model, snap, x)


@pytest.mark.parametrize("mode", MODES)
def test_own_drop_path_is_reused_not_doubled(mode: str):
    """One stochastic-depth operation per residual branch: the model's own ``TinyDropPath``
    (re-rated) or retrofit's gate in its slot or on the branch (the slot then at rate 0)."""
    torch.manual_seed(0)
    model = OwnDropPathMixer()
    before = {n for n, _ in model.named_modules()}
    retrofit.apply(model, {"stochastic_depth": {"mode": mode}}, example_input=image(0))
    plan = retrofit.applied_plan(model)
    survival = {e.module: e.survival for e in plan.by_kind("stochastic_depth")}
    assert sorted(survival) == ["blocks.0", "blocks.1", "blocks.2"]
    for block, p_l in survival.items():
        active = []
        for name, m in model.get_submodule(block).named_modules():
            rate = getattr(m, "drop_prob", None)
            if type(m).__name__ == "StochasticDepthGate" and m.survival < 1.0:
                active.append((name, 1.0 - m.survival))
            elif isinstance(rate, float) and rate > 0.0:
                active.append((name, rate))
        assert len(active) == 1, f"{block}: stochastic depth applied {len(active)} times: {active}"
        assert active[0][1] == pytest.approx(1.0 - p_l)
    if mode == "row":
        # the slot itself is reused: nothing added beside it
        assert {n for n, _ in model.named_modules()} == before


def test_stages_of_an_encoder_returning_feature_maps():
    """Issue 10, item 5: an encoder whose forward returns a list of maps has stages."""
    stages = retrofit.stages(FeatureListEncoder(), example_input=image(0))
    assert [(s.index, s.module, s.reduction) for s in stages] == [
        (1, "layer1", 2),
        (2, "layer2", 4),
        (3, "layer3", 8),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_einops_transformer_with_class_attention(mode: str):
    """vit-pytorch's style (einops, block pairs in a ModuleList) and CaiT's class attention: every
    residual found, one depth per block, the learned class token's first residual included."""
    pytest.importorskip("einops")
    from tests.einops_models import EinopsCaiT

    torch.manual_seed(0)
    model = EinopsCaiT(depth=2, cls_depth=2)
    x_probe, x_fresh = image(0), image(1)
    snap = snapshot(model, x_fresh)
    plan = retrofit.plan(model, {"stochastic_depth": {"mode": mode}}, example_input=x_probe)
    assert plan.skipped == []
    blocks = [e.block for e in plan.edits]
    expected = [f"transformer.layers.{i}" for i in (0, 1)] + [
        f"cls_transformer.layers.{i}" for i in (0, 1)
    ]
    assert blocks == [b for b in expected for _ in range(2)]
    # one depth per block, linear from 1 - 0.5/4 down to p_L = 0.5
    assert [e.depth for e in plan.edits] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [e.survival for e in plan.edits[::2]] == pytest.approx([0.875, 0.75, 0.625, 0.5])
    retrofit.apply(model, {"stochastic_depth": {"mode": mode}}, example_input=x_probe)
    assert_instrumented(model, snap, x_probe, x_fresh)
    retrofit.strip(model)
    assert_unchanged(model, snap, x_fresh)


# --- issue 22 ---------------------------------------------------------------------------------


def _dropblocks(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "DropBlock"]


@pytest.mark.parametrize("placement", ["stages", "blocks"])
def test_dropblock_after_blocks_returning_tuples(placement: str):
    """Class 3: ``y, aux = block(x)``: the DropBlock goes on ``y`` inside the block's own code,
    never on the call's tuple (an internal AttributeError in the layer before)."""
    torch.manual_seed(0)
    model = AuxOutputNet()
    x_probe, x_fresh = image(0), image(1)
    snap = snapshot(model, x_fresh)
    recipe = {"dropblock": {"stages": [2], "placement": placement}}
    retrofit.apply(model, recipe, example_input=x_probe)
    edits = [(e.module, e.node) for e in retrofit.applied_plan(model).edits]
    blocks = ["layer2.0", "layer2.1"] if placement == "blocks" else ["layer2.1"]
    assert edits == [(b, "relu_1") for b in blocks]
    assert_instrumented(model, snap, x_probe, x_fresh, expected=len(blocks))
    assert_trains(model, x_probe)
    retrofit.strip(model)
    assert_unchanged(model, snap, x_fresh)


def test_dropblock_plans_at_the_example_input():
    """Class 4: a net that only runs at 32×32 is planned at its example input (a ShapePropError
    at the default 224² before)."""
    torch.manual_seed(0)
    model = CifarFlattenNet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    snap = snapshot(model, fresh)
    retrofit.apply(model, {"dropblock": {"stages": [2, 3]}}, example_input=x)
    plan = retrofit.applied_plan(model)
    assert [(e.module, e.node, e.params["block_size"]) for e in plan.edits] == [
        ("", "layer2", 7),
        ("", "layer3", 7),
    ]
    assert_instrumented(model, snap, x, fresh, expected=2)
    assert_trains(model, x)


@pytest.mark.parametrize("placement", ["stages", "blocks"])
def test_dropblock_on_a_sequential_resnet_goes_into_its_blocks(placement: str):
    """Class 6, handled: no module with code of its own calls the stages (a ResNet built as
    nested Sequentials, refused before). A stage's output is its last block's output, so the
    DropBlock goes into that block's own forward, after its final ReLU; the Sequentials keep
    their length (the stages ``3`` and ``4`` are the model's members 3 and 4)."""
    torch.manual_seed(0)
    model = sequential_resnet()
    x_probe, x_fresh = image(0), image(1)
    assert [(s.index, s.module) for s in retrofit.stages(model, example_input=x_probe)] == [
        (1, "2"),
        (2, "3"),
        (3, "4"),
    ]
    snap = snapshot(model, x_fresh)
    recipe = {"dropblock": {"stages": [2, 3], "placement": placement}}
    retrofit.apply(model, recipe, example_input=x_probe)
    edits = [(e.module, e.node) for e in retrofit.applied_plan(model).edits]
    blocks = ["3.0", "3.1", "4.0", "4.1"] if placement == "blocks" else ["3.1", "4.1"]
    assert edits == [(b, "relu_2") for b in blocks]
    assert _dropblocks(model) == [f"{b}.retrofit_dropblock0" for b in blocks]
    assert [len(model), len(model[3]), len(model[4])] == [8, 2, 2]
    assert_instrumented(model, snap, x_probe, x_fresh, expected=len(blocks))
    assert_trains(model, x_probe)
    retrofit.strip(model)
    assert_unchanged(model, snap, x_fresh)


@pytest.mark.parametrize(
    "build",
    [DropoutBeforeNdimBN, *(c.build for c in CASES)],
    ids=["ndim_batchnorm", *(c.name for c in CASES)],
)
def test_lint_leaves_the_state_dict_bit_identical(build):
    """Class 5: lint changes nothing (``num_batches_tracked`` went 0 → 1 before, when a
    BatchNorm subclass was traced in training mode)."""
    torch.manual_seed(0)
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    case = next((c for c in CASES if c.build is build), None)
    findings = retrofit.lint(model, example_input=_image(case, 0) if case else image(0))
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == []
    if build is DropoutBeforeNdimBN:
        assert [(f.dropout, f.norm) for f in findings] == [("drop", "bn2")]


def test_a_rewrite_that_cannot_train_is_refused_before_it_is_handed_back():
    """Class 1 at the liveness check: nothing says that ``InplaceScale`` writes its input, so
    batch mode outlines the sites and a dropped branch hands the shortcut to it. Only a training
    step with every branch dropped shows it (a forward under no_grad at survival 1 did not);
    the model comes back as it was. Row mode computes every branch: it trains, and the check
    leaves no gradient behind."""
    torch.manual_seed(0)
    model = HiddenInplaceNet()
    snap = snapshot(model, image(1))
    with pytest.raises(
        retrofit.VerifyError,
        match="cannot train: a training step with every stochastic-depth branch dropped failed",
    ):
        retrofit.apply(model, {"stochastic_depth": {"mode": "batch"}}, example_input=image(0))
    assert_unchanged(model, snap, image(1))
    retrofit.apply(model, {"stochastic_depth": {"mode": "row"}}, example_input=image(0))
    assert all(p.grad is None for p in model.parameters())
    assert_trains(model, image(0))


def test_liveness_takes_both_paths_of_every_batch_mode_gate(monkeypatch):
    """The liveness step forces every batch-mode gate kept, then dropped, with gradients on."""
    from retrofit.layers import StochasticDepthGate

    seen = []
    original = StochasticDepthGate._outlined

    def spy(self, shortcut, inputs, branch, spec):
        out = original(self, shortcut, inputs, branch, spec)
        seen.append((self.depth, self.forced, torch.is_grad_enabled()))
        return out

    monkeypatch.setattr(StochasticDepthGate, "_outlined", spy)
    torch.manual_seed(0)
    model = WrappedInplaceActNet()
    retrofit.apply(model, {"stochastic_depth": {"mode": "batch"}}, example_input=image(0))
    checked = [s for s in seen if s[1] is not None]
    assert checked == [(d, keep, True) for keep in (True, False) for d in (1, 2, 3)]
    assert all(g.forced is None for g in model.modules() if isinstance(g, StochasticDepthGate))
