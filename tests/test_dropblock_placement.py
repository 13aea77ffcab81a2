"""DropBlock placement (Ghiasi et al. 2018): the ``dropblock:`` planner, rewrite, schedule, strip.

Plans are made on meta-device models; ``apply`` runs on small real models at 64×64 so that its
eval-equivalence check has real numbers to compare.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import retrofit
from retrofit import schedule
from retrofit.errors import RecipeError
from retrofit.graph.stages import NoConvStagesError
from retrofit.layers import DropBlock, StochasticDepthGate
from tests.user_models import TinyResNet

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X32 = X64[:1, :, :32, :32].clone()  # the bigger models: verification only needs a few pixels


def meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return getattr(torchvision.models, name)(**kwargs)


def real(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


def dropblocks(model: nn.Module) -> dict[str, DropBlock]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DropBlock)}


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


# --------------------------------------------------------------------------- plans


def test_stages_3_4_on_resnet50_go_after_layer3_and_layer4():
    plan = retrofit.plan(meta("resnet50"), {"dropblock": {"stages": [3, 4]}})
    edits = plan.by_kind("dropblock")
    assert [(e.module, e.node, e.action, e.key, e.ordinal, e.target) for e in edits] == [
        ("", "layer3", "insert_after", "module:layer3", 0, "layer3"),
        ("", "layer4", "insert_after", "module:layer4", 0, "layer4"),
    ]
    assert [e.params for e in edits] == [
        {"block_size": 7, "keep_prob": 0.9, "per_channel": False, "ramp": 1.0}
    ] * 2
    assert [e.note for e in edits] == [
        "after stage 3 (layer3, reduction 16)",
        "after stage 4 (layer4, reduction 32)",
    ]
    d = edits[0].to_dict()
    assert {"kind", "module", "node", "params", "note"} <= set(d)
    assert d["kind"] == "dropblock" and d["module"] == ""


def test_stages_by_name_and_index_are_the_same():
    model = meta("resnet50")
    by_index = retrofit.plan(model, {"dropblock": {"stages": [3, 4]}}).to_dict()["edits"]
    by_name = retrofit.plan(model, {"dropblock": {"stages": ["layer4", 3]}}).to_dict()["edits"]
    assert by_name == by_index
    # The same stage named twice (by index and by name) gets one DropBlock.
    both = retrofit.plan(model, {"dropblock": {"stages": [3, "layer3"]}})
    assert [e.node for e in both.edits] == ["layer3"]


def test_timm_resnet50_uses_its_feature_info_names():
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    plan = retrofit.plan(model, {"dropblock": {"stages": [3, 4], "keep_prob": 0.8}})
    assert [(e.module, e.node, e.params["keep_prob"]) for e in plan.edits] == [
        ("", "layer3", 0.8),
        ("", "layer4", 0.8),
    ]


def test_sequential_owned_stages():
    plan = retrofit.plan(meta("convnext_tiny"), {"dropblock": {"stages": [3, 4]}})
    assert [(e.module, e.node, e.target, e.source) for e in plan.edits] == [
        ("features", "_5", "features.5", None),
        ("features", "_7", "features.7", None),
    ]


@pytest.mark.parametrize(
    ("stages", "bad", "hint"),
    [
        ([3, 5], 5, "the model has 4 stages"),
        (["layer9"], "layer9", "not a stage module of this model"),
        (["layer3.0"], "layer3.0", "not a stage module of this model"),
    ],
)
def test_bad_stages_name_the_field(stages, bad, hint):
    with pytest.raises(RecipeError) as info:
        retrofit.plan(meta("resnet50"), {"dropblock": {"stages": stages}})
    err = info.value
    assert (err.field, err.value) == ("dropblock.stages", bad)
    assert err.allowed == "1..4 or one of [layer1, layer2, layer3, layer4]"
    assert hint in str(err) and "dropblock.stages" in str(err)


def test_vit_gets_a_clear_error():
    with pytest.raises(NoConvStagesError, match="DropBlock does not apply: no conv feature maps"):
        retrofit.plan(meta("vit_b_16"), {"dropblock": {"stages": [3, 4]}})


def test_block_size_larger_than_the_map_is_clamped_and_noted():
    plan = retrofit.plan(meta("resnet50"), {"dropblock": {"stages": [3, 4], "block_size": 9}})
    layer3, layer4 = plan.edits
    assert layer3.params["block_size"] == 9  # 14×14: fits
    assert layer3.note == "after stage 3 (layer3, reduction 16)"
    assert layer4.params["block_size"] == 7
    assert layer4.note == (
        "after stage 4 (layer4, reduction 32); block_size 9 clamped to 7: larger than the 7×7 "
        "map at the 224×224 probe input"
    )


def test_blocks_placement_on_resnet50_is_one_per_residual_block():
    plan = retrofit.plan(meta("resnet50"), {"dropblock": {"stages": [3, 4], "placement": "blocks"}})
    edits = plan.by_kind("dropblock")
    assert [(e.module, e.node, e.block) for e in edits] == [
        *[("layer3", f"_{i}", f"layer3.{i}") for i in range(6)],
        *[("layer4", f"_{i}", f"layer4.{i}") for i in range(3)],
    ]
    assert edits[0].note == "after block 1/6 of stage 3 (layer3, reduction 16)"
    assert edits[-1].note == "after block 3/3 of stage 4 (layer4, reduction 32)"


def test_blocks_placement_without_residual_blocks_falls_back_to_the_stage():
    plan = retrofit.plan(meta("vgg11"), {"dropblock": {"stages": [3], "placement": "blocks"}})
    (edit,) = plan.edits
    assert (edit.module, edit.node, edit.target) == ("features", "_19", "features.19")
    assert edit.note.endswith("no residual blocks in this stage: placed on the stage output")


# --------------------------------------------------------------------------- apply / schedule / strip


def test_apply_resnet18_stages_3_4():
    model = real("resnet18")
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    reference = eval_out(model, X64)

    retrofit.apply(model, {"dropblock": {"stages": [3, 4]}}, example_input=X64)

    assert type(model) is torchvision.models.ResNet
    assert list(model.state_dict()) == keys
    blocks = dropblocks(model)
    assert list(blocks) == ["retrofit_dropblock0", "retrofit_dropblock1"]
    assert all(b.keep_prob == 1.0 and b.target_keep_prob == 0.9 for b in blocks.values())
    assert all(b.block_size == 7 for b in blocks.values())
    torch.testing.assert_close(eval_out(model, X64), reference, rtol=0, atol=0)

    # Training mode: identical to the original at progress 0 (keep_prob 1), different once
    # the schedule has ramped keep_prob to its target.
    model.train()
    original.train()
    schedule.update(model, 0.0)
    torch.testing.assert_close(model(X64), original(X64))
    schedule.update(model, 0.5)
    assert [b.keep_prob for b in blocks.values()] == [pytest.approx(0.95, abs=1e-15)] * 2
    schedule.update(model, 1.0)
    assert [b.keep_prob for b in blocks.values()] == [0.9, 0.9]
    torch.manual_seed(1)
    assert not torch.allclose(model(X64), original(X64))

    # The stage outputs go through the DropBlocks: a hook sees layer3's 4×4 map at 64×64.
    seen = []
    handle = blocks["retrofit_dropblock0"].register_forward_hook(
        lambda m, i, o: seen.append(tuple(i[0].shape))
    )
    eval_out(model, X64)
    handle.remove()
    assert seen == [(2, 256, 4, 4)]

    retrofit.strip(model)
    assert dropblocks(model) == {}
    assert "forward" not in model.__dict__
    # The training steps above moved BatchNorm statistics apart; with the same weights the
    # stripped model is the original function again.
    original.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(eval_out(model, X64), eval_out(original, X64), rtol=0, atol=0)


def test_apply_resnet50_blocks_placement():
    model = real("resnet50")
    keys = list(model.state_dict())
    reference = eval_out(model, X32)
    retrofit.apply(
        model, {"dropblock": {"stages": [3, 4], "placement": "blocks"}}, example_input=X32
    )
    names = list(dropblocks(model))
    assert len(names) == 9
    assert names == [f"layer3.retrofit_dropblock{i}" for i in range(6)] + [
        f"layer4.retrofit_dropblock{i}" for i in range(3)
    ]
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(eval_out(model, X32), reference, rtol=0, atol=0)
    retrofit.strip(model)
    assert dropblocks(model) == {}
    assert "forward" not in model.layer3.__dict__


def test_apply_mobilenet_v3_sequential_owner():
    model = real("mobilenet_v3_large")
    reference = eval_out(model, X32)
    retrofit.apply(model, {"dropblock": {"stages": [3, 4]}}, example_input=X32)
    assert list(dropblocks(model)) == [
        "features.retrofit_dropblock0",
        "features.retrofit_dropblock1",
    ]
    torch.testing.assert_close(eval_out(model, X32), reference, rtol=0, atol=0)


def test_dropblock_with_stochastic_depth():
    model = real("resnet18")
    reference = eval_out(model, X64)
    recipe = {"stochastic_depth": {"p_L": 0.8}, "dropblock": {"stages": [4], "placement": "blocks"}}
    retrofit.apply(model, recipe, example_input=X64)
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    assert len(gates) == 8
    assert list(dropblocks(model)) == ["layer4.retrofit_dropblock0", "layer4.retrofit_dropblock1"]
    torch.testing.assert_close(eval_out(model, X64), reference, rtol=0, atol=0)


def test_user_model_small_image_blocks():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    reference = eval_out(model, x)
    retrofit.apply(model, {"dropblock": {"stages": [1], "placement": "blocks"}}, example_input=x)
    assert list(dropblocks(model)) == ["blocks.retrofit_dropblock0", "blocks.retrofit_dropblock1"]
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)


class RootResidual(nn.Module):
    """A residual add written in the model's own forward: no block module to place after."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.branch(x))
        return self.head(x.mean((2, 3)))


def test_root_level_residual_gets_dropblock_after_the_add():
    torch.manual_seed(0)
    model = RootResidual().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = retrofit.plan(model, {"dropblock": {"stages": [1], "placement": "blocks"}})
    (edit,) = plan.edits
    assert (edit.module, edit.node, edit.key, edit.block) == ("", "add", "add", None)
    reference = eval_out(model, x)
    retrofit.apply(model, plan.recipe, example_input=x)
    assert list(dropblocks(model)) == ["retrofit_dropblock0"]
    torch.testing.assert_close(eval_out(model, x), reference, rtol=0, atol=0)
