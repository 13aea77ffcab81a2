"""The zoo, sampled: exact residual-site counts across the families, the libraries' own drop-path
placement as the oracle, and the hierarchical fallback on models fx cannot trace whole.

Every count is derived from the architecture's definition (written beside it) and cross-checked
with the oracle where the library applies drop path. Models are built on the meta device (no
weights), except the few real-tensor checks at the end. The full sweep is ``tools/zoo.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import retrofit
from retrofit.capture.trace import trace
from retrofit.models import create_model
from tools.oracle import library_drop_path_owners

SD = {"stochastic_depth": {}}


def meta(spec: str, **kwargs) -> nn.Module:
    return create_model(spec, kwargs=kwargs, meta=True)[0]


def rate(spec: str) -> dict:
    return {"drop_path_rate": 0.1} if spec.startswith("timm:") else {"stochastic_depth_prob": 0.1}


# (spec, sites, blocks, derivation, extra): ``extra`` is the set of site owners the library
# leaves without drop path (None: the library applies no drop path here, no oracle).
# FastViT-T8's sites where timm applies no drop path (each with its reason in tools/zoo.py):
# every RepMixer and the MobileOne mixer inside it, the 1×1 stem block and the downsamplers'.
FASTVIT_T8_EXTRA = {
    f"stages.{s}.blocks.{b}.token_mixer{mixer}"
    for s, depth in enumerate((2, 2, 4, 2))
    for b in range(depth)
    for mixer in ("", ".mixer")
} | {"stem.2", *(f"stages.{s}.downsample.proj.1" for s in (1, 2, 3))}

CASES = [
    # --- ResNet / ResNeXt / Res2Net: one residual per bottleneck, layers (3, 4, 6, 3)
    ("tv:resnet50", 16, 16, "3+4+6+3 bottlenecks", None),
    ("tv:resnext50_32x4d", 16, 16, "3+4+6+3 bottlenecks", None),
    # timm's linear rate is 0 for block 0 and timm then builds no DropPath at all
    ("timm:resnet50d", 16, 16, "3+4+6+3 bottlenecks", {"layer1.0"}),
    ("timm:res2net50_26w_4s", 16, 16, "3+4+6+3 Bottle2necks", {"layer1.0"}),
    # --- RegNet: one residual per block
    ("tv:regnet_y_400mf", 16, 16, "depths 1+3+6+6", None),
    ("timm:regnetx_002", 13, 13, "depths 1+1+4+7", {"s1.b1"}),
    # --- EfficientNet / MobileNet: inverted residuals only where stride 1 and c_in == c_out
    ("tv:efficientnet_b0", 9, 9, "repeats 1,2,2,3,3,4,1 minus each stage's first: 0+1+1+2+2+3+0", set()),
    ("timm:efficientnet_b0", 9, 9, "as torchvision's: 0+1+1+2+2+3+0", set()),
    ("tv:mobilenet_v3_large", 10, 10, "15 bneck, residual where stride 1 and c_in == c_out", None),
    ("timm:mobilenetv3_small_100", 6, 6, "11 blocks in stages of 1,2,3,2,3: residuals 0+1+2+1+2", set()),
    # --- ConvNeXt: one residual per block
    ("tv:convnext_tiny", 18, 18, "3+3+9+3 blocks", set()),
    ("timm:convnext_atto", 12, 12, "2+2+6+2 blocks", set()),
    # --- ViT / DeiT / BEiT: attention + MLP residual per block, one depth per block
    ("tv:vit_b_16", 24, 12, "12 blocks × 2", None),
    ("timm:deit_tiny_patch16_224", 24, 12, "12 blocks × 2", set()),
    ("timm:beit_base_patch16_224", 24, 12, "12 blocks × 2", set()),
    # --- Swin: window attention + MLP per block
    ("tv:swin_t", 24, 12, "(2+2+6+2) blocks × 2", set()),
    # --- MaxViT / CoAtNet: MBConv + window and grid attention (+ MLP each)
    # torchvision: attention and MLP live in separate children, so each has its own depth
    ("tv:maxvit_t", 55, 55, "(2+2+5+2) blocks × (1 MBConv + 2 partitions × 2)", set()),
    ("timm:coatnet_0_rw_224", 23, 14, "2+3 MBConv × 1 + (7+2) transformer × 2", set()),
    # --- no residual adds at all
    ("tv:densenet121", 0, 0, "dense concatenation, no add", None),
    ("tv:vgg11", 0, 0, "plain conv stack", None),
    ("tv:inception_v3", 0, 0, "branch concatenation, no add", None),
    # --- DLA / DPN
    ("timm:dla34", 12, 12, "tree levels 2..5: 2+4+4+2 BasicBlocks", None),
    ("timm:dpn68", 22, 22, "k_sec 3+4+12+3 dual-path blocks, residual half added", None),
    # --- NFNet: NormFreeBlock is in timm's no-trace registry, so the whole-model trace keeps it
    # a leaf; traced on its own (trace() expands no-trace leaves) each block shows its residual
    ("timm:dm_nfnet_f0", 12, 12, "1+2+6+3 NormFreeBlocks", set()),
    # --- MetaFormers: the pooling token mixer has no learned map, but timm puts a drop-path slot
    # on it (``drop_path1``, an Identity at rate 0), which makes it a site: mixer + MLP per block
    ("timm:efficientformer_l1", 30, 15, "(3+2+6+3) Meta4D × 2 + 1 Meta3D × 2", set()),
    ("timm:poolformer_s12", 24, 12, "(2+2+6+2) blocks × 2 (pooling mixer, MLP)", set()),
    # --- class-attention heads timm builds without drop path
    # CaiT: 24 blocks × 2, + 2 token-only blocks × 2; block 0's attention add has the class
    # token parameter as its shortcut (a learned query the branch reads with the patches)
    ("timm:cait_xxs24_224", 52, 26, "24 × 2 + 2 × 2", {"blocks_token_only.0", "blocks_token_only.1"}),
    # XCiT: 12 × (attention, local patch interaction, MLP) + 2 class-attention blocks × 2
    ("timm:xcit_nano_12_p16_224", 40, 14, "12 × 3 + 2 × 2", {"cls_attn_blocks.0", "cls_attn_blocks.1"}),
    ("timm:volo_d1_224", 40, 20, "(4+4+8+2) × 2 + post network 2 × 2", {"post_network.0", "post_network.1"}),
    # --- re-parameterisable: the branch sum + identity is the block, the parallel convs are not
    ("timm:repvgg_a0", 17, 17, "depths 2+4+14+1 minus each stage's first: 1+3+13+0", set()),
    # GhostNet builds no drop path (no oracle); 5 shortcuts are a depthwise + pointwise conv-BN
    ("timm:ghostnet_100", 16, 16, "16 ghost bottlenecks: 11 identity, 5 dw+pw projection shortcuts", None),
    ("timm:mobileone_s0", 35, 35, "MobileOneBlocks with an identity branch (identity added last)", set()),
    # identity-first re-parameterisable sums (``scale + identity + Σ conv``), read as one sum:
    # FastViT's RepMixer mixer, its 1×1 stem/downsample MobileOneBlocks (tools/zoo.py reasons)
    ("timm:fastvit_t8", 34, 34, "(2+2+4+2) × (ConvMLP, RepMixer, its mixer) + stem.2 + 3 downsamplers", FASTVIT_T8_EXTRA),
    # GhostNetV3's ghost modules: ``cheap_rpr_scale + cheap_rpr_skip + Σ cheap_rpr_conv``
    ("timm:ghostnetv3_050", 48, 48, "16 ghost bottlenecks × (ghost1, ghost2, the bottleneck)", None),
]  # fmt: skip


@pytest.mark.parametrize("spec,sites,blocks,derivation,extra", CASES, ids=[c[0] for c in CASES])
def test_exact_sites_and_the_oracle(spec, sites, blocks, derivation, extra):
    model = meta(spec)
    edits = retrofit.plan(model, SD).by_kind("stochastic_depth")
    assert (len(edits), len({e.block for e in edits})) == (sites, blocks), derivation
    assert [e.depth for e in edits] == sorted(e.depth for e in edits)
    ours = {e.module for e in edits}
    try:
        with_rate = meta(spec, **rate(spec))
    except retrofit.ModelError:  # no stochastic_depth_prob (ResNet), or a fixed one (MaxViT)
        with_rate = model
    library = library_drop_path_owners(with_rate)
    if extra is None:
        assert library == set()
        return
    assert library, f"{spec}: the library applies no drop path?"
    assert library <= ours, sorted(library - ours)  # every library block found
    assert ours - library == extra  # and every extra site is the known, justified one


# --- hierarchical fallback ---------------------------------------------------------------------

DETECTION = {"weights_backbone": None}


@pytest.mark.parametrize(
    "name,skipped",
    [
        (
            "fasterrcnn_resnet50_fpn",
            ["<root>", "transform", "rpn", "rpn.anchor_generator", "rpn.head", "roi_heads",
             "roi_heads.box_predictor"],
        ),
        (
            "retinanet_resnet50_fpn",
            ["<root>", "anchor_generator", "head", "head.classification_head",
             "head.regression_head", "transform"],
        ),
        ("deeplabv3_resnet50", []),
        ("fcn_resnet50", []),
    ],
)  # fmt: skip
def test_detection_and_segmentation_backbones_instrumented_rest_reported(name, skipped):
    """The ResNet-50 backbone (3+4+6+3) is instrumented; what fx cannot trace is reported."""
    plan = retrofit.plan(meta(f"tv:{name}", **DETECTION), SD)
    edits = plan.by_kind("stochastic_depth")
    assert len(edits) == 16 and len({e.block for e in edits}) == 16
    backbone = "backbone.body." if "rcnn" in name or "retina" in name else "backbone."
    assert all(re.match(rf"{re.escape(backbone)}layer[1-4]\.\d+$", e.module) for e in edits)
    assert [s.module for s in plan.skipped] == skipped
    for s in plan.skipped:  # each with the fx error and what was done instead
        assert re.search(
            r"(Error|error): .+; (traced its children instead|nothing below)", s.reason
        )


def test_r3d_18_video_model_instrumented_and_verified():
    """The 3-D ResNet: 2+2+2+2 BasicBlocks; apply on a real clip verifies eval equivalence."""
    torch.manual_seed(0)
    model = create_model("tv:r3d_18", kwargs={"num_classes": 5})[0]
    x = torch.randn(1, 3, 4, 32, 32)
    retrofit.apply(model, SD, example_input=x)
    edits = retrofit.applied_plan(model).by_kind("stochastic_depth")
    assert [e.module for e in edits] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def test_fcn_resnet50_applied_on_real_tensors():
    torch.manual_seed(0)
    model = create_model("tv:fcn_resnet50", kwargs={**DETECTION, "num_classes": 3})[0]
    retrofit.apply(model, SD, example_input=torch.randn(1, 3, 32, 32))
    assert len(retrofit.applied_plan(model).by_kind("stochastic_depth")) == 16


GEMMA = "timm:gemma4_vit_167m"


def test_gemma4_vit_untraceable_forwards_are_reported():
    """Gemma-4's ViT: the classifier's and the encoder's forwards are not traceable (data-
    dependent control flow), nor are the patch embedding, rotary embedding and pooler."""
    plan = retrofit.plan(meta(GEMMA), SD)
    reasons = {s.module: s.reason for s in plan.skipped}
    assert list(reasons) == [
        "<root>", "encoder", "encoder.patch_embed", "encoder.rotary_emb", "encoder.pooler"
    ]  # fmt: skip
    assert reasons["<root>"].endswith("traced its children instead")
    assert "control flow" in reasons["encoder"]


def test_gemma4_vit_blocks_under_an_untraceable_encoder_are_instrumented():
    # 16 Gemma4Blocks × (attention + gated MLP) residuals, each with timm's drop-path slot
    edits = retrofit.plan(meta(GEMMA), SD).by_kind("stochastic_depth")
    assert len(edits) == 32 and len({e.block for e in edits}) == 16


def test_timm_notrace_leaves_are_traced_as_parts_of_their_own():
    """NFNet's blocks are timm no-trace leaves of the whole-model graph; each is traced alone."""
    model = meta("timm:dm_nfnet_f0", drop_path_rate=0.1)
    real = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert len(real) == 11  # 12 blocks, block 0 at rate 0 gets nn.Identity
    traced = trace(model)
    assert traced.complete
    assert [p.prefix for p in traced.parts][:3] == ["", "stages.0.0", "stages.1.0"]
    assert len(library_drop_path_owners(model, traced)) == 12
