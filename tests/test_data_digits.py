"""``--data digits:classes=…:per_class=…`` and the training split as evaluation batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrofit.finetune_config import TrainConfig
from retrofit.train.data import (
    DataError,
    DigitsSubset,
    build_data,
    load_digits_arrays,
    parse_digits_spec,
)
from tests.user_models import tiny_resnet


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "img_size": 8, "workers": 0, **kw})


def test_parse_digits_spec():
    assert parse_digits_spec("digits").whole
    assert parse_digits_spec("digits:classes=6-9") == DigitsSubset((6, 7, 8, 9), None)
    assert parse_digits_spec("digits:per_class=10:classes=0,2,4-5") == DigitsSubset(
        (0, 2, 4, 5), 10
    )


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("digits:foo=1", "bad option 'foo=1'"),
        ("digits:classes=3", "at least 2 classes"),
        ("digits:classes=8-12", "'8-12' is not a digit 0-9"),
        ("digits:classes=5-2", "'5-2'"),
        ("digits:per_class=0", "per_class='0'"),
        ("digits:per_class=ten", "per_class='ten'"),
        ("digits:classes=1-2:classes=3-4", "'classes' is given twice"),
        ("digits:per_class=1000", "class 0 has only 142 training images"),
    ],
)
def test_bad_digits_specs_name_the_problem(spec, needle):
    with pytest.raises(DataError) as e:
        build_data(spec, tiny_resnet(), _cfg())
    assert needle in str(e.value) and spec in str(e.value)


def test_a_subset_relabels_and_draws_the_same_images_for_every_seed():
    model = tiny_resnet()
    full = build_data(None, model, _cfg())
    part = build_data("digits:classes=6-9:per_class=10", model, _cfg())
    again = build_data("digits:classes=6-9:per_class=10", model, _cfg(seed=3))
    assert part.num_classes == 4 and part.class_names == ["6", "7", "8", "9"]
    assert part.train.labels.bincount().tolist() == [10, 10, 10, 10]
    assert torch.equal(part.train.images, again.train.images)  # a fixed draw, not train.seed's
    # The validation split is the full one restricted to the classes, relabelled 6..9 → 0..3.
    keep = full.val.labels >= 6
    assert torch.equal(part.val.labels, full.val.labels[keep] - 6)
    assert torch.equal(part.val.images, full.val.images[keep])
    # The training images are a subset of the full training split's images of those classes.
    pixels, labels = load_digits_arrays()
    train_rows = {tuple(r) for r in full.train.images.flatten(1).tolist()}
    assert all(tuple(r) in train_rows for r in part.train.images.flatten(1).tolist())
    assert "classes 6,7,8,9, 10 train images/class, 40 train / 143 val" in part.source
    assert np.isin(labels, [6, 7, 8, 9]).sum() == 40 + 143 + 531  # the rest is not used


def test_train_eval_is_every_training_image_once_in_order():
    b = build_data("digits:per_class=7", tiny_resnet(), _cfg(batch_size=16))
    assert b.train.num_batches == 70 // 16  # training drops the partial batch
    batches = list(b.train_eval().iter_epoch())
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert torch.equal(x, b.train.images) and torch.equal(y, b.train.labels)


def test_train_eval_of_an_image_folder_uses_the_eval_transform(tmp_path):
    from PIL import Image

    pixels, labels = load_digits_arrays()
    for split in ("train", "val"):
        for c in (0, 1):
            d = tmp_path / split / str(c)
            d.mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[:5]:
                img = (pixels[i].reshape(8, 8) * 255 / 16).astype(np.uint8)
                Image.fromarray(img).resize((16, 16)).save(d / f"{i}.png")
    b = build_data(tmp_path, tiny_resnet(), _cfg(batch_size=4, img_size=16))
    ev = b.train_eval()
    first = torch.cat([x for x, _ in ev.iter_epoch()])
    second = torch.cat([x for x, _ in ev.iter_epoch()])
    assert first.shape == (10, 3, 16, 16) and torch.equal(first, second)  # no random crops/flips
    val = torch.cat([x for x, _ in b.val.iter_epoch()])
    # train/ and val/ hold the same files here, so the eval view of train/ equals val/.
    assert torch.equal(first, val)
