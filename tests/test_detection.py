"""Detectors: apply verified and live through the training call (issue 21).

A torchvision detector's training forward needs targets; before the training call every one was
refused ("targets should not be none when in training mode"). Tiny inputs (64 px), random
weights, ResNet-18 / MobileNet backbones where the zoo's ResNet-50 adds only time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision.models.detection import (
    KeypointRCNN,
    MaskRCNN,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    retinanet_resnet50_fpn,
)
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import retrofit
from retrofit.capture import detection
from retrofit.errors import VerifyError
from retrofit.layers import DropBlock, StochasticDepthGate
from retrofit.verify.checks import compare, eval_output
from retrofit.verify.training_call import TrainingCall, default_loss

ROOT = Path(__file__).resolve().parents[1]
SD = {"stochastic_depth": {"p_L": 0.5}}
SMALL = {"min_size": 64, "max_size": 64}


def _resnet18_fpn() -> nn.Module:
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)


def _faster() -> nn.Module:
    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, **SMALL)


def _mask() -> nn.Module:
    return MaskRCNN(_resnet18_fpn(), num_classes=3, **SMALL)


def _keypoint() -> nn.Module:
    return KeypointRCNN(_resnet18_fpn(), num_classes=2, num_keypoints=5, **SMALL)


def _retina() -> nn.Module:
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None, **SMALL)


def _gates(model: nn.Module, kind: type = StochasticDepthGate) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


def _train_step_calls(model: nn.Module, names: list[str]) -> tuple[dict[str, int], dict]:
    """One real training step (forward with targets, backward) and each module's call count."""
    counts = dict.fromkeys(names, 0)
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda *_, n=n: counts.__setitem__(n, counts[n] + 1)
        )
        for n in names
    ]
    images = detection.probe_images(model, seed=1)[0]
    targets = detection.minimal_targets(model, images)
    model.train()
    try:
        losses = model(images, targets)
        sum(losses.values()).backward()
    finally:
        for h in handles:
            h.remove()
    return counts, losses


@pytest.mark.parametrize(
    "build,sites,loss",
    [
        (_faster, 10, "loss_classifier"),  # MobileNetV3's 10 InvertedResidual shortcuts
        (_mask, 8, "loss_mask"),  # ResNet-18's 2+2+2+2 BasicBlocks
        # The keypoint head (8 convs at 512 channels on 14×14 RoIs): ~1 min on 2 CPU cores.
        pytest.param(_keypoint, 8, "loss_keypoint", marks=pytest.mark.slow),
    ],
    ids=["faster_rcnn", "mask_rcnn", "keypoint_rcnn"],
)
def test_detector_applied_verified_and_live_with_builtin_targets(build, sites, loss):
    """No example input, no training call, verify=True: the built-in targets (with masks /
    keypoints where the heads need them) make the liveness forward run; every gate is then
    called by a real training step, whose losses include the head's own."""
    torch.manual_seed(0)
    model = build()
    retrofit.apply(model, SD)
    gates = _gates(model)
    assert len(gates) == sites
    counts, losses = _train_step_calls(model, gates)
    assert all(n >= 1 for n in counts.values()), counts
    assert loss in losses and all(torch.isfinite(v) for v in losses.values())


def test_detector_strip_loads_into_the_original_class_strict():
    torch.manual_seed(0)
    model = _faster()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retrofit.apply(model, SD)
    state = retrofit.strip(model).state_dict()
    fresh = _faster()
    fresh.load_state_dict(state, strict=True)
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in before)


def test_dropblock_after_every_block_of_retinanet_groups_3_and_4():
    """Ghiasi et al. 2018 put DropBlock on RetinaNet's ResNet-50 groups 3 and 4: the shipped
    recipe (placement: blocks) lands after each of layer3's 6 and layer4's 3 Bottlenecks, inside
    the backbone, and every one runs once in a training step; strip gives the original
    weights."""
    torch.manual_seed(0)
    model = _retina()
    stages = retrofit.stages(model)
    assert [(s.module, s.reduction) for s in stages] == [
        (f"backbone.body.layer{i}", 2 ** (i + 1)) for i in range(1, 5)
    ]
    retrofit.apply(model, ROOT / "recipes" / "dropblock.yaml")
    edits = retrofit.applied_plan(model).by_kind("dropblock")
    assert [e.target for e in edits] == [f"backbone.body.layer3.{i}" for i in range(6)] + [
        f"backbone.body.layer4.{i}" for i in range(3)
    ]
    # Inside each block, on its output: the body (an IntermediateLayerGetter) loops over its
    # children, so a DropBlock added there would run once more after layer4.
    blocks = _gates(model, DropBlock)
    assert blocks == [f"{e.target}.retrofit_dropblock0" for e in edits]
    retrofit.schedule.update(model, 1.0)
    counts, _ = _train_step_calls(model, blocks)
    assert all(n == 1 for n in counts.values()), counts
    retrofit.strip(model)
    _retina().load_state_dict(model.state_dict(), strict=True)


# ResNet-50 FPN detectors at 64 px, their RoI / anchor sampling cut to 64 per image (a faster
# training step; the architecture and state_dict keys are the builders' own).
FPN_DETECTORS = {
    "fasterrcnn_resnet50_fpn": {"box_batch_size_per_image": 64, "rpn_batch_size_per_image": 64},
    "retinanet_resnet50_fpn": {},
}
# The pyramid's output levels: Faster R-CNN's P2-P5 3x3 convs (its "pool" level is P5
# subsampled, no conv), RetinaNet's P3-P5 and its extra P6, P7 convs.
FPN_LEVELS = {
    "fasterrcnn_resnet50_fpn": [f"backbone.fpn.layer_blocks.{i}" for i in range(4)],
    "retinanet_resnet50_fpn": [f"backbone.fpn.layer_blocks.{i}" for i in range(3)]
    + ["backbone.fpn.extra_blocks.p6", "backbone.fpn.extra_blocks.p7"],
}


def _fpn_detector(name: str) -> nn.Module:
    return torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=3, **SMALL, **FPN_DETECTORS[name]
    )


@pytest.mark.parametrize("name", list(FPN_DETECTORS))
def test_dropblock_fpn_option_masks_every_pyramid_level(name):
    """``dropblock.fpn: true`` (Ghiasi et al. 2018's option for RetinaNet): besides the stage
    outputs of groups 3 and 4, one DropBlock on each FPN output level, inside the level's conv
    (the pyramid returns its levels in a dict); applied verified and live, each one called once
    by a training step and dropping units there; strip gives weights that load strictly into the
    builder's class."""
    torch.manual_seed(0)
    model = _fpn_detector(name)
    before = {k: v.clone() for k, v in model.named_parameters()}
    recipe = {"dropblock": {"stages": [3, 4], "fpn": True, "block_size": 3, "keep_prob": 0.5}}
    retrofit.apply(model, recipe)
    edits = retrofit.applied_plan(model).by_kind("dropblock")
    levels = FPN_LEVELS[name]
    assert [e.target for e in edits] == ["backbone.body.layer3", "backbone.body.layer4", *levels]
    fpn_edits = edits[2:]
    assert [e.note.split(" (")[0] for e in fpn_edits] == [
        f"after FPN level {i}/{len(levels)}" for i in range(1, len(levels) + 1)
    ]
    blocks = _gates(model, DropBlock)
    convs = [lvl if "extra" in lvl else f"{lvl}.0" for lvl in levels]
    assert blocks == [
        "backbone.body.layer3.5.retrofit_dropblock0",
        "backbone.body.layer4.2.retrofit_dropblock0",
        *[f"{c}.retrofit_dropblock0" for c in convs],
    ]
    retrofit.schedule.update(model, 1.0)
    zeros: dict[str, float] = {}
    hooks = [
        model.get_submodule(b).register_forward_hook(
            lambda _m, _i, out, b=b: zeros.__setitem__(b, float((out == 0).float().mean()))
        )
        for b in blocks
    ]
    counts, _ = _train_step_calls(model, blocks)
    for h in hooks:
        h.remove()
    assert all(n == 1 for n in counts.values()), counts
    # keep_prob 0.5: the levels with room for a block (P2 / P3 at 16x16 or 8x8) lose about half.
    assert zeros[f"{convs[0]}.retrofit_dropblock0"] > 0.2, zeros
    retrofit.strip(model)
    assert _gates(model, DropBlock) == []
    state = model.state_dict()
    fresh = _fpn_detector(name)
    fresh.load_state_dict(state, strict=True)
    # No optimizer step: the weights are the builder's (BatchNorm statistics moved in training).
    assert all(torch.equal(state[k], before[k]) for k in before)


def test_dropblock_fpn_option_is_checked():
    """A non-boolean, or a model without a feature pyramid: a RecipeError naming the field."""
    from retrofit.errors import RecipeError

    with pytest.raises(RecipeError, match=r"dropblock\.fpn"):
        retrofit.load_recipe({"dropblock": {"fpn": "yes"}})
    with pytest.raises(RecipeError, match=r"dropblock\.fpn.*ResNet has none"):
        retrofit.plan(torchvision.models.resnet18(), {"dropblock": {"fpn": True}})


def test_detector_equivalence_compares_detections_and_features():
    """Random weights detect nothing at the default thresholds; while verifying, every
    score_thresh is 0 (10 detections per image) and the backbone's and heads' outputs are
    compared too — so a change deep in the backbone is caught, and the thresholds come back."""
    torch.manual_seed(0)
    model = _faster().eval()
    x = detection.probe_images(model)
    plain = eval_output(model, x)
    with detection.verifying(model):
        reference = eval_output(model, x, watch=detection.watched(model))
    assert model.roi_heads.score_thresh == 0.05 and model.roi_heads.detections_per_img == 100
    assert reference[0].shape == (10, 4)  # the first image's boxes
    assert len(reference) > len(plain) + 5  # FPN maps, proposals, head outputs
    with torch.no_grad():
        model.backbone.body["16"][0].weight.mul_(1.01)  # the last conv of the backbone
    with detection.verifying(model), pytest.raises(VerifyError, match="eval output changed"):
        compare(reference, eval_output(model, x, watch=detection.watched(model)))


class _NeedsLabels(nn.Module):
    """A user model whose training forward takes labels and returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        logits = self.head(x.mean((2, 3)))
        if self.training:
            if y is None:
                raise ValueError("labels are required in training")
            return nn.functional.cross_entropy(logits, y)
        return logits


def test_user_training_call_makes_a_labels_model_applicable():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    # In eval (as after loading it for fine-tuning): its graph is read on the eval call; the
    # training call is what the liveness forward runs.
    model = _NeedsLabels().eval()
    with pytest.raises(retrofit.RefusedError, match="labels are required in training"):
        retrofit.apply(model, SD, example_input=x)
    assert not _gates(model)  # handed back as it came
    retrofit.apply(model, SD, example_input=x, training_call=TrainingCall((x, y)))
    assert len(_gates(model)) == 3
    retrofit.apply(model, SD, example_input=x, training_call=(x, y))  # a tuple: the arguments
    assert len(_gates(model)) == 3


def test_user_training_call_for_a_detector_with_its_own_targets():
    torch.manual_seed(0)
    model = _faster()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 50.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0]]), "labels": torch.tensor([7])},
    ]
    call = TrainingCall((images, targets))
    retrofit.apply(model, SD, example_input=(images,), training_call=call)
    assert len(_gates(model)) == 10
    model.train()
    assert call.loss_of(call.run(model)).ndim == 0


def test_default_loss_reduces_what_models_return():
    assert default_loss({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).item() == 3.0
    assert default_loss(torch.ones(2, 3)).item() == 1.0
    with pytest.raises(TypeError, match="loss=fn"):
        default_loss({"ids": torch.tensor([1, 2])})


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retrofit.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


@pytest.mark.parametrize(
    "recipe,kind,count", [("sd", "stochastic_depth", 10), ("dropblock", "dropblock", 6)]
)
def test_cli_plans_a_detector_complete_on_real_weights(capsys, recipe, kind, count):
    """`retrofit-cli --model <detector> --recipe R` (the plan, no --allow-partial): exit 0, the
    detection API's bookkeeping forwards listed as known to hold no site, nothing else unread.
    The detector is built for real: its heads are read on the calls a real forward makes."""
    from retrofit.cli import main

    argv = ["--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--model-kwargs", "min_size=64",
            "max_size=64", "--recipe", recipe, "--json"]  # fmt: skip
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sum(e["kind"] == kind for e in plan["edits"]) == count
    assert plan["partial"] == []
    assert {s["module"] for s in plan["skipped"]} == {"<root>", "transform", "rpn", "roi_heads"}
    assert all(s.get("known") for s in plan["skipped"])


# Two CLI processes (torch + torchvision imports, a detector built and verified): ~30-45 s on
# 2 busy cores, the journey as users type it.
@pytest.mark.slow
def test_cli_applies_a_detector_verified_and_takes_a_training_example(tmp_path):
    """`retrofit-cli --model <detector> --recipe sd --training-example FILE --out DIR`: exit 0
    with no download and no --no-verify / --allow-partial, FILE's (images, targets) as the
    liveness forward; the stripped weights load into the original class; a FILE that is not an
    example: exit 2 naming it, before any model is built. (The built-in targets, without
    FILE, are the API test's above: the CLI calls the same apply.)"""
    kwargs = ["--model-kwargs", "min_size=64", "max_size=64"]
    model = "fasterrcnn_mobilenet_v3_large_320_fpn"
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}]
    torch.save({"args": [images, targets]}, tmp_path / "example.pt")
    flags = ["--recipe", "sd", "--training-example", "example.pt", "--out", "b"]
    done = _cli("--model", model, *kwargs, *flags, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "10 stochastic_depth" in done.stdout
    state = load_file(tmp_path / "b" / "model.safetensors")
    torchvision.models.get_model(model, weights=None, weights_backbone=None).load_state_dict(
        state, strict=True
    )
    torch.save({"images": images}, tmp_path / "bad.pt")
    done = _cli("--model", model, "--recipe", "sd", "--training-example", "bad.pt", "--out", "c",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert "--training-example 'bad.pt'" in done.stderr and not (tmp_path / "c").exists()


# --- the sweep (tools/task_zoo.py; the full run writes docs/coverage.md) ------------------------

sys.path.insert(0, str(ROOT / "tools"))
import task_zoo  # noqa: E402

# The cheapest of each family: anchor-free (FCOS), single-shot (SSDlite), and the segmenters'
# two heads on MobileNetV3; the R-CNNs and RetinaNet are the tests above.
FAST = [
    ("detection", "fcos_resnet50_fpn"),
    ("detection", "ssdlite320_mobilenet_v3_large"),
    ("segmentation", "lraspp_mobilenet_v3_large"),
    ("segmentation", "deeplabv3_mobilenet_v3_large"),
]


@pytest.mark.parametrize("task,name", FAST, ids=[n for _, n in FAST])
def test_task_zoo_fast_subset_applied_verified_and_live(task, name):
    row = task_zoo.sweep_one(task, name, "sd")
    assert row["status"] == "ok", row
    assert row["layers"] > 0 and row["unread"] == 0, row


def test_task_zoo_dropblock_on_the_feature_pyramid_too():
    """The sweep's ``dropblock+fpn`` recipe: FCOS gets DropBlock after the 6 + 3 blocks of
    ResNet-50's groups 3 and 4 and on each of its pyramid's 5 levels (P3–P7); segmenters have
    no pyramid, so the recipe is not theirs."""
    row = task_zoo.sweep_one("detection", "fcos_resnet50_fpn", "dropblock+fpn")
    assert row["status"] == "ok" and row["layers"] == 6 + 3 + 5, row
    assert task_zoo.recipe_for("segmentation", "dropblock+fpn") is None
    assert task_zoo.recipe_for("segmentation", "dropblock") == task_zoo.RECIPES["dropblock"]


def test_task_zoo_covers_every_torchvision_detector_and_segmenter():
    """The sweep's list is torchvision's, and docs/coverage.md has a row per model."""
    listed = task_zoo.names()
    assert {t for t, _ in listed} == {"detection", "segmentation"}
    assert ("detection", "maskrcnn_resnet50_fpn_v2") in listed and len(listed) >= 18
    docs = (ROOT / "docs" / "coverage.md").read_text()
    section = docs[docs.index(task_zoo.START) : docs.index(task_zoo.END)]
    for _, name in listed:
        assert f"`{name}`" in section, name
    assert "refused" not in section or "targets should not be" not in section


# --- other libraries' parts, no special case ----------------------------------------------------


class _TimmFPN(nn.Module):
    """A timm ResNet-18 (features_only) under torchvision's FPN: a backbone for FasterRCNN."""

    def __init__(self) -> None:
        super().__init__()
        import timm
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
        channels = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(channels, 32, extra_blocks=LastLevelMaxPool())
        self.out_channels = 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn({str(i): f for i, f in enumerate(self.body(x))})


def test_timm_backbone_inside_torchvision_faster_rcnn():
    """Stochastic depth on the timm ResNet-18's 8 blocks and DropBlock after the 2+2 blocks of
    its groups 3 and 4, each applied verified and live inside a torchvision FasterRCNN."""
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    model = FasterRCNN(_TimmFPN(), num_classes=3, **SMALL)
    retrofit.apply(model, SD)
    assert [g.rsplit(".", 1)[0] for g in _gates(model)] == [
        f"backbone.body.layer{i}.{j}" for i in range(1, 5) for j in range(2)
    ]
    retrofit.apply(model, ROOT / "recipes" / "dropblock.yaml")
    assert [e.target for e in retrofit.applied_plan(model).by_kind("dropblock")] == [
        f"backbone.body.layer{i}.{j}" for i in (3, 4) for j in range(2)
    ]


def test_hf_segformer_and_detr_with_labels_as_their_training_call():
    """HF models whose training forward takes labels (and returns ``.loss``): SegFormer's two
    blocks' four drop-path slots are reused; DETR (a tiny ResNet backbone, 1+1 layers) gets its
    backbone's 4 blocks and its decoder layer's 3 residuals — its encoder layer is not read yet
    (a warned partial plan, left to the capture)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    segformer = transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
            patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
            decoder_hidden_size=32, num_labels=3,
        )
    )  # fmt: skip
    labels = torch.randint(0, 3, (2, 32, 32))
    call = TrainingCall(kwargs={"pixel_values": x, "labels": labels})
    retrofit.apply(segformer, SD, example_input=x, training_call=call)
    edits = retrofit.applied_plan(segformer).by_kind("stochastic_depth")
    assert len(edits) == 4 and all(e.action in ("set_rate", "replace_module") for e in edits)
    segformer.train()
    assert call.loss_of(call.run(segformer)).ndim == 0  # HF's .loss

    backbone = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
        layer_type="basic", out_features=["stage4"],
    )  # fmt: skip
    detr = transformers.DetrForObjectDetection(
        transformers.DetrConfig(
            use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
            num_labels=3,
        )
    )  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    targets = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    call = TrainingCall(kwargs={"pixel_values": x, "labels": targets * 2})
    with pytest.warns(retrofit.RetrofitWarning, match=r"4 module\(s\) could not be read"):
        retrofit.apply(detr, SD, example_input=x, training_call=call)
    modules = [e.module for e in retrofit.applied_plan(detr).by_kind("stochastic_depth")]
    stages = [f"model.backbone.model.encoder.stages.{i}.layers.0" for i in range(4)]
    assert modules == stages + ["model.decoder.layers.0"] * 3
    assert "model.encoder.layers.0" in [s.module for s in retrofit.applied_plan(detr).skipped]
