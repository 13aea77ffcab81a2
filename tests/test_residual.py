"""Residual-site analysis: exact sites, depths and survival on zoo models and hand-written ones."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import retrofit
from retrofit.analysis.residual import find_residual_sites
from retrofit.capture.trace import trace
from tools.oracle import library_drop_path_owners

SD = {"stochastic_depth": {}}


def meta(factory, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return factory(*args, **kwargs)


def sd_edits(model: nn.Module, **spec) -> list[retrofit.Edit]:
    return retrofit.plan(model, {"stochastic_depth": spec}).by_kind("stochastic_depth")


# --- the zoo ---------------------------------------------------------------------------------


def test_resnet50_sixteen_sites_with_the_linear_rule():
    edits = sd_edits(meta(torchvision.models.resnet50))
    assert len(edits) == 16
    assert [e.module for e in edits[:4]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert [e.depth for e in edits] == list(range(1, 17))
    for e in edits:  # p_l = 1 - (l/L)(1 - p_L), L = 16, p_L = 0.5
        assert e.survival == pytest.approx(1 - e.depth / 16 * 0.5, abs=1e-12)
    assert edits[0].survival == 0.96875 and edits[-1].survival == 0.5
    assert all(
        e.action == "wrap_arg" and e.source.endswith("torchvision/models/resnet.py:160")
        for e in edits
    )


def test_uniform_schedule_and_custom_p_L():
    edits = sd_edits(meta(torchvision.models.resnet18), p_L=0.8, schedule="uniform")
    assert len(edits) == 8
    assert {e.survival for e in edits} == {0.8}


def test_timm_resnet50_matches_torchvision_structure():
    edits = sd_edits(meta(timm.create_model, "resnet50"))
    assert len(edits) == 16
    assert edits[3].module == "layer2.0" and edits[-1].module == "layer4.2"


def test_vit_b_16_two_sites_per_block_and_no_positional_embedding_site():
    edits = sd_edits(meta(torchvision.models.vit_b_16))
    assert len(edits) == 24
    assert len({e.depth for e in edits}) == 12
    assert [e.depth for e in edits[:4]] == [1, 1, 2, 2]
    owners = {e.module for e in edits}
    assert owners == {f"encoder.layers.encoder_layer_{i}" for i in range(12)}
    # Encoder.forward adds self.pos_embedding to the tokens: a parameter, not a branch.
    assert "encoder" not in owners


def test_efficientnet_b0_reuses_its_stochastic_depth_modules():
    model = meta(torchvision.models.efficientnet_b0)
    edits = sd_edits(model)
    assert len(edits) == 9
    assert all(e.action == "set_rate" for e in edits)
    assert all(e.target.endswith(".stochastic_depth") for e in edits)
    # batch mode skips the dropped branch's compute: the branch, slot included, is outlined
    # and the gate takes over (the slot stays, set to rate 0 by the rewrite)
    batch = sd_edits(model, mode="batch")
    assert all(e.action == "outline" and e.target.endswith(".stochastic_depth") for e in batch)


def test_convnext_tiny_and_swin_t_attention_bias_is_not_a_site():
    convnext = sd_edits(meta(torchvision.models.convnext_tiny))
    assert len(convnext) == 18 and all(e.action == "set_rate" for e in convnext)
    swin = sd_edits(meta(torchvision.models.swin_t))
    assert len(swin) == 24 and len({e.depth for e in swin}) == 12
    # every site is a block's residual; none inside the attention (bias table, shift mask)
    assert all(e.module.count(".") == 2 and e.module.startswith("features.") for e in swin)


def test_densenet121_has_no_residual_adds():
    assert sd_edits(meta(torchvision.models.densenet121)) == []


def test_mobilenet_v3_large_inverted_residuals():
    edits = sd_edits(meta(torchvision.models.mobilenet_v3_large))
    assert [e.module for e in edits] == [
        f"features.{i}" for i in (2, 4, 5, 7, 8, 9, 10, 12, 14, 15)
    ] or len(edits) == 10
    assert len(edits) == 10


@pytest.mark.parametrize(
    "arch",
    [
        "resnet26d",
        "convnext_atto",
        "vit_tiny_patch16_224",
        "deit_tiny_patch16_224",
        "beit_base_patch16_224",
        "swin_tiny_patch4_window7_224",
        "efficientnet_b0",
        "tf_efficientnetv2_b0",
        "mobilenetv3_small_100",
        "regnety_002",
        "repvgg_a0",
        "mobileone_s0",
        "convnextv2_atto",
        "davit_tiny",
        "focalnet_tiny_srf",
        "coatnet_0_rw_224",
        "maxvit_pico_rw_256",
        "efficientformer_l1",
        "poolformer_s12",
        "cait_xxs24_224",
    ],
)
def test_oracle_every_timm_drop_path_block_gets_a_gate(arch):
    """timm's own drop-path placement (built with a rate) ⊆ retrofit's sites (built without)."""
    with_rate = meta(timm.create_model, arch, drop_path_rate=0.1)
    library = library_drop_path_owners(with_rate)
    assert library, f"{arch}: timm applies no drop path?"
    ours = {s.owner for s in find_residual_sites(trace(meta(timm.create_model, arch)))}
    assert library <= ours, sorted(library - ours)


def test_known_false_positives_are_not_sites():
    # ConvNeXt-V2 GRN (γ·(x·n) + β + x), DaViT's conv position encoding, RepVGG/MobileOne
    # branch sums: exactly the blocks timm itself drops, nothing more.
    for arch in ("convnextv2_atto", "davit_tiny", "repvgg_a0", "mobileone_s0", "focalnet_tiny_srf"):
        ours = {s.owner for s in find_residual_sites(trace(meta(timm.create_model, arch)))}
        library = library_drop_path_owners(meta(timm.create_model, arch, drop_path_rate=0.1))
        assert ours == library, (arch, sorted(ours ^ library))


# --- hand-written models -------------------------------------------------------------------


class Branch(nn.Sequential):
    def __init__(self, c: int):
        super().__init__(
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )


class FunctionalBlocks(nn.Module):
    """Adds spelled four ways, a positional-embedding add, a GRN-like add and a CPE add."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.b1, self.b2, self.b3, self.b4 = (Branch(c) for _ in range(4))
        self.cpe = nn.Conv2d(c, c, 3, padding=1, groups=c)  # depthwise: a position encoding
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x) + self.pos  # not a site: the parameter does not depend on the input
        x = x + self.b1(x)
        x = torch.add(x, self.b2(x))
        y = self.b3(x)
        y += x
        x = y.add(self.b4(y))
        x = x + self.cpe(x)  # not a site: one depthwise conv
        n = x / (x.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-6).sqrt()
        x = self.gamma * (x * n) + x  # not a site: GRN-like, nothing learned in between
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(F.relu(self.a(x)))


class Nested(nn.Module):
    """A block whose branch contains another residual block."""

    def __init__(self, c):
        super().__init__()
        self.inner = Inner(c)
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv(self.inner(x))


class Looped(nn.Module):
    def __init__(self, c=8, n=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(Branch(c) for _ in range(n))
        self.nested = Nested(c)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.nested(x)


def test_functional_adds_every_spelling():
    edits = sd_edits(FunctionalBlocks())
    assert [e.module for e in edits] == ["", "", "", ""]
    # four distinct child blocks in one forward → four depth levels
    assert [e.block for e in edits] == ["b1", "b2", "b3", "b4"]
    assert [e.depth for e in edits] == [1, 2, 3, 4]


def test_loop_over_blocks_gives_each_add_its_own_depth_and_nested_residuals():
    edits = sd_edits(Looped())
    assert [(e.module, e.block, e.depth) for e in edits] == [
        ("", "blocks.0", 1),
        ("", "blocks.1", 2),
        ("", "blocks.2", 3),
        ("nested.inner", "nested.inner", 4),
        ("nested", "nested", 5),
    ]


class Untraceable(nn.Module):
    """Data-dependent control flow at the top; traceable blocks below."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Inner(4), Inner(4))

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            x = -x
        return self.blocks(x)


def test_hierarchical_fallback_instruments_the_blocks_and_reports_the_rest():
    model = Untraceable()
    plan = retrofit.plan(model, SD)
    assert [e.module for e in plan.edits] == ["blocks.0", "blocks.1"]
    assert [s.module for s in plan.skipped] == ["<root>"]
    assert "control flow" in plan.skipped[0].reason
    retrofit.apply(model, SD, example_input=torch.randn(2, 4, 8, 8))  # verified
