"""apply / strip on real models: eval equivalence, state_dict round trip, class kept, idempotence."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import retrofit
from retrofit.errors import VerifyError
from retrofit.layers import StochasticDepthGate

torch.set_num_threads(2)

SD = {"stochastic_depth": {}}


def gates(model: nn.Module) -> list[StochasticDepthGate]:
    return [m for m in model.modules() if isinstance(m, StochasticDepthGate)]


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


CASES = [
    # (factory, input size, expected sites)
    (lambda: torchvision.models.resnet18(), 64, 8),
    (lambda: torchvision.models.resnet50(), 64, 16),
    (lambda: timm.create_model("resnet50"), 64, 16),
    (lambda: torchvision.models.mobilenet_v3_large(), 64, 10),
    (lambda: torchvision.models.efficientnet_b0(), 64, 9),
    (lambda: torchvision.models.convnext_tiny(), 64, 18),
    (lambda: torchvision.models.swin_t(), 64, 24),
    (lambda: torchvision.models.densenet121(), 64, 0),
    (lambda: timm.create_model("vit_tiny_patch16_224"), 224, 24),
]
IDS = [
    "tv_resnet18",
    "tv_resnet50",
    "timm_resnet50",
    "tv_mobilenet_v3_large",
    "tv_efficientnet_b0",
    "tv_convnext_tiny",
    "tv_swin_t",
    "tv_densenet121",
    "timm_vit_tiny",
]


# The two largest graphs (20-40 s each on 2 cores) run with the slow set.
SLOW_CASES = {"tv_swin_t", "tv_densenet121"}
PARAMS = [
    pytest.param(*case, id=name, marks=[pytest.mark.slow] if name in SLOW_CASES else [])
    for case, name in zip(CASES, IDS, strict=True)
]


@pytest.mark.parametrize(("factory", "size", "sites"), PARAMS)
def test_apply_keeps_the_model(factory, size, sites):
    torch.manual_seed(0)
    model = factory()
    original = copy.deepcopy(model)
    cls = type(model)
    x = torch.randn(2, 3, size, size)
    reference = eval_out(original, x)
    keys = list(model.state_dict())

    out = retrofit.apply(model, SD, example_input=x)
    assert out is model and type(model) is cls  # class kept, in place
    plan = retrofit.applied_plan(model)
    assert len(plan.by_kind("stochastic_depth")) == sites
    # eval output identical (apply verified it; check independently)
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)
    # state_dict: same keys and values; loads both ways with strict=True
    assert list(model.state_dict()) == keys
    model.load_state_dict(original.state_dict(), strict=True)
    fresh = factory()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(eval_out(fresh, x), reference, rtol=0, atol=0)
    # gates own nothing and every site is covered exactly once (gate or reused slot)
    assert all(not list(g.state_dict()) for g in gates(model))
    n_gates = len(gates(model))
    # idempotence: applying again leaves one gate per site
    retrofit.apply(model, SD, example_input=x)
    assert len(gates(model)) == n_gates
    # strip: the class's own forward again, no gates, same output
    retrofit.strip(model)
    assert not gates(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)


def test_timm_model_keeps_its_api():
    model = timm.create_model("resnet18", num_classes=5)
    retrofit.apply(model, SD, example_input=torch.randn(1, 3, 64, 64))
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 512, 2, 2)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_training_draws_per_sample_masks_with_the_schedule():
    model = torchvision.models.resnet18()
    retrofit.apply(
        model, {"stochastic_depth": {"p_L": 0.2}}, example_input=torch.randn(1, 3, 32, 32)
    )
    survivals = [g.survival for g in gates(model)]
    assert survivals == pytest.approx([1 - (depth / 8) * 0.8 for depth in range(1, 9)])
    assert [g.depth for g in gates(model)] == list(range(1, 9))
    model.train()
    x = torch.randn(64, 3, 32, 32)
    model(x).sum().backward()
    # each gate saw all 64 samples once and kept about p_l of them
    for g in gates(model):
        assert g.calls == 64
        assert (
            abs(g.kept_fraction - g.survival)
            < 4 * (g.survival * (1 - g.survival) / 64) ** 0.5 + 1e-9
        )


def test_existing_stochastic_depth_is_reused_not_doubled_and_restored():
    model = torchvision.models.efficientnet_b0()
    before = [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    retrofit.apply(model, SD, example_input=torch.randn(1, 3, 64, 64))
    assert not gates(model)
    after = [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    edits = retrofit.applied_plan(model).edits
    # the 9 residual slots now drop with 1 - p_l; the slots of non-residual blocks are untouched
    reused = {e.target: 1 - e.survival for e in edits}
    for (name, m), old in zip(
        ((n, m) for n, m in model.named_modules() if type(m).__name__ == "StochasticDepth"),
        before,
        strict=True,
    ):
        assert m.p == pytest.approx(reused.get(name, old))
    assert after != before
    retrofit.strip(model)
    assert [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"] == before


def test_timm_identity_placeholders_become_gates():
    model = timm.create_model("vit_tiny_patch16_224")  # drop_path_rate=0: nn.Identity slots
    retrofit.apply(model, SD, example_input=torch.randn(1, 3, 224, 224))
    assert isinstance(model.blocks[0].drop_path1, StochasticDepthGate)
    assert model.blocks[0].drop_path1.survival == model.blocks[0].drop_path2.survival
    assert model.blocks[11].drop_path2.survival == pytest.approx(0.5)
    retrofit.strip(model)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)


def test_paper_scaling_scales_the_branch_in_eval():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    reference = eval_out(model, x)
    retrofit.apply(model, {"stochastic_depth": {"scaling": "paper"}}, example_input=x)
    assert not torch.allclose(eval_out(model, x), reference)  # H = ReLU(p_l·f_l + id), by design
    for g in gates(model):
        g.survival = 1.0
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)


def test_sequential_containers_keep_their_length():
    model = torchvision.models.mobilenet_v3_large()
    lengths = {n: len(m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)}
    retrofit.apply(model, SD, example_input=torch.randn(1, 3, 64, 64))
    assert {n: len(m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)} == lengths


def test_deepcopy_of_a_retrofitted_model_is_independent():
    model = torchvision.models.resnet18()
    retrofit.apply(model, SD, example_input=torch.randn(1, 3, 32, 32))
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(eval_out(twin, x), eval_out(model, x))
    gates(twin)[0].survival = 0.123
    assert gates(model)[0].survival != 0.123
    # the copy's rewritten forward runs the copy's gates, not the original's
    twin.train()
    twin(x)
    assert gates(twin)[0].calls == 2 and gates(model)[0].calls == 0


def test_verify_restores_the_model_when_outputs_differ(monkeypatch):
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    reference = eval_out(model, x)

    def broken(self, x, *args, **kwargs):  # a gate that is not the identity in eval
        return x * 2

    monkeypatch.setattr(StochasticDepthGate, "forward", broken)
    with pytest.raises(VerifyError, match="eval output changed"):
        retrofit.apply(model, SD, example_input=x)
    monkeypatch.undo()
    assert not gates(model) and all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)


def test_eval_runs_the_code_as_written_unless_a_layer_changes_eval():
    """Inverted-scaling gates are the identity in eval: the owners run their class's forward
    there (the gates are not called, the output is the original's bit for bit, nothing is
    generated for eval). The paper's scaling multiplies a branch by p_l at test time: the eval
    graph is edited and the gates run."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    reference = eval_out(model, x)
    for scaling, called in (("inverted", 0), ("paper", 8)):
        retrofit.apply(model, {"stochastic_depth": {"scaling": scaling}}, example_input=x)
        forwards = [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__]
        assert len(forwards) == 8
        before = [len(f.specialised) for f in forwards]
        seen = []
        hooks = [g.register_forward_hook(lambda *a, s=seen: s.append(1)) for g in gates(model)]
        out = eval_out(model, x)
        for h in hooks:
            h.remove()
        assert len(seen) == called
        if scaling == "inverted":  # nothing was generated for eval
            assert [len(f.specialised) for f in forwards] == before
        if scaling == "inverted":
            torch.testing.assert_close(out, reference, rtol=0, atol=0)
        else:  # each block's branch times its p_l: not the original function
            assert not torch.allclose(out, reference)
    retrofit.strip(model)
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)


def test_verification_runs_the_outlined_training_code_in_eval(monkeypatch):
    """Batch mode moves each branch into a function of its own that the gate calls. Under
    inverted scaling the gate is the identity in eval, so one generated forward per block serves
    both modes and verification's eval forward runs it: the outlined branch and the gate's add
    are what the comparison with the original checks. A gate whose add is wrong is refused (the
    model handed back as it came). Paper scaling changes eval: its eval code is its own."""
    import importlib

    sd_layer = importlib.import_module("retrofit.layers.stochastic_depth")  # the module

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    reference = eval_out(model, x)
    batch = {"stochastic_depth": {"mode": "batch"}}

    def subtracted(shortcut, out, alpha, index, spec):
        return shortcut - alpha * out

    monkeypatch.setattr(sd_layer, "_residual_add", subtracted)
    with pytest.raises(VerifyError, match="eval output changed"):
        retrofit.apply(model, batch, example_input=x)
    monkeypatch.undo()
    assert not gates(model) and all("forward" not in m.__dict__ for m in model.modules())
    for scaling, modes in (("inverted", [None]), ("paper", [False, True])):
        recipe = {"stochastic_depth": {"mode": "batch", "scaling": scaling}}
        retrofit.apply(model, recipe, example_input=x)
        forwards = [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__]
        assert len(forwards) == 8 and all(g.outlined for g in gates(model))
        assert [sorted(s.training for s in f.specialised) for f in forwards] == [modes] * 8
    retrofit.strip(model)
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)


def test_meta_model_plans_but_apply_needs_weights():
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    assert len(retrofit.plan(model, SD).edits) == 8
    with pytest.raises(VerifyError, match="meta device"):
        retrofit.apply(model, SD)
    retrofit.apply(model, SD, verify=False)
    assert len(gates(model)) == 8


class KwargBlock(nn.Module):
    """A block with an optional argument: the rewrite specialises it to its default."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        return x + self.f(x)


def test_optional_arguments_fall_back_to_the_original_forward():
    block = KwargBlock().eval()
    x = torch.randn(4, 8)
    ref_default, ref_scaled = block(x), block(x, scale=2.0)
    retrofit.apply(block, SD, example_input=x)
    assert len(gates(block)) == 1
    torch.testing.assert_close(block(x), ref_default)
    torch.testing.assert_close(block(x, scale=2.0), ref_scaled)
    torch.testing.assert_close(block(x, None), ref_default)


def test_a_nested_young_objects_only_leaves_the_outer_freeze_alone(monkeypatch):
    """``plan`` inside ``apply``: the inner body neither unfreezes on exit nor asks the frozen
    count (``gc.get_freeze_count`` walks the frozen list, ~30 ms with timm imported)."""
    import gc

    from retrofit.capture import sandbox

    with sandbox.young_objects_only():
        frozen = gc.get_freeze_count()
        asked = []
        monkeypatch.setattr(sandbox.gc, "get_freeze_count", lambda: asked.append(1) or frozen)
        with sandbox.young_objects_only():
            pass
        monkeypatch.undo()
        assert asked == [] and gc.get_freeze_count() == frozen > 0
    assert gc.get_freeze_count() == 0


def test_apply_sets_old_objects_aside_from_the_collector_and_puts_them_back(monkeypatch):
    """Full collections during apply walk only what apply created (``gc.freeze`` on entry,
    ``gc.unfreeze`` on exit, also after a refusal); objects the process froze itself stay
    frozen, and apply then leaves the collector alone."""
    import gc

    import retrofit.api
    from retrofit.capture import sandbox

    seen = []
    original = sandbox.young_objects_only

    def spy():
        seen.append(gc.get_freeze_count())
        return original()

    monkeypatch.setattr(retrofit.api, "young_objects_only", spy)
    model = torchvision.models.resnet18(num_classes=4)
    with sandbox.young_objects_only():
        frozen_inside = gc.get_freeze_count()
    assert gc.get_freeze_count() == 0 and frozen_inside > 0
    retrofit.apply(model, {"stochastic_depth": {}}, example_input=torch.randn(2, 3, 32, 32))
    assert gc.get_freeze_count() == 0
    with torch.device("meta"):
        on_meta = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(VerifyError, match="needs real weights"):
        retrofit.apply(on_meta, {"stochastic_depth": {}})
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the process's own frozen objects
    try:
        mine = gc.get_freeze_count()
        with sandbox.young_objects_only():
            assert gc.get_freeze_count() == mine
        assert gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()
    assert seen == [0, 0]
