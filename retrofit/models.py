"""Resolve a model name from torchvision, timm or a user factory, and build the model.

Names, in the order they are tried:

- ``tv:NAME`` / ``torchvision:NAME``: any model in torchvision's registry (classification,
  detection, segmentation, video, …).
- ``timm:NAME``: any timm model, with or without a pretrained tag (``timm:resnet50.a1_in1k``);
  ``hf-hub:ORG/NAME`` and ``local-dir:PATH`` are passed to timm as is.
- ``package.module:factory``: a user's factory, imported only when named in this form (importing
  runs the user's code, so it never happens for a bare name). The current directory is put on
  ``sys.path`` so that a module next to the user's script is found, as ``python -m`` would.
- a bare ``NAME``: torchvision's classification models first, then timm, then torchvision's other
  model families. torchvision wins for names in both zoos (``resnet50``, ``convnext_tiny``,
  ``efficientnet_b0``, …) because the names users type from torchvision's docs (``vit_b_16``,
  ``swin_t``) are torchvision-only, so "torchvision first" is the rule that never surprises them;
  :class:`ModelInfo` ``.note`` says which zoo was picked and how to get the other one.

An unknown name raises :class:`~retrofit.errors.ModelError` listing close matches from both zoos.
Nothing is downloaded unless ``pretrained=True``; then a download failure (offline) is a
``ModelError`` that says so.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from retrofit.errors import ModelError

__all__ = [
    "ModelInfo",
    "create_model",
    "list_model_names",
    "load_weights",
    "parse_kwargs",
    "probe_input_size",
    "resolve_model_name",
]

_TV_PREFIXES = ("tv", "torchvision")
_TIMM_PREFIXES = ("timm",)
# timm's own name schemes that carry a colon and must not be mistaken for user factories.
_TIMM_SCHEMES = ("hf-hub", "hf_hub", "local-dir")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from, so a run can be reproduced and its zoo choice explained.

    Attributes:
        source: ``"torchvision"``, ``"timm"`` or ``"user"``.
        name: the name inside its source (``resnet50``, ``resnet50.a1_in1k``, ``pkg.mod:fn``).
        kwargs: the keyword arguments the builder was called with (``--model-kwargs``).
        note: how a bare name was resolved, when it was ambiguous; otherwise None.
        pretrained: whether pretrained weights were requested.
    """

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    pretrained: bool = False

    @property
    def spec(self) -> str:
        """The unambiguous name that builds this model again (``tv:resnet50``, ``pkg.mod:fn``)."""
        if self.source == "torchvision":
            return f"tv:{self.name}"
        if self.source == "timm":
            return f"timm:{self.name}"
        return self.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with ``spec`` for rebuilding."""
        return {
            "source": self.source,
            "name": self.name,
            "spec": self.spec,
            "kwargs": dict(self.kwargs),
            "note": self.note,
            "pretrained": self.pretrained,
        }


# --- registries -------------------------------------------------------------------------------


@functools.cache
def _tv_classification() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def _tv_all() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models())


@functools.cache
def _timm_all() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def _is_timm(name: str) -> bool:
    import timm

    # is_model also accepts pretrained tags (resnet50.a1_in1k).
    return bool(timm.is_model(name))


def _close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    # Zoo names are lower-case: match on the lower-cased query so ResNet50 finds resnet50.
    return difflib.get_close_matches(name.lower(), sorted(candidates), n=n, cutoff=0.6)


def _unknown(
    name: str, candidates: Iterable[str], where: str, other: str | None = None
) -> ModelError:
    close = _close_matches(name, candidates)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    if other:
        hint = f"; it is in {other} (use {'tv' if other == 'torchvision' else 'timm'}:{name})"
    return ModelError(f"unknown model {name!r} ({where}){hint}")


def resolve_model_name(name: str) -> tuple[str, str, str | None]:
    """Resolve a model name to ``(source, name_in_source, note)`` without building anything.

    See the module docstring for the name forms and the precedence of bare names.
    Raises :class:`ModelError` for an unknown name, with close matches.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, but got {name!r}")
    name = name.strip()
    prefix, sep, rest = name.partition(":")
    lowered = prefix.lower()
    if sep and lowered in _TV_PREFIXES:
        if rest in _tv_all():
            return "torchvision", rest, None
        other = "timm" if rest and _is_timm(rest) else None
        raise _unknown(rest, _tv_all(), "not in torchvision's model registry", other)
    if sep and lowered in _TIMM_PREFIXES:
        if rest.split(":", 1)[0] in _TIMM_SCHEMES or _is_timm(rest):
            return "timm", rest, None
        other = "torchvision" if rest in _tv_all() else None
        raise _unknown(rest, _timm_all(), "not in timm's model registry", other)
    if sep and lowered in _TIMM_SCHEMES:
        return "timm", name, None
    if sep:
        if not _FACTORY_RE.match(name):
            raise ModelError(
                f"model {name!r}: a name with ':' must be tv:NAME, timm:NAME or a user factory "
                "package.module:function"
            )
        return "user", name, None
    in_tv = name in _tv_classification()
    in_timm = _is_timm(name)
    if in_tv and in_timm:
        note = (
            f"{name!r} is in both torchvision and timm; picked torchvision "
            f"(use timm:{name} for timm's)"
        )
        return "torchvision", name, note
    if in_tv:
        return "torchvision", name, None
    if in_timm:
        return "timm", name, None
    if name in _tv_all():
        return "torchvision", name, None
    raise _unknown(name, _tv_all() | _timm_all(), "not in torchvision or timm")


def list_model_names(pattern: str | None = None) -> dict[str, list[str]]:
    """The names each zoo knows, sorted, optionally filtered: ``{"torchvision": [...], "timm":
    [...], "transformers": [...]}`` (the last only when transformers is installed: its
    image-classification model types, which are configs, not names ``--model`` builds).

    ``pattern`` is a case-insensitive shell pattern (``resnet*``); one without ``*?[`` matches
    as a substring.
    """
    import fnmatch
    import importlib.util

    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"

    def keep(names: Iterable[str]) -> list[str]:
        if not pattern:
            return sorted(names)
        return sorted(n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower()))

    zoos = {"torchvision": keep(_tv_all()), "timm": keep(_timm_all())}
    if importlib.util.find_spec("transformers") is not None:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )

        zoos["transformers"] = keep(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    return zoos


# --- building ---------------------------------------------------------------------------------


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # A console script's sys.path lacks the current directory; `python -m` has it.
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelError(
            f"model {spec!r}: cannot import module {module_name!r} ({e}); "
            "is it installed or in the current directory?"
        ) from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, public, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ModelError(f"model {spec!r}: module {module_name!r} has no {attr!r}{hint}") from None
    if not callable(factory):
        raise ModelError(f"model {spec!r}: {attr!r} is not callable")
    return factory


def _build(source: str, name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(
            name, weights="DEFAULT" if pretrained else None, **kwargs
        )
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=pretrained, **kwargs)
    factory = _import_factory(name)
    # Only pass `pretrained` when asked, so factories that do not know the argument still work.
    model = factory(pretrained=True, **kwargs) if pretrained else factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    kwargs: Mapping[str, Any] | None = None,
    meta: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """Build a model by name (see the module docstring for the name forms).

    Args:
        name: ``tv:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or a
            bare ``NAME``.
        pretrained: download (or take from the cache) the zoo's default pretrained weights.
        kwargs: keyword arguments for the builder (``num_classes``, ``drop_rate``, …).
        meta: build on the meta device: the structure without memory or initialisation, for
            planning and analysis. Models whose constructor needs real values (torchvision's
            RegNets compute widths with tensors) are built on the CPU and moved to meta.

    Returns:
        ``(model, info)``.

    Raises:
        ModelError: unknown name (with close matches), bad kwargs, a factory that cannot be
            imported, or pretrained weights that cannot be downloaded.
    """
    if pretrained and meta:
        raise ModelError("pretrained weights cannot be loaded into a meta-device model")
    kwargs = dict(kwargs or {})
    source, resolved, note = resolve_model_name(name)
    info = ModelInfo(source, resolved, kwargs, note, pretrained)
    shown = info.spec
    try:
        if not meta:
            model = _build(source, resolved, pretrained, kwargs)
        else:
            try:
                with torch.device("meta"):
                    model = _build(source, resolved, False, kwargs)
            except (NotImplementedError, RuntimeError) as e:
                if "meta" not in str(e).lower():
                    raise
                model = _build(source, resolved, False, kwargs).to("meta")
    except ModelError:
        raise
    except (TypeError, ValueError) as e:
        if pretrained and "expected value" in str(e):
            # torchvision refuses e.g. num_classes != 1000 together with its pretrained weights.
            raise ModelError(f"model {shown!r} with pretrained weights: {e}") from None
        what = f" with kwargs {kwargs}" if kwargs else ""
        raise ModelError(f"model {shown!r} cannot be built{what}: {e}") from None
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        # URLError, requests' ConnectionError and huggingface_hub's offline errors are OSErrors;
        # timm raises RuntimeError for a model that has no pretrained weights.
        raise ModelError(
            f"model {shown!r}: pretrained weights could not be loaded ({type(e).__name__}: "
            f"{_first_line(e)}); without network access, fill the cache on a connected machine "
            "or pass a local checkpoint with --weights FILE"
        ) from None
    return model, info


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- --model-kwargs ---------------------------------------------------------------------------

_LITERALS = {"true": True, "false": False, "none": None, "null": None}


def _parse_value(text: str) -> Any:
    if text.lower() in _LITERALS:
        return _LITERALS[text.lower()]
    try:
        # Numbers, quoted strings, tuples and lists (img_size=(224,224)); never code.
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_kwargs(items: Iterable[str] | None) -> dict[str, Any]:
    """Parse ``--model-kwargs`` items ``k=v`` into a dict with Python literals as values.

    ``"num_classes=10"`` → 10, ``"drop_rate=0.2"`` → 0.2, ``"pretrained=false"`` → False,
    ``"x=None"`` → None, ``"img_size=(160,160)"`` → (160, 160); anything else is a string
    (``"act_layer=gelu"`` → ``"gelu"``). Raises :class:`ModelError` for an item without ``=``,
    a key that is not an identifier, or a key given twice.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelError(
                f"--model-kwargs: {item!r} is not KEY=VALUE with KEY a Python identifier "
                "(e.g. num_classes=10)"
            )
        if key in out:
            raise ModelError(f"--model-kwargs: {key!r} is given twice")
        out[key] = _parse_value(value.strip())
    return out


# --- probe sizes ----------------------------------------------------------------------------


def probe_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input a model expects, for probe inputs in verification and analysis.

    Spatial size: a ViT-style ``patch_embed.img_size`` (timm; it reflects an ``img_size`` kwarg
    that the pretrained config does not), torchvision's ``image_size`` attribute, then timm's
    ``pretrained_cfg`` / ``default_cfg`` ``input_size``, else 224. Channels: the first Conv2d's
    ``in_channels`` when there is no config or it reads fewer channels than the config says (so
    ``in_chans=1`` models get one channel), else the config's, else 3.
    """
    c, h, w = 3, 224, 224
    cfg_size = None
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            cfg_size = tuple(int(v) for v in cfg["input_size"])
            break
    if cfg_size is not None and len(cfg_size) == 3:
        c, h, w = cfg_size
    fixed = _fixed_image_size(model)
    if fixed is not None:
        h, w = fixed
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # timm's config keeps 3 channels when a model is built with in_chans=1, so the first
            # conv decides when it reads fewer; a first conv reading more is behind a
            # space-to-depth stem (TResNet: 48 = 3·4²), where the config is right.
            if cfg_size is None or m.in_channels < c:
                c = m.in_channels
            break
    return (c, h, w)


def _fixed_image_size(model: nn.Module) -> tuple[int, int] | None:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None) if patch_embed is not None else None
    if size is None:
        size = getattr(model, "image_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (int(size[0]), int(size[1]))
    return None


# One implementation of checkpoint loading, shared with the trainer.
from retrofit.train.checkpoint import load_weights  # noqa: E402
