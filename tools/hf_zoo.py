"""Every transformers vision model that takes ``drop_path_rate``: retrofit's coverage, measured
against HF's own drop-path placement (issue 10's acceptance sweep; ``tools/zoo.py`` does the same
for timm and torchvision).

The models are enumerated from transformers itself, not from a hand list: every config class in
``CONFIG_MAPPING`` whose constructor takes ``drop_path_rate``, plus every sub-config class of a
composite config that takes it (the vision tower of a multimodal model: X-CLIP's, Florence-2's),
once per class. A model whose main input is not an image or a video (CLAP's audio encoder) is
listed as excluded. Composites whose only drop path is in a ``backbone_config`` (MaskFormer,
UperNet, DPT-style heads) are not swept twice: their backbones are model types of their own.

For each model, on the CPU with random weights and a *tiny* config (:func:`tiny_config`: the
size fields of the default config shrunk generically, with per-family overrides in
``OVERRIDES``, each with its reason), one isolated process records:

* ``trace``: ``complete`` (nothing skipped), ``partial`` (modules fx could not read, with the
  reasons), or ``error``;
* ``sites`` / ``blocks`` / ``owners``: ``retrofit.plan(model, {"stochastic_depth": {}},
  example_input=probe)``;
* the oracle: the same tiny config with ``drop_path_rate=0.1``, HF's drop-path modules followed
  by execution to the adds they feed (``tools/oracle.py: drop_path_placement``); its owners
  are the HF blocks, compared with the owners of retrofit's sites (``found``, ``missing``,
  ``extra``);
* ``apply``: ``retrofit.apply(model, {"stochastic_depth": {}}, example_input=probe)`` —
  ``verified`` (it returned: eval output unchanged on the probe), ``live`` (every module it added,
  replaced or re-rated is called in one training forward: ``tests/checks.py``), or the refusal's
  exception and message and whether the model came back unchanged (``tests/checks.py``'s
  ``differences``);
* ``seconds``.

One JSON line per model in ``runs/hf_zoo/sweep.jsonl``; ``--docs`` writes
``docs/coverage_hf.md`` from it::

    python tools/hf_zoo.py                      # the sweep, then the docs
    python tools/hf_zoo.py --filter 'swin|beit' --no-docs
    python tools/hf_zoo.py --list               # what would be swept, and what is excluded
    python tools/hf_zoo.py --docs               # docs from the results file only
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zoo  # tools/zoo.py, beside this script: the shared results reader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/checks.py: the same checks the acceptance tests use

DEFAULT_RESULTS = ROOT / "runs" / "hf_zoo" / "sweep.jsonl"
DOCS = ROOT / "docs" / "coverage_hf.md"
SD_RECIPE = {"stochastic_depth": {}}
RATE = 0.1
BATCH = 2
COMMAND = "python tools/hf_zoo.py"
_SWEPT_AT: str | None = None  # the commit the sweep ran on (recorded in every result)


def _commit() -> str:
    """``git describe``-like: the short hash, ``+dirty`` when the work tree has changes."""
    head = os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip() or "?"
    dirty = os.popen(f"git -C {ROOT} status --porcelain --untracked-files=no 2>/dev/null").read()
    return head + ("+dirty" if dirty.strip() else "")


# Tiny sizes the generic shrink aims at.
IMAGE_SIZE = 64
WIDTH = 16  # hidden_size of isotropic models; first stage width of hierarchical ones
LAYERS = 2  # num_hidden_layers; blocks per stage at most

# Per-family overrides of the tiny config, each with the reason the generic shrink is not enough.
OVERRIDES: dict[str, tuple[dict[str, Any], str]] = {
    "bit": (
        {"hidden_sizes": [128, 128, 128, 128], "embedding_size": 32},
        "BiT's weight-standardised convs are followed by GroupNorm with 32 groups "
        "(`BitGroupNormActivation`, `num_groups=32`): every width, the bottlenecks' quarter "
        "width included, must be a multiple of 32",
    ),
    "eomt": (
        {"num_blocks": 1, "num_queries": 8},
        "EoMT feeds its queries to the last `num_blocks` layers (default 4): with 2 layers it "
        "must be at most 2; 200 queries shrunk with the rest",
    ),
    "eomt_dinov3": (
        {"num_blocks": 1, "num_queries": 8},
        "as EoMT: `num_blocks` counts layers of the (shrunk) stack",
    ),
    "seggpt": (
        {
            "image_size": [64, 32],
            "mlp_dim": 32,
            "decoder_hidden_size": 16,
            "intermediate_hidden_state_indices": [1],
            "merge_index": 0,
        },
        "SegGPT's `image_size` is the prompt and the image stacked (H = 2W); it reads the "
        "hidden states of the layers in `intermediate_hidden_state_indices` (default up to 23) "
        "and merges prompt and image after layer `merge_index`, both within the 2 layers",
    ),
    "xclip_vision_model": (
        {"mit_hidden_size": 16, "mit_intermediate_size": 32, "mit_num_attention_heads": 2},
        "X-CLIP's multi-frame integration transformer has sizes of its own (`mit_*`)",
    ),
    "cvt": (
        {"depth": [1, 2, 3]},
        "CvtStage indexes its per-layer drop-path list by the *stage* index "
        "(modeling_cvt.py `drop_path_rates[self.stage]`), so stage i needs at least i + 1 layers",
    ),
}

# Models whose forward needs more than the image: the extra inputs, as the probe's tail
# (positional, in the forward's order).
EXTRA_INPUTS: dict[str, tuple[str, ...]] = {
    # SegGPT segments an image given a prompt image and its mask (all three required)
    "seggpt": ("prompt_pixel_values", "prompt_masks"),
}
# SegGPT's config image size is the prompt stacked on the image: each input is half as high.
HALF_HEIGHT = {"seggpt"}
# Video models that take their frames flattened into the batch, (B·T, C, H, W): X-CLIP's vision
# tower (its cross-frame attention regroups them by `num_frames`).
FRAMES_IN_BATCH = {"xclip_vision_model"}

# Extra sites (retrofit finds a residual block where HF applies no drop path): (model-type
# regex, owner regex) → reason, written from reading the model's code. Unmatched extras are
# listed with an empty reason to fill.
JUSTIFICATIONS: list[tuple[str, str, str]] = [
    (
        r"^swin2sr$",
        r"^encoder\.stages\.\d+\.layers\.\d+$",
        "Swin2SR's Swin blocks: attention and MLP residuals (`shortcut + drop_path(attention)`) "
        "exactly as in Swin; HF builds Swin2SR's drop paths but never passes its "
        "`drop_path_rate` to the layers (modeling_swin2sr.py), so the oracle built with a rate "
        "sees none: the model has no oracle, not a false site",
    ),
    (
        r"^swin2sr$",
        r"^encoder\.stages\.\d+$",
        "Swin2SR's residual Swin transformer block (RSTB, SwinIR/Swin2SR): "
        "`patch_embed(conv(patch_unembed(layers(x)))) + residual` around each stage's layers, "
        "a residual-in-residual group (modeling_swin2sr.py `Swin2SRStage.forward`)",
    ),
    (
        r"^swin2sr$",
        r"^$",
        "Swin2SR's global residual: `conv_after_body(encoder(x)) + embeddings` in the model's "
        "own forward (modeling_swin2sr.py `Swin2SRModel.forward`), SwinIR's long skip over the "
        "whole deep-feature body",
    ),
    (
        r"^cvt$",
        r"\.layers\.\d+\.output$",
        "CvT's MLP residual: `CvtOutput` adds the MLP's output to its caller's hidden state "
        "(`dense(h) + input_tensor`); HF applies the layer's drop path *after* this add, to the "
        "whole layer output (modeling_cvt.py `CvtLayer.forward`), so no drop path feeds it. The "
        "add is the transformer block's MLP residual; its owner is `CvtOutput` because the add "
        "is written there",
    ),
    (
        r"^swiftformer$",
        r"\.blocks\.\d+$",
        "SwiftFormer's `SwiftFormerConvEncoder`: `input + drop_path(layer_scale * x)` over a "
        "depthwise and two pointwise convs, where HF's `drop_path` is an `nn.Dropout` "
        "(`drop_conv_encoder_rate`, element-wise), not a drop path: a residual block without "
        "stochastic depth",
    ),
    (
        r"^swiftformer$",
        r"\.local_representation$",
        "SwiftFormer's `SwiftFormerLocalRepresentation`: `input + drop_path(layer_scale * x)` "
        "with `self.drop_path = nn.Identity()` always (modeling_swiftformer.py): a residual "
        "built without drop path, as in timm's SwiftFormer",
    ),
]

# What the oracle says about a model that needs the model's code to understand (model → note).
NOTES: dict[str, str] = {
    "swin2sr": "the config takes `drop_path_rate` but `Swin2SRStage` never passes its `drop_path` "
    "list to its layers (modeling_swin2sr.py), so every slot is an `nn.Identity`: HF applies no "
    "drop path, and there is no oracle",
}


# --- enumeration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One model to sweep: its config class, the model type (or ``parent.key`` for a tower)."""

    name: str
    config_class: type
    via: str | None = None  # "xclip.vision_config" for a tower found through its parent

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config_class.__name__, "via": self.via}


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
    except ImportError:
        pass


def takes_drop_path_rate(config_class: type) -> bool:
    try:
        params = inspect.signature(config_class.__init__).parameters
    except (TypeError, ValueError):
        return False
    fields = getattr(config_class, "__dataclass_fields__", {})
    return "drop_path_rate" in params or "drop_path_rate" in fields


def enumerate_models() -> tuple[list[Entry], list[tuple[str, str]]]:
    """(entries to sweep, [(name, reason)] excluded), from transformers' config registry."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    from retrofit.models import hf_model_class

    entries: dict[type, Entry] = {}
    excluded: list[tuple[str, str]] = []
    composites: list[tuple[str, type]] = []
    for model_type in CONFIG_MAPPING_NAMES:
        try:
            cls = CONFIG_MAPPING[model_type]
        except Exception as e:  # a config module that fails to import
            excluded.append((model_type, f"config not importable: {_short(e)}"))
            continue
        if takes_drop_path_rate(cls):
            entries.setdefault(cls, Entry(model_type, cls))
        elif getattr(cls, "sub_configs", None):
            composites.append((model_type, cls))
    for model_type, cls in composites:
        towers = [
            (key, sub)
            for key, sub in cls.sub_configs.items()
            if isinstance(sub, type) and takes_drop_path_rate(sub)
        ]
        for key, sub in towers:
            if sub not in entries:
                entries[sub] = Entry(f"{model_type}.{key}", sub, via=f"{model_type}.{key}")
    out = []
    for entry in entries.values():
        try:
            model_class = hf_model_class(entry.config_class())
        except Exception as e:
            excluded.append((entry.name, f"no model class: {_short(e)}"))
            continue
        main_input = getattr(model_class, "main_input_name", "pixel_values")
        if main_input not in ("pixel_values", "pixel_values_videos"):
            excluded.append(
                (entry.name, f"not a vision model: {model_class.__name__} reads {main_input!r}")
            )
            continue
        out.append(entry)
    return sorted(out, key=lambda e: e.name), sorted(excluded)


# --- tiny configs -----------------------------------------------------------------------------


def _shrink_widths(values: list[Any], first: int) -> list[Any]:
    """Stage widths scaled so the first is ``first``, ratios kept, multiples of 8."""
    scale = first / values[0]
    return [max(8, int(round(v * scale / 8)) * 8) for v in values]


def tiny_kwargs(config: Any) -> dict[str, Any]:
    """Config fields that make the default config of any vision model tiny, found by name.

    Depth: ``num_hidden_layers`` ≤ 2; per-stage ``depths``/``depth`` ≤ 2 each, keeping the number
    of stages (other per-stage lists stay valid). Width: ``hidden_size`` 16 with 2 heads,
    ``intermediate_size`` 32; per-stage widths (``hidden_sizes``, ``embed_dim`` lists) scaled to
    start at 16 with one head per stage; Swin's scalar ``embed_dim`` 16 with one head per stage.
    Input: ``image_size`` 64 (same type as the default), ``num_frames`` 2.
    """
    d = config.to_dict()
    out: dict[str, Any] = {}

    def same_type(old: Any, new: list[Any]) -> Any:
        return tuple(new) if isinstance(old, tuple) else new

    for key in ("depths", "depth"):
        v = d.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            out[key] = same_type(v, [min(x, LAYERS) for x in v])
    if isinstance(d.get("num_hidden_layers"), int):
        out["num_hidden_layers"] = min(d["num_hidden_layers"], LAYERS)
    hierarchical = any(
        isinstance(d.get(k), (list, tuple)) for k in ("depths", "depth", "hidden_sizes")
    ) or isinstance(d.get("embed_dim"), int)
    # a hierarchical model's hidden_size is derived (Swin: the last stage's width): left alone
    if isinstance(d.get("hidden_size"), int) and not hierarchical:
        out["hidden_size"] = WIDTH
        if isinstance(d.get("num_attention_heads"), int):
            out["num_attention_heads"] = 2
        if isinstance(d.get("num_key_value_heads"), int):
            out["num_key_value_heads"] = 2
        if isinstance(d.get("intermediate_size"), int):
            out["intermediate_size"] = 2 * WIDTH
    for key in ("hidden_sizes", "embed_dim", "embed_dims"):
        v = d.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            out[key] = same_type(v, _shrink_widths(list(v), WIDTH))
    if isinstance(d.get("embed_dim"), int):
        out["embed_dim"] = WIDTH
    for key in ("num_heads", "num_attention_heads"):
        v = d.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            out[key] = same_type(v, [1] * len(v))
    if isinstance(d.get("embed_dim"), int) and isinstance(d.get("num_heads"), int):
        out["num_heads"] = 1
    v = d.get("image_size")
    if isinstance(v, int):
        out["image_size"] = IMAGE_SIZE
    elif isinstance(v, (list, tuple)) and len(v) == 2:
        out["image_size"] = same_type(v, [IMAGE_SIZE, IMAGE_SIZE])
    if isinstance(d.get("num_frames"), int):
        out["num_frames"] = 2
    patch, window, stages = d.get("patch_size"), d.get("window_size"), d.get("depths")
    if isinstance(patch, int) and isinstance(window, int) and isinstance(stages, (list, tuple)):
        # Swin's relative-position tables are sized for `window_size`; the default config makes
        # the last stage one window (224 / 4 / 8 = 7): keep that at the tiny size (Swin2SR, which
        # does not downsample, gets a smaller window than it needs; harmless)
        last = IMAGE_SIZE // patch // 2 ** (len(stages) - 1)
        if last >= 1:
            out["window_size"] = min(window, last)
    return out


def _rate_value(config: Any, rate: float) -> Any:
    """``rate`` shaped like the config's default ``drop_path_rate`` (a list per stage: CvT)."""
    default = getattr(config, "drop_path_rate", 0.0)
    if isinstance(default, (list, tuple)):
        return type(default)([rate] * len(default))
    return rate


def tiny_config(entry: Entry, rate: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """The tiny config of ``entry`` with drop path ``rate``, and the fields set."""
    cls = entry.config_class
    default = cls()
    kwargs = tiny_kwargs(default)
    override = OVERRIDES.get(entry.name)
    if override:
        kwargs.update(override[0])
    config = cls(**kwargs)
    value = _rate_value(config, rate)
    try:
        config.drop_path_rate = value
    except Exception:  # huggingface_hub's StrictDataclassFieldValidationError
        # a config that declares the rate an int (LeViT in transformers 5): the model reads it
        # as a float, the strict-dataclass check refuses one
        object.__setattr__(config, "drop_path_rate", value)
    return config, kwargs


def build(entry: Entry, rate: float = 0.0, seed: int = 0):
    import torch

    from retrofit.models import hf_model_class

    config, kwargs = tiny_config(entry, rate)
    torch.manual_seed(seed)
    model = hf_model_class(config)._from_config(config)
    return model.float(), config, kwargs


def probe_input(model: Any, config: Any, seed: int = 0) -> Any:
    """An image (or video) batch at the tiny config's size, in ``main_input_name``'s layout."""
    import torch

    size = getattr(config, "image_size", IMAGE_SIZE)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    c = getattr(config, "num_channels", 3) or 3
    g = torch.Generator().manual_seed(seed)
    if config.model_type in HALF_HEIGHT:
        h //= 2
    if config.model_type in FRAMES_IN_BATCH:
        return torch.randn(BATCH * config.num_frames, c, h, w, generator=g)
    if getattr(model, "main_input_name", "") == "pixel_values_videos" or hasattr(
        config, "num_frames"
    ):
        return torch.randn(BATCH, getattr(config, "num_frames", 2), c, h, w, generator=g)
    x = torch.randn(BATCH, c, h, w, generator=g)
    extra = EXTRA_INPUTS.get(config.model_type, ())
    if extra:
        return (x, *(torch.randn(BATCH, c, h, w, generator=g) for _ in extra))
    return x


# --- one model --------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:300]}"


def analyse(entry: Entry) -> dict[str, Any]:
    """Everything the sweep records for one model (never raises)."""
    _quiet()
    import torch
    from oracle import drop_path_placement

    import retrofit
    from tests.checks import (
        dead_modules,
        differences,
        retrofit_errors,
        snapshot,
        touched_modules,
    )

    torch.set_num_threads(1)
    rec: dict[str, Any] = {"model": entry.name, **entry.to_dict(), "status": "error"}
    rec["commit"] = _SWEPT_AT
    t0 = time.perf_counter()
    step = "build"
    try:
        model, config, kwargs = build(entry)
        rec["class"] = type(model).__name__
        rec["family"] = type(model).__module__.rsplit(".", 1)[-1].removeprefix("modeling_")
        rec["tiny"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        rec["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 4)
        x = probe_input(model, config)
        rec["input"] = [list(t.shape) for t in x] if isinstance(x, tuple) else list(x.shape)
        step = "forward"
        model.eval()
        with torch.no_grad():
            model(*x) if isinstance(x, tuple) else model(x)
        model.train()

        step = "plan"
        try:
            the_plan = retrofit.plan(model, SD_RECIPE, example_input=x)
            sd = the_plan.by_kind("stochastic_depth")
            rec["skipped"] = [s.to_dict() for s in the_plan.skipped]
            rec["trace"] = "partial" if the_plan.skipped else "complete"
            rec["sites"] = len(sd)
            rec["blocks"] = len({e.block for e in sd})
            rec["owners"] = sorted({e.module for e in sd})
        except Exception as e:
            rec["trace"] = "error"
            rec["plan_error"] = _short(e)
            rec["sites"] = rec["blocks"] = 0
            rec["owners"] = []

        step = "oracle"
        try:
            with_rate, rate_config, _ = build(entry, rate=RATE)
            placement = drop_path_placement(with_rate, probe_input(with_rate, rate_config))
            library = placement.owners
            rec["oracle"] = placement.to_dict()
            ours = set(rec["owners"])
            rec["hf_blocks"] = len(library)
            rec["found"] = len(library & ours)
            rec["missing"] = sorted(library - ours)
            rec["extra"] = sorted(ours - library)
        except Exception as e:
            rec["oracle_error"] = _short(e)

        step = "apply"
        x_fresh = probe_input(model, config, seed=1)
        snap = snapshot(model, x_fresh)
        t1 = time.perf_counter()
        try:
            retrofit.apply(model, SD_RECIPE, example_input=x)
        except retrofit_errors() as e:
            rec["apply"] = "refused"
            rec["apply_error"] = _short(e)
        except Exception as e:
            rec["apply"] = "raised"  # a raw exception: not a retrofit refusal
            rec["apply_error"] = _short(e)
        else:
            rec["apply"] = "verified"
            applied = retrofit.applied_plan(model)
            rec["gates"] = len(applied.by_kind("stochastic_depth")) if applied else 0
            touched = touched_modules(model, snap)
            rec["touched"] = len(touched)
            rec["dead"] = dead_modules(model, x, touched)
            rec["live"] = bool(touched) and not rec["dead"]
        rec["apply_seconds"] = round(time.perf_counter() - t1, 2)
        if rec["apply"] != "verified":
            diffs = differences(model, snap, x_fresh)
            rec["unchanged"] = not diffs
            rec["changes"] = diffs[:5]
        rec["status"] = "ok"
    except Exception as e:  # recorded, not raised: a sweep reports every model
        rec["error"] = f"{step}: {_short(e)}"
        rec["trace_tail"] = traceback.format_exc(limit=-3)[-1200:]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# --- isolation --------------------------------------------------------------------------------


def _child(entry: Entry, conn) -> None:
    try:
        conn.send(analyse(entry))
    except BaseException as e:  # pragma: no cover - analyse never raises; a pickling error might
        conn.send({"model": entry.name, "status": "error", "error": f"worker: {_short(e)}"})
    finally:
        conn.close()


def run_isolated(entry: Entry, timeout: float) -> dict[str, Any]:
    """``analyse(entry)`` in a forked process: a crash, a hang or an exception in one model
    never stops the sweep."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(entry, child), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    rec = None
    if parent.poll(timeout):
        try:
            rec = parent.recv()
        except EOFError:
            rec = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if rec is None:
        why = (
            f"timed out after {timeout:.0f} s"
            if proc.exitcode is None or proc.exitcode < 0
            else (f"worker died (exit code {proc.exitcode})")
        )
        rec = {"model": entry.name, **entry.to_dict(), "status": "error", "error": why}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# --- docs -------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    return sorted(zoo.read_results(path, key="model"), key=lambda r: r["model"])


def justify(model: str, owner: str) -> str:
    for model_re, owner_re, reason in JUSTIFICATIONS:
        if re.search(model_re, model) and re.search(owner_re, owner):
            return reason
    return ""


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "—"


def _apply_cell(r: dict[str, Any]) -> str:
    a = r.get("apply")
    if a == "verified":
        if r.get("live"):
            return "verified, live"
        if not r.get("touched"):
            return "verified, **nothing changed**"
        return f"verified, **{len(r.get('dead', []))}/{r.get('touched')} dead**"
    if a in ("refused", "raised"):
        state = "unchanged" if r.get("unchanged") else "**model changed**"
        return f"{a} ({state}): `{r.get('apply_error', '')[:90]}`"
    return "—"


def totals(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in recs if r.get("status") == "ok"]
    with_oracle = [r for r in ok if r.get("hf_blocks")]
    return {
        "models": len(recs),
        "built": len(ok),
        "errors": len(recs) - len(ok),
        "trace": dict(Counter(r.get("trace") for r in ok)),
        "with_sites": sum(r.get("sites", 0) > 0 for r in ok),
        "zero_sites": sum(r.get("sites", 0) == 0 for r in ok),
        "zero_sites_with_hf_blocks": sum(
            r.get("sites", 0) == 0 and r.get("hf_blocks", 0) > 0 for r in ok
        ),
        "sites": sum(r.get("sites", 0) for r in ok),
        "oracle_models": len(with_oracle),
        "hf_blocks": sum(r["hf_blocks"] for r in with_oracle),
        "found": sum(r["found"] for r in with_oracle),
        "fully_found": sum(not r["missing"] for r in with_oracle),
        "models_with_extra": sum(bool(r.get("extra")) for r in with_oracle),
        "extra_sites": sum(len(r.get("extra") or []) for r in with_oracle),
        "apply": dict(Counter(_apply_kind(r) for r in ok)),
        "seconds": round(sum(r.get("seconds", 0) or 0 for r in recs), 1),
    }


def _apply_kind(r: dict[str, Any]) -> str:
    a = r.get("apply")
    if a == "verified":
        if not r.get("touched"):
            return "verified, nothing changed"
        return "verified and live" if r.get("live") else "verified, dead modules"
    if a in ("refused", "raised"):
        return f"{a}, model {'unchanged' if r.get('unchanged') else 'changed'}"
    return "not run"


def write_docs(results: Path, docs: Path = DOCS, excluded: list[tuple[str, str]] | None = None):
    import transformers

    import retrofit

    recs = read_results(results)
    t = totals(recs)
    commit = ", ".join(sorted({str(r.get("commit")) for r in recs})) or "?"
    lines = [
        "# Coverage: HuggingFace transformers vision models",
        "",
        f"Generated by `{COMMAND} --docs` from `{results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}`"
        f" (the sweep: `{COMMAND}`); do not edit by hand. transformers {transformers.__version__}, "
        f"retrofit {retrofit.__version__}, swept at commit `{commit}`.",
        "",
        "Every transformers model whose config takes `drop_path_rate` (and every vision tower of a "
        "multimodal model whose config does), enumerated from transformers' config registry; "
        "each built on the CPU with random weights from a tiny config (`tools/hf_zoo.py` "
        "`tiny_config`). **Oracle**: the same tiny config with `drop_path_rate=0.1`; HF's own "
        "drop-path modules are followed by execution to the adds they feed "
        "(`tools/oracle.py: drop_path_placement`), whose owners are the HF blocks. "
        "**Apply**: `retrofit.apply(model, {'stochastic_depth': {}}, example_input=probe)`; "
        "*live* = every module it added, replaced or re-rated is called in one training forward "
        "(`tests/checks.py`).",
        "",
        "## Totals",
        "",
        "| | count |",
        "|---|---:|",
        f"| models swept | {t['models']} ({t['errors']} could not be built or run) |",
        f"| trace complete / partial / error | {t['trace'].get('complete', 0)} / "
        f"{t['trace'].get('partial', 0)} / {t['trace'].get('error', 0)} |",
        f"| with residual sites | {t['with_sites']} |",
        f"| **zero sites** | **{t['zero_sites']}** ({t['zero_sites_with_hf_blocks']} of them have "
        "HF drop-path blocks) |",
        f"| residual sites in all | {t['sites']} |",
        f"| models with an oracle (HF applies drop path on an add) | {t['oracle_models']} |",
        f"| **HF blocks found** | **{t['found']} / {t['hf_blocks']} = "
        f"{_pct(t['found'], t['hf_blocks'])}** |",
        f"| models with every HF block found | {t['fully_found']} / {t['oracle_models']} |",
        f"| models with extra sites / extra owners | {t['models_with_extra']} / "
        f"{t['extra_sites']} |",
    ]
    for kind, n in sorted(t["apply"].items()):
        lines.append(f"| apply: {kind} | {n} |")
    lines += [f"| sweep time (sum of per-model seconds) | {t['seconds'] / 60:.1f} min |", ""]
    if excluded:
        lines += ["## Excluded", ""]
        lines += [f"- `{name}` — {why}" for name, why in excluded]
        lines.append("")
    lines += [
        "## Per model",
        "",
        "| model | class | trace | sites | HF blocks found | extra | apply | s |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in recs:
        if r.get("status") != "ok":
            lines.append(f"| `{r['model']}` | | error: {r.get('error', '')[:120]} | | | | | "
                         f"{r.get('seconds', '')} |")  # fmt: skip
            continue
        hf = (
            f"{r['found']} / {r['hf_blocks']}"
            if "hf_blocks" in r
            else (f"oracle error: {r.get('oracle_error', '')[:60]}")
        )
        trace = r.get("trace", "")
        if trace == "partial":
            trace += f" ({len(r['skipped'])} skipped)"
        lines.append(
            f"| `{r['model']}` | {r.get('class', '')} | {trace} | {r.get('sites', 0)} | {hf} | "
            f"{len(r.get('extra') or [])} | {_apply_cell(r)} | {r.get('seconds', '')} |"
        )
    lines += ["", "## Skipped modules (partial traces)", ""]
    part = [r for r in recs if r.get("skipped")]
    for r in part:
        first = r["skipped"][0]
        more = f" (+{len(r['skipped']) - 1} more)" if len(r["skipped"]) > 1 else ""
        lines.append(f"- `{r['model']}`: `{first['module']}`: {first['reason'][:200]}{more}")
    if not part:
        lines.append("None.")
    lines += ["", "## HF blocks not found", ""]
    miss = [r for r in recs if r.get("missing")]
    for r in miss:
        shown = ", ".join(f"`{m}`" for m in r["missing"][:6])
        more = " …" if len(r["missing"]) > 6 else ""
        lines.append(f"- `{r['model']}`: {len(r['missing'])} of {r['hf_blocks']}: {shown}{more}")
    if not miss:
        lines.append("None.")
    lines += [
        "",
        "## Extra sites",
        "",
        "Owners of retrofit sites where HF applies no drop path. The reason column is "
        "`tools/hf_zoo.py`'s `JUSTIFICATIONS`, written from the models' code; an empty one is "
        "still to be explained.",
        "",
        "| model | owner | reason |",
        "|---|---|---|",
    ]
    extras = [(r["model"], o) for r in recs for o in r.get("extra") or []]
    lines += [f"| `{m}` | `{o}` | {justify(m, o)} |" for m, o in extras] or ["| — | — | — |"]
    lines += ["", "## Oracle notes", ""]
    notes = []
    for r in recs:
        o = r.get("oracle") or {}
        if o.get("not_called"):
            notes.append(f"- `{r['model']}`: built but never called: {len(o['not_called'])}")
        if o.get("not_on_add"):
            shown = ", ".join(f"`{n}`" for n in o["not_on_add"][:3])
            notes.append(
                f"- `{r['model']}`: drop path on no add: {len(o['not_on_add'])} ({shown} …)"
            )
        if o.get("inline"):
            notes.append(f"- `{r['model']}`: inline drop path (no module) in {len(o['inline'])}")
        if r.get("status") == "ok" and not r.get("hf_blocks") and "oracle_error" not in r:
            why = NOTES.get(r["model"], "")
            notes.append(
                f"- `{r['model']}`: no HF drop path on an add at all" + (f" — {why}" if why else "")
            )
    lines += notes or ["None."]
    lines += ["", "## Command", "", "```bash", COMMAND, "```", ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines))
    print(f"wrote {docs} ({len(recs)} models)", file=sys.stderr)


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--filter", default=None, help="regex on the model name (model type)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--docs", action="store_true", help="only write docs from the results")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs after the sweep")
    ap.add_argument("--list", action="store_true", help="list the models and the exclusions")
    args = ap.parse_args(argv)
    _quiet()
    importlib.import_module("transformers")
    entries, excluded = enumerate_models()
    if args.list:
        print(
            json.dumps({"models": [e.to_dict() for e in entries], "excluded": excluded}, indent=1)
        )
        return 0
    if args.docs:
        write_docs(args.results, excluded=excluded)
        return 0
    todo = [e for e in entries if not args.filter or re.search(args.filter, e.name)]
    if args.limit is not None:
        todo = todo[: args.limit]
    from tqdm import tqdm

    global _SWEPT_AT
    _SWEPT_AT = _commit()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    # results of models not in this run are kept (a filtered run updates its rows only)
    kept = [r for r in read_results(args.results) if r["model"] not in {e.name for e in todo}]
    tmp = args.results.with_suffix(".partial")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed: clean up as on Ctrl-C
    try:
        with tmp.open("w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
            bar = tqdm(todo, desc="hf_zoo", unit="model", dynamic_ncols=True)
            for entry in bar:
                bar.set_postfix_str(entry.name, refresh=True)
                rec = run_isolated(entry, args.timeout)
                f.write(json.dumps(rec) + "\n")
                f.flush()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(args.results)  # nothing half-written: the old file stays until the run ends
    t = totals(read_results(args.results))
    print(json.dumps(t, indent=1))
    if not args.no_docs:
        write_docs(args.results, excluded=excluded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
