"""Detection and segmentation in the trainer: the embedded canvases, COCO JSON and VOC folders
(with their bad-data errors: exit 2, one line naming the file and the entry), the CLI runs on
torchvision's own models, and torchrun.

The CLI runs use tiny sizes (64 px canvases, a few images, two steps per epoch); the torchrun
runs use tests/task_models.py (torchvision's FasterRCNN and FCN classes over a backbone of a few
channels). Speed is measured by tools/bench_tasks.py, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrofit.cli import main
from retrofit.finetune_config import TrainConfig
from retrofit.train import read_metrics
from retrofit.train.data import DataError
from retrofit.train.tasks import get_task, infer_task
from retrofit.train.tasks.canvas import CanvasSpec, canvas_sets, parse_canvas_spec
from retrofit.weights import read_weights

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# What a classification run directory holds (tests/test_cli.py), for a run with a plan.
RUN_FILES = {"recipe.yaml", "plan.json", "lint.json", "metrics.jsonl", "curves.png",
             "checkpoint.pt", "model.safetensors", "model.json"}  # fmt: skip


# ------------------------------------------------------------------ embedded canvases


def test_canvases_boxes_hold_the_ink_and_masks_the_digit():
    train, val = canvas_sets(CanvasSpec(side=64, train=12, val=4), 0.2)
    assert train.images.shape == (12, 1, 64, 64) and val.masks.shape == (4, 64, 64)
    for i in range(12):
        boxes, labels = train.boxes[i], train.labels[i]
        assert 1 <= len(boxes) <= 3 and len(boxes) == len(labels)
        assert labels.min() >= 1 and labels.max() <= 10
        for (x0, y0, x1, y1), lab in zip(boxes.int().tolist(), labels.tolist(), strict=True):
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            inside = train.masks[i, y0:y1, x0:x1] == lab
            # the tight box: ink on each of its four edges, the label's pixels inside it
            assert (
                inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            )
        drawn = set(train.masks[i].unique().tolist()) - {0}
        assert drawn == set(labels.tolist())
    again, _ = canvas_sets(CanvasSpec(side=64, train=12, val=4), 0.2)
    assert torch.equal(again.images, train.images)  # fixed canvases, whatever the run's seed


def test_canvas_spec_errors_name_the_option():
    assert parse_canvas_spec("digits:side=96:train=8") == CanvasSpec(96, 8, 60)
    with pytest.raises(DataError, match="side='16' is not an integer >= 32"):
        parse_canvas_spec("digits:side=16")
    with pytest.raises(DataError, match="bad option 'size=9'"):
        parse_canvas_spec("digits:size=9")


def test_task_is_inferred_from_torchvision_classes():
    import torchvision

    from tests.task_models import tiny_fasterrcnn, tiny_fcn

    assert infer_task(tiny_fasterrcnn())[0] == "detection"
    assert infer_task(tiny_fcn())[0] == "segmentation"
    assert infer_task(torchvision.models.resnet18()) == ("classification", None)


def test_detection_heads_resize_to_the_keys_of_the_builder():
    import torchvision

    task = get_task("detection")
    # RetinaNet's cls_logits path also serves FCOS; Mask R-CNN's covers Faster R-CNN's predictor.
    for name in (
        "retinanet_resnet50_fpn",
        "ssdlite320_mobilenet_v3_large",
        "maskrcnn_resnet50_fpn",
    ):
        kw = {"weights_backbone": None}
        with torch.device("meta"):  # the structure is what is compared: no memory, no init
            model = torchvision.models.get_model(name, weights=None, **kw)
            assert task.resize_head(model, 11) is not None
            want = torchvision.models.get_model(name, weights=None, num_classes=11, **kw)
        want = want.state_dict()
        got = model.state_dict()
        assert got.keys() == want.keys(), name
        assert [k for k in got if got[k].shape != want[k].shape] == [], name
        assert task.resize_head(model, 11) is None  # already the right size: kept


# ------------------------------------------------------------------ COCO JSON


def _coco_dir(root: Path, n_train: int = 3, n_val: int = 2) -> Path:
    """A COCO directory made of canvases: annotations/instances_{train,val}.json + images."""
    train, val = canvas_sets(CanvasSpec(side=64, train=n_train, val=n_val), 0.2)
    (root / "annotations").mkdir(parents=True)
    for split, c in (("train", train), ("val", val)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(len(c.images)):
            pixels = (c.images[i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(root / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
            for (x0, y0, x1, y1), lab in zip(
                c.boxes[i].tolist(), c.labels[i].tolist(), strict=True
            ):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 100 + lab,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                             "iscrowd": 0})  # fmt: skip
        cats = [{"id": 100 + k, "name": str(k - 1)} for k in range(1, 11)]
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def test_coco_directory_reads_boxes_and_maps_categories(tmp_path):
    from tests.task_models import tiny_fasterrcnn

    root = _coco_dir(tmp_path / "coco")
    cfg = TrainConfig(batch_size=2, workers=0)
    bundle = get_task("detection").build_data(str(root), tiny_fasterrcnn(), cfg)
    assert bundle.num_classes == 11 and bundle.task == "detection"
    assert bundle.class_names[:3] == ["background", "0", "1"]
    images, targets = next(bundle.val.iter_epoch())
    doc = json.loads((root / "annotations/instances_val.json").read_text())
    first = [a for a in doc["annotations"] if a["image_id"] == 1]
    assert images[0].shape == (3, 64, 64) and images[0].dtype == torch.float32
    x, y, w, h = first[0]["bbox"]
    assert targets[0]["boxes"][0].tolist() == [x, y, x + w, y + h]  # xyxy
    assert targets[0]["labels"].tolist() == [a["category_id"] - 100 for a in first]  # 1..K


def _break(root: Path, how: str) -> str:
    """Corrupt the train file; returns what the error line must name."""
    path = root / "annotations" / "instances_train.json"
    doc = json.loads(path.read_text())
    if how == "box outside":
        doc["annotations"][1]["bbox"] = [50, 10, 30, 20]
        want = r"annotations\[1\] \(id 2\), image \d+: bbox \[50, 10, 30, 20\].*outside the 64×64 image"
    elif how == "class out of range":
        doc["annotations"][0]["category_id"] = 7
        want = r"annotations\[0\] \(id 1\): category_id 7 is out of range"
    elif how == "missing field":
        del doc["annotations"][2]["bbox"]
        want = r"annotations\[2\] \(id 3\): missing field 'bbox'"
    else:
        del doc["categories"]
        want = r"field 'categories' is missing"
    path.write_text(json.dumps(doc))
    return "instances_train.json: " + want


@pytest.mark.parametrize(
    "how", ["box outside", "class out of range", "missing field", "no categories"]
)
def test_bad_coco_data_exits_2_naming_file_and_entry(tmp_path, capsys, how):
    root = _coco_dir(tmp_path / "coco")
    want = _break(root, how)
    out = tmp_path / "run"
    code = main(["--model", "tests.task_models:tiny_fasterrcnn", "--recipe", "recipes/study/none.yaml",
                 "--train", "--task", "detection", "--data", str(root), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    import re

    assert re.search(want, err[0]), err[0]
    assert not out.exists()  # found before anything was written


# ------------------------------------------------------------------ VOC folders


def _voc_dir(root: Path, n: int = 3) -> Path:
    train, val = canvas_sets(CanvasSpec(side=64, train=n, val=2), 0.2)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for split, c in (("train", train), ("val", val)):
        ids = []
        for i in range(len(c.images)):
            name = f"{split}_{i}"
            Image.fromarray((c.images[i, 0].numpy() * 255).astype(np.uint8)).convert("RGB").save(
                root / "JPEGImages" / f"{name}.jpg"
            )
            Image.fromarray(c.masks[i].numpy().astype(np.uint8)).save(
                root / "SegmentationClass" / f"{name}.png"
            )
            ids.append(name)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "labels.txt").write_text("\n".join(["background", *map(str, range(10))]) + "\n")
    return root


def test_voc_folders_read_images_and_masks_together(tmp_path):
    from tests.task_models import tiny_fcn

    root = _voc_dir(tmp_path / "voc")
    cfg = TrainConfig(batch_size=2, workers=0, img_size=32)
    bundle = get_task("segmentation").build_data(str(root), tiny_fcn(), cfg)
    assert bundle.num_classes == 11 and bundle.input_size == (3, 32, 32)
    images, masks = next(bundle.val.iter_epoch())
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    assert masks.dtype == torch.int64 and set(masks.unique().tolist()) <= set(range(11))
    want = np.array(
        Image.open(root / "SegmentationClass/val_0.png").resize((32, 32), Image.NEAREST)
    )
    assert (masks[0].numpy() == want).mean() > 0.95  # the mask followed the image's resize


@pytest.mark.parametrize("how", ["mask size", "class out of range"])
def test_bad_voc_data_exits_2_naming_file_and_entry(tmp_path, capsys, how):
    root = _voc_dir(tmp_path / "voc")
    mask = root / "SegmentationClass" / "train_1.png"
    if how == "mask size":
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(mask)
        want = "train_1.png: mask is 48×32 but its image train_1.jpg is 64×64, entry 'train_1' (line 2 of ImageSets/Segmentation/train.txt)"
    else:
        a = np.array(Image.open(mask))
        a[3, 3] = 37
        Image.fromarray(a).save(mask)
        want = "train_1.png: class id 37 is out of range, entry 'train_1' (line 2 of ImageSets/Segmentation/train.txt)"
    out = tmp_path / "run"
    code = main(["--model", "tests.task_models:tiny_fcn", "--recipe", "recipes/study/none.yaml",
                 "--train", "--data", str(root), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and want in err[0], err
    assert not out.exists()


# ------------------------------------------------------------------ the CLI on torchvision's models


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "retrofit.cli", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=CPU_ENV, cwd=ROOT
    )


def _check_run_dir(out: Path, builder: str, metric: str, **build) -> list[dict]:
    import torchvision

    assert {p.name for p in out.iterdir()} >= RUN_FILES, sorted(p.name for p in out.iterdir())
    meta = json.loads((out / "model.json").read_text())
    assert meta["num_classes"] == 11 and meta["task"] in ("detection", "segmentation")
    original = torchvision.models.get_model(builder, weights=None, weights_backbone=None,
                                            num_classes=11, **build)  # fmt: skip
    original.load_state_dict(read_weights(out / "model.safetensors"), strict=True)
    epochs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(isinstance(r[metric], float) and 0 <= r[metric] <= 100 for r in epochs)
    return epochs


def test_bn_momentum_is_set_on_every_batchnorm_before_training():
    """train.bn_momentum: torchvision's MobileNetV3 BatchNorms (momentum 0.01) lag a short run."""
    from retrofit.errors import RecipeError
    from retrofit.train import fit
    from tests import task_models

    def momenta(model):
        return [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    seen = []
    model = task_models.tiny_fcn()
    count = len(momenta(model))
    assert count > 0 and set(momenta(model)) == {0.1}
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.register_forward_pre_hook(
        lambda m, args: seen.append(m.momentum) if m.training else None
    )
    cfg = TrainConfig(epochs=1, batch_size=4, workers=0, bn_momentum=0.5)
    res = fit(model, None, "digits:side=64:train=4:val=2", out=None, device="cpu", progress=False,
              config=cfg)  # fmt: skip
    assert seen and set(seen) == {0.5}, "the training step ran at the configured momentum"
    assert len(momenta(res.model)) == count and set(momenta(res.model)) == {0.5}
    with pytest.raises(RecipeError, match=r"train\.bn_momentum"):
        TrainConfig(bn_momentum=0)


def test_unet_by_hand_fine_tunes_with_dropblock_on_its_encoder(tmp_path):
    """A U-Net written by hand (it returns a tensor of logits) through the segmentation task:
    DropBlock on its stages 3 and 4 (``enc3``, ``bottleneck``), the keep_prob ramp logged, mIoU
    per epoch, and the exported weights load into the original class strictly."""
    from retrofit.train import fit
    from tests.task_models import TinyUNet

    torch.manual_seed(0)
    recipe = {"dropblock": {"stages": [3, 4], "block_size": 3, "keep_prob": 0.8}}
    cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-3, workers=0, warmup_epochs=0, log_every=2)
    res = fit(TinyUNet(), recipe, "digits:side=32:train=16:val=8", out=tmp_path, device="cpu",
              progress=False, config=cfg, task="segmentation")  # fmt: skip
    assert res.completed
    assert [e["target"] for e in res.plan["edits"]] == ["enc3", "bottleneck"]
    epochs = [r for r in res.history if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= r["val_miou"] <= 100.0 for r in epochs)
    assert 0.8 <= epochs[-1]["keep_prob"] < 1.0  # ramped from 1 towards 0.8
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["task"] == "segmentation"
    TinyUNet().load_state_dict(read_weights(res.weights), strict=True)


@pytest.mark.slow  # a subprocess building and training ResNet-50 Faster R-CNN: ~15 s when quiet
def test_cli_detection_fine_tune_on_the_embedded_data(tmp_path):
    out = tmp_path / "det"
    proc = _cli("--model", "fasterrcnn_resnet50_fpn", "--task", "detection", "--recipe",
                "recipes/dropblock.yaml", "--train", "--data", "digits:side=64:train=4:val=2",
                "--epochs", "2", "--batch-size", "2", "--no-progress", "--out", str(out),
                "--model-kwargs", "box_batch_size_per_image=32", "rpn_post_nms_top_n_test=50",
                "box_detections_per_img=20")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("plan: FasterRCNN: 9 dropblock") for ln in lines), lines[:4]
    assert "min_size=64 max_size=64" in lines[0]  # the detector takes the canvases at their size
    assert any(ln.startswith("epoch 2/2: loss") and "mAP" in ln and "AP50" in ln for ln in lines)
    plan = json.loads((out / "plan.json").read_text())
    assert {e["kind"] for e in plan["edits"]} == {"dropblock"}
    assert all(e["module"].startswith("backbone.") for e in plan["edits"])
    _check_run_dir(out, "fasterrcnn_resnet50_fpn", "val_map")


@pytest.mark.slow  # a subprocess: torch import, LRASPP built, applied and verified, two epochs
def test_cli_segmentation_fine_tune_on_the_embedded_data(tmp_path):
    out = tmp_path / "seg"
    proc = _cli("--model", "lraspp_mobilenet_v3_large", "--recipe", "recipes/sd_seg.yaml", "--train",
                "--data", "digits:side=64:train=8:val=4", "--epochs", "2", "--batch-size", "4",
                "--no-progress", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[1] == (
        "task: segmentation (inferred: LRASPP is a torchvision segmentation model; --task to choose)"
    )
    assert any(ln.startswith("epoch 2/2: loss") and "mIoU" in ln for ln in lines)
    epochs = _check_run_dir(out, "lraspp_mobilenet_v3_large", "val_miou")
    assert all(r["val_loss"] > 0 and 0 <= r["val_pixel_acc"] <= 100 for r in epochs)
    plan = json.loads((out / "plan.json").read_text())
    assert {e["kind"] for e in plan["edits"]} == {"stochastic_depth"} and len(plan["edits"]) == 11
    assert (out / "survival.png").is_file()


# ------------------------------------------------------------------ torchrun

# fit() under torchrun (the CLI's own torchrun locking is tested by tests/test_train.py's
# journeys): rank 0 writes, ranks start from different weights that DDP must make equal.
DDP_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from retrofit.finetune_config import TrainConfig
from retrofit.train import fit
from tests import task_models
torch.manual_seed(int(os.environ["RANK"]))
model = getattr(task_models, sys.argv[2])()
cfg = TrainConfig(epochs=2, batch_size=4, log_every=1, workers=0, lr=1e-3)
res = fit(model, {"stochastic_depth": {"p_L": 0.8}}, "digits:side=64:train=16:val=6", out=sys.argv[1],
          device="cpu", progress=False, config=cfg)
torch.save(res.model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow  # two processes, each importing torch and running apply
@pytest.mark.parametrize(
    ("model", "metric"),
    [("tiny_fasterrcnn", "val_map"), ("tiny_fcn", "val_miou")],
    ids=["detection", "segmentation"],
)
def test_torchrun_two_processes(tmp_path, model, metric):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(out), model]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=CPU_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s0 = torch.load(out / "rank0.pt", weights_only=True)
    s1 = torch.load(out / "rank1.pt", weights_only=True)
    assert [k for k in s0 if not torch.equal(s0[k], s1[k])] == []  # one model on both ranks
    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [2, 4]  # 16 images / (4 per rank × 2 ranks)
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]  # rank 0 alone
    assert all(0 <= r[metric] <= 100 for r in epochs)
    assert all(r["sd_kept"] is not None for r in records if r["kind"] == "step")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 2
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------ compare


@pytest.mark.parametrize(
    ("model", "metric", "name"),
    [
        ("tests.task_models:tiny_fasterrcnn", "val_map", "mAP"),
        ("tests.task_models:tiny_fcn", "val_miou", "mIoU"),
    ],  # fmt: skip
    ids=["detection", "segmentation"],
)
def test_compare_measures_the_tasks_metric(tmp_path, capsys, model, metric, name):
    out = tmp_path / "cmp"
    code = main(["compare", "--model", model, "--recipes", "recipes/study/none.yaml",
                 "recipes/sd.yaml", "--seeds", "1", "--data", "digits:side=64:train=8:val=4",
                 "--train-kwargs", "epochs=1", "batch_size=4", "--threads", "1", "--no-progress",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "table.json").read_text())
    for rec in table["runs"]:
        last = [r for r in read_metrics(out / "runs" / rec["variant"] / "seed0" / "metrics.jsonl")
                if r["kind"] == "epoch"][-1]  # fmt: skip
        assert rec["metric"] == metric
        assert rec["test_acc"] == pytest.approx(last[metric] / 100)
        assert 0 <= rec["train_acc"] <= 1
    text = (out / "table.md").read_text()
    assert f"| test {name} % | train {name} % |" in text and f"Test {name} is measured" in text


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    "model",
    [pytest.param("tiny_fasterrcnn", marks=pytest.mark.slow), "tiny_fcn"],  # 3 detector applies
    ids=["detection", "segmentation"],
)
def test_resume_is_exact(tmp_path, model):
    from retrofit.train import fit
    from retrofit.train.metrics import without_timing
    from tests import task_models

    cfg = TrainConfig(epochs=2, batch_size=4, log_every=1, workers=0, lr=1e-3)
    data = "digits:side=64:train=12:val=4"
    recipe = {"stochastic_depth": {"p_L": 0.8}}
    runs = {}
    for name, stops in (("whole", [None]), ("resumed", [4, None])):
        out = tmp_path / name
        for i, max_steps in enumerate(stops):
            torch.manual_seed(0)  # the same initial weights (resume=True loads its checkpoint)
            fit(getattr(task_models, model)(), recipe, data, out=out, device="cpu", progress=False,
                config=cfg, max_steps=max_steps, resume=i > 0)  # fmt: skip
        runs[name] = without_timing(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in runs["whole"] if r["kind"] == "epoch"] == [3, 6]
    assert runs["resumed"] == runs["whole"]
