"""Stage analysis (retrofit.stages) and the meta-device shape propagation it rests on.

Every zoo model is built on the meta device: finding stages needs shapes, not weights. The
expected tables are what the analysis gives, written down exactly (index, module, shape for the
probe input, reduction, how it was found) so any change in the definition shows up here.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from torch import nn

import retrofit
from retrofit.analysis.context import stages
from retrofit.analysis.stages import NoConvStagesError, Stage
from retrofit.capture.shapes import SHAPE, ShapePropError, propagate_shapes
from retrofit.capture.trace import trace_module
from retrofit.errors import TraceError
from tests.user_models import TinyResNet


def tv(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return getattr(torchvision.models, name)(**kwargs)


def tm(name: str) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name)


def table(found: list[Stage]) -> list[tuple]:
    return [(s.index, s.module, s.shape, s.reduction, s.found_by) for s in found]


# (index, module, shape at the 224×224 probe, reduction, found_by)
ZOO = {
    "tv.resnet50": (
        lambda: tv("resnet50"),
        [
            (1, "layer1", (1, 256, 56, 56), 4, "shapes"),
            (2, "layer2", (1, 512, 28, 28), 8, "shapes"),
            (3, "layer3", (1, 1024, 14, 14), 16, "shapes"),
            (4, "layer4", (1, 2048, 7, 7), 32, "shapes"),
        ],
    ),
    # timm's feature_info also lists act1 at reduction 2: that is the stem.
    "timm.resnet50": (
        lambda: tm("resnet50"),
        [
            (1, "layer1", (1, 256, 56, 56), 4, "feature_info"),
            (2, "layer2", (1, 512, 28, 28), 8, "feature_info"),
            (3, "layer3", (1, 1024, 14, 14), 16, "feature_info"),
            (4, "layer4", (1, 2048, 7, 7), 32, "feature_info"),
        ],
    ),
    # features.0 is the 4×4 patchify stem, features.2/4/6 the downsampling layers (LayerNorm at
    # the old resolution, then a stride-2 conv): the stages are the block groups between them.
    "tv.convnext_tiny": (
        lambda: tv("convnext_tiny"),
        [
            (1, "features.1", (1, 96, 56, 56), 4, "shapes"),
            (2, "features.3", (1, 192, 28, 28), 8, "shapes"),
            (3, "features.5", (1, 384, 14, 14), 16, "shapes"),
            (4, "features.7", (1, 768, 7, 7), 32, "shapes"),
        ],
    ),
    # Channels-last inside the blocks, NCHW at every stage boundary.
    "timm.convnext_tiny": (
        lambda: tm("convnext_tiny"),
        [
            (1, "stages.0", (1, 96, 56, 56), 4, "feature_info"),
            (2, "stages.1", (1, 192, 28, 28), 8, "feature_info"),
            (3, "stages.2", (1, 384, 14, 14), 16, "feature_info"),
            (4, "stages.3", (1, 768, 7, 7), 32, "feature_info"),
        ],
    ),
    # features.0 (stem conv) and features.1 (the 16-channel block) run at reduction 2: stem.
    # The reduction-32 level ends after the 1×1 head conv features.8, the last node before the
    # global pool.
    "tv.efficientnet_b0": (
        lambda: tv("efficientnet_b0"),
        [
            (1, "features.2", (1, 24, 56, 56), 4, "shapes"),
            (2, "features.3", (1, 40, 28, 28), 8, "shapes"),
            (3, "features.5", (1, 112, 14, 14), 16, "shapes"),
            (4, "features.8", (1, 1280, 7, 7), 32, "shapes"),
        ],
    ),
    "timm.efficientnet_b0": (
        lambda: tm("efficientnet_b0"),
        [
            (1, "blocks.1", (1, 24, 56, 56), 4, "feature_info"),
            (2, "blocks.2", (1, 40, 28, 28), 8, "feature_info"),
            (3, "blocks.4", (1, 112, 14, 14), 16, "feature_info"),
            (4, "blocks.6", (1, 320, 7, 7), 32, "feature_info"),
        ],
    ),
    # A flat Sequential of 17 layers: each stage module is the last block at its resolution.
    "tv.mobilenet_v3_large": (
        lambda: tv("mobilenet_v3_large"),
        [
            (1, "features.3", (1, 24, 56, 56), 4, "shapes"),
            (2, "features.6", (1, 40, 28, 28), 8, "shapes"),
            (3, "features.12", (1, 112, 14, 14), 16, "shapes"),
            (4, "features.16", (1, 960, 7, 7), 32, "shapes"),
        ],
    ),
    "timm.mobilenetv3_large_100": (
        lambda: tm("mobilenetv3_large_100"),
        [
            (1, "blocks.1", (1, 24, 56, 56), 4, "feature_info"),
            (2, "blocks.2", (1, 40, 28, 28), 8, "feature_info"),
            (3, "blocks.4", (1, 112, 14, 14), 16, "feature_info"),
            (4, "blocks.6", (1, 960, 7, 7), 32, "feature_info"),
        ],
    ),
    # Squeeze-excite in every block: ``x * scale`` broadcasts an (N, C, 1, 1) gate to the map,
    # which is no upsampling (read as one, it ended the main path at block2's first block).
    # Anti-aliased downsampling pads each map (56 → 58) before its stride-2 blur filter: a
    # border, no upsampling (read as one, it ended the main path inside layer3).
    "timm.tresnet_m": (
        lambda: tm("tresnet_m"),
        [
            (1, "body.layer1", (1, 64, 56, 56), 4, "shapes"),
            (2, "body.layer2", (1, 128, 28, 28), 8, "shapes"),
            (3, "body.layer3", (1, 1024, 14, 14), 16, "shapes"),
            (4, "body.layer4", (1, 2048, 7, 7), 32, "shapes"),
        ],
    ),
    "tv.regnet_y_400mf": (
        lambda: torchvision.models.regnet_y_400mf(),  # its init copies: not on meta
        [
            (1, "trunk_output.block1", (1, 48, 56, 56), 4, "shapes"),
            (2, "trunk_output.block2", (1, 104, 28, 28), 8, "shapes"),
            (3, "trunk_output.block3", (1, 208, 14, 14), 16, "shapes"),
            (4, "trunk_output.block4", (1, 440, 7, 7), 32, "shapes"),
        ],
    ),
    # No conv runs at reduction 32 (features.20 is the last max-pool): three stages.
    "tv.vgg11": (
        lambda: tv("vgg11"),
        [
            (1, "features.9", (1, 256, 56, 56), 4, "shapes"),
            (2, "features.14", (1, 512, 28, 28), 8, "shapes"),
            (3, "features.19", (1, 512, 14, 14), 16, "shapes"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_stages(name):
    factory, expected = ZOO[name]
    assert table(stages(factory())) == expected


def test_resnet50_stage_calls_are_located_in_the_root_forward():
    # layer1..layer4 are nn.Sequential: pass-through containers own no code, so each stage ends at
    # the root ResNet's call of the Sequential's last Bottleneck (ResNet-50 has 3, 4, 6, 3 of them).
    found = stages(tv("resnet50"))
    sites = [(s.site.owner, s.site.node, s.site.key, s.site.ordinal) for s in found]
    assert sites == [
        ("", "layer1_2", "module:layer1.2", 0),
        ("", "layer2_3", "module:layer2.3", 0),
        ("", "layer3_5", "module:layer3.5", 0),
        ("", "layer4_2", "module:layer4.2", 0),
    ]
    # Each call is made by ``x = self.layerN(x)`` in ResNet._forward_impl (lines 273-276).
    assert [s.site.source.rpartition("/")[2] for s in found] == [
        "resnet.py:273",
        "resnet.py:274",
        "resnet.py:275",
        "resnet.py:276",
    ]
    assert [s.node for s in found] == [
        "layer1_2_relu_2",
        "layer2_3_relu_2",
        "layer3_5_relu_2",
        "layer4_2_relu_2",
    ]


def test_sequential_stages_are_owned_by_the_root():
    # features is an nn.Sequential: its layers are called from MobileNetV3's own forward.
    # features.3/6/12 are InvertedResidual blocks (a forward of their own): their calls are the
    # sites. features.16 is a Conv2dNormActivation, an nn.Sequential subclass keeping its forward:
    # the site is the call of its last child, the Hardswish features.16.2.
    found = stages(tv("mobilenet_v3_large"))
    assert [(s.module, s.site.owner, s.site.node, s.site.key) for s in found] == [
        ("features.3", "", "features_3", "module:features.3"),
        ("features.6", "", "features_6", "module:features.6"),
        ("features.12", "", "features_12", "module:features.12"),
        ("features.16", "", "features_16_2", "module:features.16.2"),
    ]
    # The owner is MobileNetV3, whose code runs them all: ``x = self.features(x)``.
    assert [s.site.source.rpartition("/")[2] for s in found] == ["mobilenetv3.py:211"] * 4


def test_example_input_sets_the_shapes():
    found = stages(tv("resnet50"), torch.empty(2, 3, 64, 96))
    assert [(s.module, s.shape, s.reduction) for s in found] == [
        ("layer1", (2, 256, 16, 24), 4),
        ("layer2", (2, 512, 8, 12), 8),
        ("layer3", (2, 1024, 4, 6), 16),
        ("layer4", (2, 2048, 2, 3), 32),
    ]


def test_probe_size_follows_pretrained_cfg():
    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained_cfg_overlay={"input_size": (3, 160, 160)})
    assert [s.shape for s in stages(model)] == [
        (1, 64, 40, 40),
        (1, 128, 20, 20),
        (1, 256, 10, 10),
        (1, 512, 5, 5),
    ]


@pytest.mark.parametrize(
    ("model", "cls"),
    [
        (lambda: tv("vit_b_16"), "VisionTransformer"),
        (lambda: tm("vit_tiny_patch16_224"), "VisionTransformer"),
        (lambda: tv("swin_t"), "SwinTransformer"),
    ],
)
def test_transformers_have_no_conv_stages(model, cls):
    # A ViT's patch embedding is a conv producing a 4-D map, but nothing convolves that map;
    # Swin's stages are NHWC.
    with pytest.raises(NoConvStagesError) as info:
        stages(model())
    assert str(info.value) == f"DropBlock does not apply: no conv feature maps in {cls}"
    assert isinstance(info.value, ValueError)


class PlainConvStack(nn.Module):
    """Each level made by one stride-2 conv, none at stride 1 (a DCGAN-style discriminator)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for out in (16, 32, 64, 128):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class ConvStemViT(nn.Module):
    """The same stride-2 convs as a stem, their last map turned into tokens (Xiao et al. 2021,
    "Early Convolutions Help Transformers See Better"): the tokens carry the network on."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for out in (16, 32, 64, 64):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.ReLU()]
            c = out
        self.stem = nn.Sequential(*layers)
        self.encoder = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


def test_a_plain_conv_stack_has_a_stage_per_stride_two_conv():
    """No conv runs at stride 1 inside a level, so each level's map is its strided conv's output.
    Reductions 1 and 2 are the stem (the network reaches 16). DropBlock goes on those maps. A
    transformer whose stem is the same convs has no conv stages: its tokens carry it on."""
    torch.manual_seed(0)
    model, x = PlainConvStack().eval(), torch.randn(2, 3, 64, 64)
    found = stages(model, x)
    assert [(s.index, s.module, s.shape, s.reduction) for s in found] == [
        (1, "features.5", (2, 32, 16, 16), 4),
        (2, "features.8", (2, 64, 8, 8), 8),
        (3, "features.11", (2, 128, 4, 4), 16),
    ]
    reference = model(x)
    retrofit.apply(model, {"dropblock": {"stages": [2, 3], "block_size": 3}}, example_input=x)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)  # eval: unchanged
    blocks = [m for m in model.modules() if type(m).__name__ == "DropBlock"]
    seen = []
    for b in blocks:
        b.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    model.train()
    model(x)
    assert seen == [(2, 64, 8, 8), (2, 128, 4, 4)]
    with pytest.raises(NoConvStagesError, match="no conv feature maps in ConvStemViT"):
        stages(ConvStemViT(), x)


def test_reading_a_maps_size_is_no_jump_over_the_encoder():
    """LRASPP's head resizes with ``F.interpolate(x, size=low.shape[-2:])``: the encoder's
    reduction-8 map is read for its size just before the upsampling. A size read carries no data:
    the encoder's maps at 8 and 16 stay on the main path (they were all off it, and the stages
    read were reductions 2, 4 and the head's output at 8)."""
    with torch.device("meta"):
        model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None
        )
    found = stages(model, torch.empty(2, 3, 64, 64))
    assert [(s.module, s.reduction) for s in found][:2] == [("backbone.3", 4), ("backbone.6", 8)]
    assert [s.reduction for s in found] == [4, 8, 16]


def test_non_image_model_has_no_conv_stages():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(NoConvStagesError, match="no conv feature maps in Sequential"):
        stages(model, torch.empty(1, 8))


def test_small_image_network_keeps_its_first_level():
    # A CIFAR-style stride-1 stem never leaves reduction 1: its first level is stage 1.
    found = stages(TinyResNet(), torch.empty(1, 3, 32, 32))
    assert table(found) == [(1, "blocks", (1, 8, 32, 32), 1, "shapes")]


def test_real_weights_are_not_touched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()  # training mode: BatchNorm would update its stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = stages(model)
    assert [s.module for s in found] == ["layer1", "layer2", "layer3", "layer4"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(t.device.type == "cpu" for t in after.values())


def test_untraceable_forward_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.conv(x)
            return x

    with pytest.raises(TraceError, match="stages of Branchy need its forward as one fx graph"):
        stages(Branchy(), torch.empty(1, 3, 8, 8))


def test_to_dict_is_json_ready():
    found = stages(tv("resnet18"))
    row = json.loads(json.dumps([s.to_dict() for s in found]))[2]
    assert row == {
        "index": 3,
        "module": "layer3",
        "shape": [1, 256, 14, 14],
        "reduction": 16,
        "node": "layer3_1_relu_1",
        "found_by": "shapes",
        "owner": "",
    }


def test_lazy_package_attributes():
    assert retrofit.stages is stages
    assert retrofit.Stage is Stage


# --------------------------------------------------------------------------- shape propagation


def test_shape_propagation_records_every_tensor_node():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten())
    gm = trace_module(model)
    out = propagate_shapes(gm, torch.randn(2, 3, 9, 9))
    assert out.device.type == "meta" and tuple(out.shape) == (2, 64)
    assert {n.name: n.meta[SHAPE] for n in gm.graph.nodes} == {
        "input_1": (2, 3, 9, 9),
        "_0": (2, 4, 4, 4),
        "_1": (2, 4, 4, 4),
        "_2": (2, 64),
        "output": (2, 64),
    }


def test_shape_propagation_names_the_node_that_needs_data():
    class NeedsData(nn.Module):
        def forward(self, x):
            return x.tolist()

    gm = trace_module(NeedsData())
    with pytest.raises(ShapePropError, match="failed at node 'tolist'"):
        propagate_shapes(gm, torch.randn(2))


def test_unet_by_hand_has_its_four_encoder_stages():
    """A U-Net's skips (each encoder map concatenated in the decoder, after an upsampling) jump
    over no stage: all four encoder levels are stages, none of the decoder's (before, the skip
    from ``enc1`` took the whole encoder off the main path and the one stage found was the
    decoder's output). DropBlock on stages [3, 4] lands after ``enc3`` and ``bottleneck``,
    applied verified and live; strip loads into the original class strictly."""
    from retrofit.layers import DropBlock
    from tests.task_models import TinyUNet

    torch.manual_seed(0)
    model = TinyUNet()
    x = torch.randn(2, 3, 64, 64)
    found = stages(model, x)
    assert [(s.module, s.reduction, s.shape) for s in found] == [
        ("enc1", 1, (2, 8, 64, 64)),
        ("enc2", 2, (2, 16, 32, 32)),
        ("enc3", 4, (2, 32, 16, 16)),
        ("bottleneck", 8, (2, 64, 8, 8)),
    ]
    retrofit.apply(model, {"dropblock": {"stages": [3, 4], "block_size": 3}}, example_input=x)
    edits = retrofit.applied_plan(model).by_kind("dropblock")
    assert [(e.target, e.node) for e in edits] == [
        ("enc3", "enc3_5"),
        ("bottleneck", "bottleneck_5"),
    ]
    blocks = [n for n, m in model.named_modules() if isinstance(m, DropBlock)]
    assert len(blocks) == 2
    retrofit.strip(model)
    TinyUNet().load_state_dict(model.state_dict(), strict=True)
