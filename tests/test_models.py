"""Model names: zoo precedence, close matches, kwargs, user factories, meta builds, probe sizes."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from retrofit.capture.probe import probe_input_size
from retrofit.errors import ModelError
from retrofit.models import (
    ModelInfo,
    create_model,
    parse_kwargs,
    resolve_model_name,
)
from retrofit.weights import load_weights

USER = "tests.user_models"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    # The factories are named tests.user_models:NAME: make that importable from any cwd.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, source, resolved",
    [
        ("tv:resnet50", "torchvision", "resnet50"),
        ("torchvision:resnet50", "torchvision", "resnet50"),
        ("TV:resnet50", "torchvision", "resnet50"),
        ("timm:resnet50", "timm", "resnet50"),
        ("timm:resnet50.a1_in1k", "timm", "resnet50.a1_in1k"),
        ("vit_b_16", "torchvision", "vit_b_16"),  # torchvision only
        ("swin_t", "torchvision", "swin_t"),
        ("convnext_nano", "timm", "convnext_nano"),  # timm only
        ("resnet50.a1_in1k", "timm", "resnet50.a1_in1k"),  # a pretrained tag is timm's
        ("fasterrcnn_resnet50_fpn", "torchvision", "fasterrcnn_resnet50_fpn"),
        (f"{USER}:tiny_resnet", "user", f"{USER}:tiny_resnet"),
    ],
)
def test_resolution(name, source, resolved):
    got_source, got_name, note = resolve_model_name(name)
    assert (got_source, got_name) == (source, resolved)
    assert note is None


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "efficientnet_b0"])
def test_bare_name_in_both_zoos_picks_torchvision_and_says_so(name):
    source, resolved, note = resolve_model_name(name)
    assert (source, resolved) == ("torchvision", name)
    assert "both torchvision and timm" in note and "picked torchvision" in note
    assert f"timm:{name}" in note


def test_unknown_name_lists_close_matches_from_both_zoos():
    with pytest.raises(ModelError) as info:
        resolve_model_name("resnet5O")
    assert "'resnet5O'" in str(info.value) and "resnet50" in str(info.value)
    with pytest.raises(ModelError) as info:
        resolve_model_name("vit_b16")
    assert "vit_b_16" in str(info.value)  # from torchvision
    with pytest.raises(ModelError) as info:
        resolve_model_name("convnext_nan")
    assert "convnext_nano" in str(info.value)  # from timm


def test_case_is_forgiven_in_suggestions():
    with pytest.raises(ModelError) as info:
        resolve_model_name("ResNet50")
    assert "resnet50" in str(info.value)


def test_prefixed_name_in_the_other_zoo_says_where_it_is():
    with pytest.raises(ModelError) as info:
        resolve_model_name("timm:vit_b_16")
    assert "tv:vit_b_16" in str(info.value)
    with pytest.raises(ModelError) as info:
        resolve_model_name("tv:convnext_nano")
    assert "timm:convnext_nano" in str(info.value)


@pytest.mark.parametrize("name", ["", "  ", "a:b:c", "my-pkg:fn", "pkg.mod:"])
def test_malformed_names(name):
    with pytest.raises(ModelError):
        resolve_model_name(name)


def test_bare_names_never_import_user_code(tmp_path, monkeypatch):
    # A bare name that happens to be an importable module must not be imported (it runs code).
    marker = tmp_path / "imported"
    (tmp_path / "sneaky_xyz.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError):
        create_model("sneaky_xyz", meta=True)
    assert not marker.exists() and "sneaky_xyz" not in sys.modules


# --- building ---------------------------------------------------------------------------------


def test_build_records_info():
    model, info = create_model("resnet18", meta=True, kwargs={"num_classes": 10})
    assert isinstance(info, ModelInfo)
    assert (info.source, info.name, info.kwargs) == ("torchvision", "resnet18", {"num_classes": 10})
    assert info.spec == "tv:resnet18" and info.note and not info.pretrained
    assert model.fc.out_features == 10
    d = info.to_dict()
    assert d["spec"] == "tv:resnet18" and d["kwargs"] == {"num_classes": 10}


def test_timm_prefix_builds_timms_model():
    import timm

    model, info = create_model("timm:resnet18", meta=True)
    assert isinstance(model, timm.models.ResNet) and info.source == "timm" and info.note is None
    model, _ = create_model("tv:resnet18", meta=True)
    assert type(model).__module__.startswith("torchvision")


def test_meta_build_has_no_memory():
    model, _ = create_model("vit_b_16", meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_meta_build_falls_back_for_constructors_that_need_values():
    # torchvision's RegNet computes its widths with tensors, which the meta device cannot read.
    model, _ = create_model("regnet_y_400mf", meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_real_build_and_kwargs():
    model, info = create_model(f"{USER}:tiny_resnet", kwargs={"num_classes": 3, "width": 4})
    assert info.source == "user" and info.spec == f"{USER}:tiny_resnet"
    assert model.fc.out_features == 3
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_bad_kwargs_are_a_model_error():
    with pytest.raises(ModelError) as info:
        create_model("resnet18", meta=True, kwargs={"no_such_arg": 1})
    assert "no_such_arg" in str(info.value) and "tv:resnet18" in str(info.value)


@pytest.mark.parametrize(
    "name, message",
    [
        (f"{USER}:tiny_resnett", "tiny_resnet"),  # close match offered
        ("no_such_module_xyz:factory", "cannot import module"),
        (f"{USER}:not_a_module", "not a torch.nn.Module"),
        (f"{USER}:NOT_CALLABLE", "not callable"),
    ],
)
def test_user_factory_errors(name, message):
    with pytest.raises(ModelError) as info:
        create_model(name)
    assert message in str(info.value)


def test_user_factory_next_to_the_user_is_found(tmp_path, monkeypatch):
    # A console script's sys.path lacks the current directory; the factory form adds it.
    (tmp_path / "my_models_xyz.py").write_text(
        "from torch import nn\n\ndef net(width=4):\n    return nn.Linear(width, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model, info = create_model("my_models_xyz:net", kwargs={"width": 3})
    assert isinstance(model, nn.Linear) and model.in_features == 3
    assert info.source == "user" and info.name == "my_models_xyz:net"
    sys.modules.pop("my_models_xyz", None)


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError) as info:
        create_model("tv:resnet18", pretrained=True)
    text = str(info.value)
    assert "pretrained weights could not be loaded" in text and "--weights" in text


def test_pretrained_on_meta_is_refused():
    with pytest.raises(ModelError):
        create_model("resnet18", pretrained=True, meta=True)


# --- --model-kwargs ---------------------------------------------------------------------------


def test_parse_kwargs_literals():
    got = parse_kwargs(
        [
            "drop_rate=0.2",
            "num_classes=10",
            "act=relu",
            "global_pool=",
            "flag=true",
            "off=False",
            "x=None",
            "y=null",
            "s='10'",
            "img_size=(160, 160)",
            "expr=__import__('os')",
        ]
    )
    assert got == {
        "drop_rate": 0.2,
        "num_classes": 10,
        "act": "relu",
        "global_pool": "",
        "flag": True,
        "off": False,
        "x": None,
        "y": None,
        "s": "10",
        "img_size": (160, 160),
        "expr": "__import__('os')",  # never evaluated: a plain string
    }
    assert isinstance(got["num_classes"], int) and isinstance(got["drop_rate"], float)
    assert parse_kwargs(None) == {} and parse_kwargs([]) == {}


@pytest.mark.parametrize("items", [["num_classes"], ["=3"], ["1x=3"], ["a=1", "a=2"]])
def test_parse_kwargs_errors(items):
    with pytest.raises(ModelError) as info:
        parse_kwargs(items)
    assert "--model-kwargs" in str(info.value)


# --- probe sizes and weights ------------------------------------------------------------------


def test_probe_input_size():
    tv, _ = create_model("tv:resnet18", meta=True)
    assert probe_input_size(tv) == (3, 224, 224)
    vit, _ = create_model("timm:vit_tiny_patch16_384", meta=True)
    assert probe_input_size(vit) == (3, 384, 384)  # from timm's pretrained_cfg
    vit, _ = create_model("timm:vit_tiny_patch16_224", meta=True, kwargs={"img_size": 160})
    assert probe_input_size(vit) == (3, 160, 160)  # the kwarg wins over the config
    grey, _ = create_model("timm:resnet18", meta=True, kwargs={"in_chans": 1})
    assert probe_input_size(grey) == (1, 224, 224)
    assert probe_input_size(nn.Linear(3, 3)) == (3, 224, 224)


def test_load_weights(tmp_path):
    from safetensors.torch import save_file

    src, _ = create_model(f"{USER}:tiny_resnet")
    for p in src.parameters():
        nn.init.normal_(p)
    expected = src.state_dict()
    save_file(expected, str(tmp_path / "w.safetensors"))
    dst, _ = create_model(f"{USER}:tiny_resnet")
    load_weights(dst, tmp_path / "w.safetensors")
    assert all(torch.equal(v, expected[k]) for k, v in dst.state_dict().items())
    # A trainer checkpoint with the state_dict under "model" and DDP's "module." prefix.
    checkpoint = {"model": {f"module.{k}": v for k, v in expected.items()}, "step": 3}
    torch.save(checkpoint, tmp_path / "c.pt")
    dst, _ = create_model(f"{USER}:tiny_resnet")
    load_weights(dst, tmp_path / "c.pt")
    assert all(torch.equal(v, expected[k]) for k, v in dst.state_dict().items())


def test_load_weights_errors(tmp_path):
    model, _ = create_model(f"{USER}:tiny_resnet")
    with pytest.raises(ModelError, match="missing.pt': no such file"):
        load_weights(model, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot be read"):
        load_weights(model, tmp_path / "junk.pt")
    other, _ = create_model(f"{USER}:tiny_resnet", kwargs={"depth": 1})
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError, match=r"do not fit .*missing key\(s\) \['blocks.1"):
        load_weights(model, tmp_path / "other.pt")
