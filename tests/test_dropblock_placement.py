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
from retrofit.analysis.stages import NoConvStagesError
from retrofit.errors import RecipeError
from retrofit.layers import DropBlock, StochasticDepthGate
from retrofit.techniques.dropblock import SequentialOwnerError
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
    # layer3/layer4 are nn.Sequential (pass-through): the root ResNet owns the call of their last
    # Bottleneck, layer3.5 (6 blocks) and layer4.2 (3 blocks); target names the stage.
    assert [(e.module, e.node, e.action, e.key, e.ordinal, e.target) for e in edits] == [
        ("", "layer3_5", "insert_after", "module:layer3.5", 0, "layer3"),
        ("", "layer4_2", "insert_after", "module:layer4.2", 0, "layer4"),
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
    assert [(e.node, e.target) for e in both.edits] == [("layer3_5", "layer3")]


def test_timm_resnet50_uses_its_feature_info_names():
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    plan = retrofit.plan(model, {"dropblock": {"stages": [3, 4], "keep_prob": 0.8}})
    # timm's layer3/layer4 are nn.Sequential too (3, 4, 6, 3 Bottlenecks).
    assert [(e.module, e.node, e.target, e.params["keep_prob"]) for e in plan.edits] == [
        ("", "layer3_5", "layer3", 0.8),
        ("", "layer4_2", "layer4", 0.8),
    ]


def test_sequential_owned_stages():
    # torchvision ConvNeXt: features and each stage features.N are nn.Sequential, so the root
    # ConvNeXt owns the call of the stage's last CNBlock (convnext_tiny: 9 blocks in features.5,
    # 3 in features.7), made by ``x = self.features(x)`` in its _forward_impl (line 171).
    plan = retrofit.plan(meta("convnext_tiny"), {"dropblock": {"stages": [3, 4]}})
    assert [(e.module, e.node, e.key, e.target) for e in plan.edits] == [
        ("", "features_5_8", "module:features.5.8", "features.5"),
        ("", "features_7_2", "module:features.7.2", "features.7"),
    ]
    assert [e.source.rpartition("/")[2] for e in plan.edits] == ["convnext.py:171"] * 2


def table_rows(plan) -> list[list[str]]:
    """The edit rows of ``plan.table()``, split into cells (cells hold no double space)."""
    lines = plan.table().splitlines()
    return [
        [c.strip() for c in line.split("  ") if c.strip()]
        for line in lines[2 : 2 + len(plan.edits)]
    ]


def test_plan_table_says_which_stage_each_dropblock_follows():
    # The located node is the last Bottleneck's call; the table names the stage and the stage
    # module the DropBlock follows, so the user sees "3  layer3" without knowing the owner rule,
    # and the forward that gets the edit (the root's).
    plan = retrofit.plan(meta("resnet50"), {"dropblock": {"stages": [3, 4]}})
    assert plan.table().splitlines()[1].split()[:4] == ["stage", "after", "block_size", "keep_prob"]
    rows = table_rows(plan)
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("3", "layer3", "7", "0.9", "ResNet.forward"),
        ("4", "layer4", "7", "0.9", "ResNet.forward"),
    ]
    assert [e.note for e in plan.edits] == [
        "after stage 3 (layer3, reduction 16)",
        "after stage 4 (layer4, reduction 32)",
    ]
    # placement: blocks names each block.
    blocks = retrofit.plan(meta("resnet50"), {"dropblock": {"stages": [4], "placement": "blocks"}})
    assert [(r[0], r[1]) for r in table_rows(blocks)] == [("4", f"layer4.{i}") for i in range(3)]


def test_a_bare_sequential_cnn_cannot_take_a_dropblock():
    # Its only code is nn.Sequential.forward: inserting would make the DropBlock one more layer.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    with pytest.raises(SequentialOwnerError) as info:
        retrofit.plan(model, {"dropblock": {"stages": [1]}})
    assert str(info.value) == (
        "cannot place DropBlock after stage 1 (1, reduction 1): the model is a Sequential, whose "
        "forward only chains its children, and a DropBlock inserted there would become one more "
        "child; wrap it in a module with a forward of its own"
    )
    assert isinstance(info.value, ValueError)
    with pytest.raises(SequentialOwnerError):
        retrofit.apply(model, {"dropblock": {"stages": [1]}}, example_input=torch.randn(1, 3, 8, 8))
    assert len(model) == 7 and dropblocks(model) == {}


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
    # Every Bottleneck is called from the root's code (layer3/layer4 are pass-through).
    assert [(e.module, e.node, e.key, e.block, e.target) for e in edits] == [
        *[
            ("", f"layer3_{i}", f"module:layer3.{i}", f"layer3.{i}", f"layer3.{i}")
            for i in range(6)
        ],
        *[
            ("", f"layer4_{i}", f"module:layer4.{i}", f"layer4.{i}", f"layer4.{i}")
            for i in range(3)
        ],
    ]
    assert edits[0].note == "after block 1/6 of stage 3 (layer3, reduction 16)"
    assert edits[-1].note == "after block 3/3 of stage 4 (layer4, reduction 32)"


def test_blocks_placement_without_residual_blocks_falls_back_to_the_stage():
    plan = retrofit.plan(meta("vgg11"), {"dropblock": {"stages": [3], "placement": "blocks"}})
    (edit,) = plan.edits
    # vgg11's features.19 is the ReLU after the last conv at reduction 16, in the features
    # Sequential, which VGG.forward runs.
    assert (edit.module, edit.node, edit.target) == ("", "features_19", "features.19")
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

    # The stage outputs go through the DropBlocks in training (in eval the root runs its code
    # as written: DropBlock is the identity there): a hook sees layer3's 4×4 map at 64×64.
    seen = []
    handle = blocks["retrofit_dropblock0"].register_forward_hook(
        lambda m, i, o: seen.append(tuple(i[0].shape))
    )
    with torch.no_grad():
        model(X64)
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
    # All nine belong to the root, whose forward calls every Bottleneck; the Sequentials keep
    # their 6 and 3 blocks.
    assert list(dropblocks(model)) == [f"retrofit_dropblock{i}" for i in range(9)]
    assert (len(model.layer3), len(model.layer4)) == (6, 3)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(eval_out(model, X32), reference, rtol=0, atol=0)
    # Each one masks its block's output in training: layer3.i's at 2×2 (X32 / 16), layer4.i's
    # at 1×1 (a batch of two: BatchNorm in training needs more than one value per channel).
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, tuple(i[0].shape))))
        for n, m in dropblocks(model).items()
    ]
    model.train()
    with torch.no_grad():
        model(X32.repeat(2, 1, 1, 1))
    for h in hooks:
        h.remove()
    assert seen == [(f"retrofit_dropblock{i}", (2, 1024, 2, 2)) for i in range(6)] + [
        (f"retrofit_dropblock{i}", (2, 2048, 1, 1)) for i in range(6, 9)
    ]
    retrofit.strip(model)
    assert dropblocks(model) == {}
    assert "forward" not in model.__dict__


def test_apply_mobilenet_v3_sequential_owner():
    model = real("mobilenet_v3_large")
    reference = eval_out(model, X32)
    retrofit.apply(model, {"dropblock": {"stages": [3, 4]}}, example_input=X32)
    # The root MobileNetV3 runs features' layers: the DropBlocks are its children, after
    # features.12 and after features.16.2 (features.16 is a Conv2dNormActivation Sequential).
    assert list(dropblocks(model)) == ["retrofit_dropblock0", "retrofit_dropblock1"]
    assert (len(model.features), len(model.features[16])) == (17, 3)
    torch.testing.assert_close(eval_out(model, X32), reference, rtol=0, atol=0)


def sequential_lengths(model: nn.Module) -> dict[str, int]:
    return {n: len(m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)}


@pytest.mark.parametrize(
    ("name", "placement", "count"),
    [
        ("resnet50", "stages", 2),
        ("resnet50", "blocks", 9),  # 6 + 3 Bottlenecks
        ("mobilenet_v3_large", "stages", 2),
        # The residual InvertedResidual blocks (stride 1, same channels in and out): features.8,
        # 9, 10 and 12 at reduction 16 (7 strides, 11 widens 80→112), 14 and 15 at 32.
        ("mobilenet_v3_large", "blocks", 6),
    ],
)
def test_apply_never_changes_a_sequential(name, placement, count):
    model = real(name)
    before = sequential_lengths(model)
    reference = eval_out(model, X32)
    retrofit.apply(
        model, {"dropblock": {"stages": [3, 4], "placement": placement}}, example_input=X32
    )
    assert sequential_lengths(model) == before
    # Every DropBlock is a child of a module with a forward of its own, never of a Sequential.
    parents = {n.rpartition(".")[0] for n in dropblocks(model)}
    assert all(not isinstance(model.get_submodule(p), nn.Sequential) for p in parents)
    assert len(dropblocks(model)) == count
    torch.testing.assert_close(eval_out(model, X32), reference, rtol=0, atol=0)
    retrofit.strip(model)
    assert sequential_lengths(model) == before


def test_dropblock_with_stochastic_depth():
    model = real("resnet18")
    reference = eval_out(model, X64)
    recipe = {"stochastic_depth": {"p_L": 0.8}, "dropblock": {"stages": [4], "placement": "blocks"}}
    retrofit.apply(model, recipe, example_input=X64)
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    assert len(gates) == 8
    # Gates go into the BasicBlocks' own forwards, DropBlocks into the root's (after layer4.0 and
    # layer4.1): layer4 stays a 2-block Sequential.
    assert list(dropblocks(model)) == ["retrofit_dropblock0", "retrofit_dropblock1"]
    assert len(model.layer4) == 2
    torch.testing.assert_close(eval_out(model, X64), reference, rtol=0, atol=0)


def test_user_model_small_image_blocks():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    reference = eval_out(model, x)
    retrofit.apply(model, {"dropblock": {"stages": [1], "placement": "blocks"}}, example_input=x)
    # TinyResNet.forward runs blocks (a Sequential of 2 TinyBlocks): the root owns both calls.
    assert list(dropblocks(model)) == ["retrofit_dropblock0", "retrofit_dropblock1"]
    assert len(model.blocks) == 2
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


@pytest.mark.parametrize(
    "arch, stages, maps",
    [
        # PiT: timm's SequentialTuple (an nn.Sequential with a forward of its own) runs stages
        # that take and return (map, cls_tokens).
        ("pit_ti_224", [2, 3], {"transformers.1": (128, 14, 14), "transformers.2": (256, 7, 7)}),
        # SelecSLS: its blocks pass [x, features] lists along an nn.Sequential.
        ("selecsls42", [3, 4], {"features.5": (480, 14, 14), "": (1024, 7, 7)}),
    ],
)
def test_stages_returning_tuples_get_dropblock_on_their_map(arch, stages, maps):
    """A stage that returns a tuple, called by a container that runs its children: the
    DropBlock goes on the map where the stage's own code makes it (on d6775d4 the planner
    raised ``LookupError: 'transformers.1' does not return one computed tensor``)."""
    torch.manual_seed(0)
    model = timm.create_model(arch).eval()
    x = torch.randn(2, 3, 224, 224)
    retrofit.apply(model, {"dropblock": {"stages": stages}}, example_input=x)
    found = dropblocks(model)
    assert [n.rsplit(".", 1)[0] if "." in n else "" for n in found] == list(maps)
    seen = {}

    def hook(module, inputs, output):  # returns None: the output stays the block's
        seen[owners[module]] = tuple(inputs[0].shape[1:])

    owners = {block: name.rpartition(".")[0] for name, block in found.items()}
    for block in found.values():
        block.register_forward_hook(hook)
    model.train()
    schedule.update(model, 1.0)
    with torch.no_grad():
        model(x)
    assert seen == maps
