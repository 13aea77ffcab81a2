"""HuggingFace transformers models: ``hf:NAME`` model names, and issue 10's acceptance on tiny
configs — retrofit's sites are exactly where HF applies drop path (the execution oracle,
``tools/oracle.py: drop_path_placement``), and ``apply`` is verified and live.

Random weights, tiny configs written here, nothing from the hub. Skipped when the ``hf`` extra
(transformers) is not installed; CI installs it.
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import retrofit  # noqa: E402
from retrofit.capture.probe import probe_input_size  # noqa: E402
from retrofit.errors import ModelError  # noqa: E402
from retrofit.models import create_model, hf_model_class  # noqa: E402
from tests.checks import assert_instrumented, snapshot  # noqa: E402
from tools.oracle import drop_path_placement, hf_drop_path_owners  # noqa: E402

SIZE = 32


def _configs() -> dict[str, tuple[object, int, int]]:
    """Tiny configs (a few layers of width 16, 32² images), the residual adds per block in the
    model's code, and how many of them HF puts drop path on (HF's Swin: the attention residual
    only; its MLP residual is ``self.dropout(hidden_states) + residual``)."""
    T = transformers
    iso = dict(
        image_size=SIZE,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return {
        "beit": (T.BeitConfig(**iso), 2, 2),
        "dinov2": (T.Dinov2Config(**{**iso, "mlp_ratio": 2}), 2, 2),
        "swin": (
            T.SwinConfig(
                image_size=SIZE,
                patch_size=4,
                embed_dim=8,
                depths=[2, 2],
                num_heads=[1, 1],
                window_size=4,
            ),
            2,
            1,
        ),  # fmt: skip
        "convnext": (
            T.ConvNextConfig(image_size=SIZE, num_stages=2, hidden_sizes=[8, 16], depths=[2, 2]),
            1,
            1,
        ),
        "segformer": (
            T.SegformerConfig(
                num_encoder_blocks=2,
                depths=[1, 2],
                sr_ratios=[2, 1],
                hidden_sizes=[8, 16],
                num_attention_heads=[1, 2],
                patch_sizes=[7, 3],
                strides=[4, 2],
                decoder_hidden_size=16,
                mlp_ratios=[2, 2],
            ),
            2,
            2,
        ),  # fmt: skip
    }


CONFIGS = _configs()


def _image(seed: int, config=None) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _build(config, rate: float = 0.0) -> torch.nn.Module:
    config = type(config).from_dict(config.to_dict())
    try:
        config.drop_path_rate = rate
    except Exception:  # LeViT's config declares the rate an int; its model reads a float
        object.__setattr__(config, "drop_path_rate", rate)
    torch.manual_seed(0)
    return hf_model_class(config)._from_config(config).float()


@functools.cache
def _oracle_sites_of(name: str) -> Counter:
    return _oracle_sites(CONFIGS[name][0])


def _oracle_sites(config) -> Counter:
    """Adds fed by HF's own drop path, per owner, on the model built with a rate."""
    placement = drop_path_placement(_build(config, rate=0.1), _image(0))
    assert placement.owners, "the oracle found no HF drop path"
    assert not placement.not_called
    return Counter(owner for owner, _, _ in placement.slots if owner in placement.owners)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_oracle_finds_every_hf_block(name):
    """The oracle itself, against the models' code: every block's drop path, per-block adds."""
    config, _, hf_per_block = CONFIGS[name]
    sites = _oracle_sites_of(name)
    model = _build(config, rate=0.1)
    blocks = {n.rpartition(".")[0] for n, _ in model.named_modules() if n.endswith(".drop_path")}
    assert set(sites) == blocks
    assert set(sites.values()) == {hf_per_block}


# batch mode (the branch outlined) on one windowed transformer and one CNN keeps the set fast
APPLY_CASES = [(name, "row") for name in sorted(CONFIGS)] + [
    ("swin", "batch"),
    ("convnext", "batch"),
]


@pytest.mark.parametrize(("name", "mode"), APPLY_CASES)
def test_sites_are_hf_blocks_and_apply_is_live(name, mode):
    config, per_block, _ = CONFIGS[name]
    expected = {owner: per_block for owner in _oracle_sites_of(name)}
    model = _build(config)
    snap = snapshot(model, _image(1))
    retrofit.apply(model, {"stochastic_depth": {"mode": mode}}, example_input=_image(0))
    sd = retrofit.applied_plan(model).by_kind("stochastic_depth")
    assert Counter(e.module for e in sd) == expected
    assert_instrumented(model, snap, _image(0), _image(1))


def test_vit_without_hf_drop_path_gets_two_sites_per_layer():
    """HF's ViT has no drop path: its residual adds, two per layer, are found all the same."""
    config = transformers.ViTConfig(
        image_size=SIZE, patch_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    model = _build(config)
    snap = snapshot(model, _image(1))
    retrofit.apply(model, {"stochastic_depth": {}}, example_input=_image(0))
    sd = retrofit.applied_plan(model).by_kind("stochastic_depth")
    # transformers 5 names them vit.layers.N, 4.x vit.encoder.layer.N: read them off the model
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "ViTLayer"]
    assert len(layers) == 2
    assert Counter(e.module for e in sd) == dict.fromkeys(layers, 2)
    assert_instrumented(model, snap, _image(0), _image(1))


def test_levit_plan_twice_is_identical_and_pure():
    """Issue 10: ``retrofit.plan`` twice on HF LeViT raised ``KeyError: getitem_6``."""
    config = transformers.LevitConfig(
        image_size=SIZE, hidden_sizes=[16, 32], num_attention_heads=[1, 2], depths=[1, 1],
        key_dim=[8, 8], attention_ratio=[2, 2], mlp_ratio=[2, 2],
        down_ops=[["Subsample", 8, 1, 4, 2, 2]],
    )  # fmt: skip
    model = _build(config)
    snap = snapshot(model, _image(1))
    first = retrofit.plan(model, {"stochastic_depth": {}})
    second = retrofit.plan(model, {"stochastic_depth": {}})
    assert first.to_dict() == second.to_dict()
    from tests.checks import assert_unchanged

    assert_unchanged(model, snap, _image(1))


# --- hf: model names --------------------------------------------------------------------------


@pytest.fixture
def swin_dir(tmp_path: Path) -> Path:
    CONFIGS["swin"][0].save_pretrained(tmp_path)
    return tmp_path


def test_hf_dir_builds_the_classifier_with_random_weights(swin_dir):
    model, info = create_model(f"hf:{swin_dir}", kwargs={"drop_path_rate": 0.1, "num_classes": 5})
    assert type(model).__name__ == "SwinForImageClassification"
    assert info.source == "transformers" and info.spec == f"hf:{swin_dir}"
    assert model.config.drop_path_rate == 0.1 and model.config.num_labels == 5
    assert model.classifier.out_features == 5
    assert probe_input_size(model) == (3, SIZE, SIZE)
    again, _ = create_model(f"hf:{swin_dir}")
    # random initialisation: a second build differs (no weights were read from anywhere)
    assert not torch.equal(model.classifier.weight, again.classifier.weight)


def test_hf_dir_without_a_classifier_builds_the_base_model(tmp_path):
    transformers.Dinov2Config(**{"hidden_size": 16, "num_hidden_layers": 1}).save_pretrained(
        tmp_path
    )
    model, _ = create_model(f"hf:{tmp_path}", meta=True)
    assert next(model.parameters()).device.type == "meta"
    cfg = transformers.SwiftFormerConfig()
    assert hf_model_class(cfg).__name__ == "SwiftFormerForImageClassification"
    assert hf_model_class(transformers.Swin2SRConfig()).__name__ == "Swin2SRModel"


def test_hf_names_errors(tmp_path, swin_dir):
    with pytest.raises(ModelError, match="no such directory"):
        create_model(f"hf:{tmp_path / 'nope'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="holds no config.json"):
        create_model(f"hf:{empty}")
    with pytest.raises(ModelError, match="no field 'drop_pth_rate'; close matches: drop_path_rate"):
        create_model(f"hf:{swin_dir}", kwargs={"drop_pth_rate": 0.1})
    with pytest.raises(ModelError, match="hf: needs a local directory"):
        create_model("hf:")


def test_hf_hub_id_offline_is_one_clear_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        create_model("hf:microsoft/swin-tiny-patch4-window7-224")
    msg = str(err.value)
    assert "'hf:microsoft/swin-tiny-patch4-window7-224'" in msg
    assert "a local directory holding a config.json works offline" in msg
    assert "\n" not in msg


def test_hf_without_transformers_says_how_to_install(monkeypatch, swin_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r"pip install 'retrofit\[hf\]'"):
        create_model(f"hf:{swin_dir}")


def test_cli_plans_an_hf_config_dir(tmp_path, capsys):
    from retrofit.cli import main

    CONFIGS["convnext"][0].save_pretrained(tmp_path)
    recipe = Path(__file__).parent.parent / "recipes" / "sd.yaml"
    code = main(["--model", f"hf:{tmp_path}", "--recipe", str(recipe), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    sd = [e for e in out["edits"] if e["kind"] == "stochastic_depth"]
    owners = {e["module"] for e in sd}
    assert owners == {f"convnext.encoder.stages.{s}.layers.{b}" for s in (0, 1) for b in (0, 1)}


def test_hf_drop_path_owners_matches_placement():
    config = CONFIGS["beit"][0]
    model = _build(config, rate=0.1)
    owners = hf_drop_path_owners(model, _image(0))
    assert owners == drop_path_placement(model, _image(0)).owners
    assert owners == {
        n.rpartition(".")[0] for n, _ in model.named_modules() if n.endswith("drop_path")
    }


def test_cli_bad_hf_name_is_exit_2_with_one_line(tmp_path, capsys):
    from retrofit.cli import main

    recipe = Path(__file__).parent.parent / "recipes" / "sd.yaml"
    code = main(["--model", f"hf:{tmp_path / 'missing'}", "--recipe", str(recipe)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "no such directory" in err
