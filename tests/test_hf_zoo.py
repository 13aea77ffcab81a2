"""tools/hf_zoo.py: the tiny configs and one model's record (the sweep itself is a tool run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import hf_zoo  # noqa: E402


def test_tiny_kwargs_shrink_by_field_name():
    swin = hf_zoo.tiny_kwargs(transformers.SwinConfig())
    # hierarchical: stages kept, two blocks each, widths from 16, one head per stage, and
    # hidden_size (derived from embed_dim) left alone; the last stage is one window again
    assert swin == {
        "depths": [2, 2, 2, 2],
        "embed_dim": 16,
        "num_heads": [1, 1, 1, 1],
        "image_size": 64,
        "window_size": 2,
    }
    beit = hf_zoo.tiny_kwargs(transformers.BeitConfig())
    assert beit == {
        "num_hidden_layers": 2,
        "hidden_size": 16,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "image_size": 64,
    }
    config, _ = hf_zoo.tiny_config(hf_zoo.Entry("cvt", transformers.CvtConfig), rate=0.1)
    assert list(config.drop_path_rate) == [0.1, 0.1, 0.1]  # shaped like the default (per stage)
    assert list(config.depth) == [1, 2, 3]  # the justified override


def test_one_model_record():
    rec = hf_zoo.analyse(hf_zoo.Entry("convnext", transformers.ConvNextConfig))
    assert rec["status"] == "ok", rec.get("error")
    assert rec["input"] == [2, 3, 64, 64]
    # four stages of two ConvNeXt layers: eight HF blocks, one residual each
    assert rec["hf_blocks"] == 8
    assert rec["apply"] in ("verified", "refused", "raised")
    if rec["apply"] == "verified":
        assert isinstance(rec["live"], bool) and isinstance(rec["dead"], list)
    else:
        assert isinstance(rec["unchanged"], bool)


@pytest.mark.slow
def test_enumeration_finds_towers_and_excludes_audio():
    entries, excluded = hf_zoo.enumerate_models()
    names = {e.name for e in entries}
    assert {"swin", "beit", "dinov2", "segformer", "xclip_vision_model"} <= names
    assert "vit" not in names  # ViT's config takes no drop_path_rate
    assert any(name == "clap_audio_model" for name, _ in excluded)
