"""Resolve a model name from torchvision, timm or a user factory, and build the model.

Names, in the order they are tried:

- ``tv:NAME`` / ``torchvision:NAME``: any model in torchvision's registry (classification,
  detection, segmentation, video, …).
- ``timm:NAME``: any timm model, with or without a pretrained tag (``timm:resnet50.a1_in1k``);
  ``hf-hub:ORG/NAME`` and ``local-dir:PATH`` are passed to timm as is.
- ``hf:NAME``: a HuggingFace ``transformers`` model (the optional extra ``retrofit[hf]``). NAME
  is a local directory holding a ``config.json`` (random initialisation through the Auto
  classes' ``from_config``; works offline) or a hub id (its ``config.json`` is downloaded where
  the network allows; offline, a :class:`~retrofit.errors.ModelError` says so). The model is the
  config's image-classification class when transformers has one for that architecture
  (``SwinForImageClassification``), else its base model (``SegformerModel``). ``--model-kwargs``
  set config fields (``drop_path_rate=0.1``, ``num_labels=10``; ``num_classes`` is read as
  ``num_labels``); a field the config does not have is an error.
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
import math
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
    "check_kwargs",
    "create_model",
    "hf_model_class",
    "list_model_names",
    "parse_kwargs",
    "resolve_model_name",
]

_TV_PREFIXES = ("tv", "torchvision")
_TIMM_PREFIXES = ("timm",)
_HF_PREFIXES = ("hf",)
# timm's own name schemes that carry a colon and must not be mistaken for user factories.
_TIMM_SCHEMES = ("hf-hub", "hf_hub", "local-dir")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class ModelInfo:
    """Where a model came from, so a run can be reproduced and its zoo choice explained.

    Attributes:
        source: ``"torchvision"``, ``"timm"``, ``"transformers"`` or ``"user"``.
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
        if self.source == "transformers":
            return f"hf:{self.name}"
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
    if sep and lowered in _HF_PREFIXES:
        if not rest.strip():
            raise ModelError(
                f"model {name!r}: hf: needs a local directory holding a config.json or a hub id "
                "(hf:./my_config_dir, hf:microsoft/swin-tiny-patch4-window7-224)"
            )
        return "transformers", rest.strip(), None
    if sep:
        if not _FACTORY_RE.match(name):
            raise ModelError(
                f"model {name!r}: a name with ':' must be tv:NAME, timm:NAME, hf:NAME or a user "
                "factory package.module:function"
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
    except Exception as e:
        # The user's module failed while it was imported (a SyntaxError, an exception at import
        # time): their code, so bad input, not a crash of ours.
        raise ModelError(
            f"model {spec!r}: importing module {module_name!r} failed: {_describe(e)}"
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
        import inspect

        import torchvision

        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            # Detection and segmentation builders default to downloading ImageNet backbone
            # weights even with weights=None: no network unless pretrained weights were asked
            # for (with them, torchvision takes the whole model's weights, backbone included).
            kwargs = {"weights_backbone": None, **kwargs}
        return builder(weights="DEFAULT" if pretrained else None, **kwargs)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=pretrained, **kwargs)
    if source == "transformers":
        return _build_hf(name, pretrained, kwargs)
    factory = _import_factory(name)
    # Only pass `pretrained` when asked, so factories that do not know the argument still work.
    model = factory(pretrained=True, **kwargs) if pretrained else factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _is_local(name: str) -> bool:
    """A path rather than a hub id (``org/name``): it exists, or it is written as a path."""
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~", "."))


def _hf_config(name: str, kwargs: dict[str, Any]) -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError(
            f"model 'hf:{name}' needs the transformers package: pip install 'retrofit[hf]'"
        ) from None
    if _is_local(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise ModelError(
                f"model 'hf:{name}': no such directory (hf:PATH must be a directory holding a "
                "config.json, or a hub id such as hf:microsoft/swin-tiny-patch4-window7-224)"
            )
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"model 'hf:{name}': the directory holds no config.json")
        name = path
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        if _is_local(name):
            raise ModelError(
                f"model 'hf:{name}': config.json cannot be read: {_first_line(e)}"
            ) from None
        # OSError covers both "not on the hub" and "no network"; transformers' message says which.
        raise ModelError(
            f"model 'hf:{name}': the hub id's config could not be fetched ({_first_line(e)}); "
            "a local directory holding a config.json works offline (--model hf:PATH)"
        ) from None
    for key, value in kwargs.items():
        # ``num_classes`` is what timm/torchvision users (and the trainer) call num_labels.
        field_name = "num_labels" if key == "num_classes" else key
        if field_name != "num_labels" and not hasattr(config, field_name):
            known = sorted(k for k in config.to_dict() if not k.startswith("_"))
            close = difflib.get_close_matches(field_name, known, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ModelError(
                f"model 'hf:{name}': {type(config).__name__} has no field {key!r}{hint}"
            )
        try:
            setattr(config, field_name, value)  # transformers 5 configs validate field types
        except (TypeError, ValueError) as e:
            raise ModelError(
                f"model 'hf:{name}': {type(config).__name__}.{field_name} = {value!r} is refused: "
                f"{_first_line(e.__cause__ or e)}"
            ) from None
    return config


# Where a model type's class is looked up, in order: a classifier first (what retrofit's users
# fine-tune), then the base model, then the task heads of models that have no base entry
# (EoMT: universal segmentation; RF-DETR's DINOv2: a backbone).
_HF_MAPPINGS = (
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
    "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES",
)


def hf_model_class(config: Any) -> type[nn.Module]:
    """The transformers class built for ``config``: its image-classification class when the
    architecture has one, else its base model, else a task model (see ``_HF_MAPPINGS``), else —
    for a multimodal model's tower config that no mapping names (X-CLIP's vision config) — the
    model class of the config's own module whose ``config_class`` it is. Where transformers maps
    a model type to several classes (LeViT: with and without a distillation teacher), the one
    named in the config's ``architectures``, else the first: the Auto classes themselves fail on
    such a config when it names none."""
    import importlib

    import transformers
    from transformers.models.auto import modeling_auto

    for mapping_name in _HF_MAPPINGS:
        names = getattr(modeling_auto, mapping_name, {}).get(config.model_type)
        if names is None:
            continue
        names = (names,) if isinstance(names, str) else tuple(names)
        wanted = [n for n in names if n in (getattr(config, "architectures", None) or ())]
        return getattr(transformers, (wanted or names)[0])
    package = type(config).__module__.rsplit(".", 1)[0]
    try:
        module = importlib.import_module(f"{package}.modeling_{package.rsplit('.', 1)[-1]}")
    except ImportError:
        module = None
    candidates = (
        [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, nn.Module)
            and getattr(obj, "config_class", None) is type(config)
            and obj.__name__.endswith(("Model", "Backbone"))
            and not obj.__name__.endswith("PreTrainedModel")
        ]
        if module is not None
        else []
    )
    if candidates:
        # the tower itself (XCLIPVisionModel) before wrappers that happen to share its config
        candidates.sort(
            key=lambda c: (
                not c.__name__.endswith("VisionModel"),
                not c.__name__.endswith("Model"),
                len(c.__name__),
            )
        )
        return candidates[0]
    raise ModelError(
        f"transformers has no model class for config type {config.model_type!r} "
        f"({type(config).__name__})"
    )


def _build_hf(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """A transformers model from a config (:func:`hf_model_class`); random initialisation unless
    ``pretrained``."""
    config = _hf_config(name, kwargs)
    cls = hf_model_class(config)
    if not pretrained:
        return cls._from_config(config)  # what AutoModel.from_config calls once it has the class
    where = os.path.expanduser(name) if _is_local(name) else name
    try:
        return cls.from_pretrained(where, config=config)
    except OSError as e:
        raise ModelError(
            f"model 'hf:{name}': pretrained weights could not be loaded ({_first_line(e)}); "
            "without network access, drop --pretrained (random initialisation from the config) "
            "or pass a directory holding the weights"
        ) from None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    kwargs: Mapping[str, Any] | None = None,
    meta: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """Build a model by name (see the module docstring for the name forms).

    Args:
        name: ``tv:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``hf:NAME`` (a config directory or
            a hub id), ``package.module:factory`` or a bare ``NAME``.
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
    check_kwargs(kwargs)
    source, resolved, note = resolve_model_name(name)
    info = ModelInfo(source, resolved, kwargs, note, pretrained)
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
    except Exception as e:
        error = _build_error(e, info)
        if error is None:
            raise
        raise error from None
    return model, info


def _build_error(e: Exception, info: ModelInfo) -> ModelError | None:
    """The ModelError a failed build means for the user, or None for a failure of ours.

    A builder fails because of what the user asked for: kwargs it rejects (a TypeError for an
    unknown one, a ValueError or RuntimeError for a value such as a negative size), pretrained
    weights that cannot be fetched, or their own factory's code. A zoo builder failing with no
    kwargs and no download involved is not the user's doing, so it stays an internal error.
    """
    shown, kwargs = info.spec, info.kwargs
    what = f" with kwargs {kwargs}" if kwargs else ""
    if info.pretrained and "expected value" in str(e):
        # torchvision refuses e.g. num_classes != 1000 together with its pretrained weights.
        return ModelError(f"model {shown!r} with pretrained weights: {_first_line(e)}")
    if info.source == "user":
        return ModelError(f"model {shown!r}: the factory{what} raised {_describe(e)}")
    if isinstance(e, (TypeError, ValueError)):
        return ModelError(f"model {shown!r} cannot be built{what}: {_first_line(e)}")
    if info.pretrained and isinstance(e, (OSError, RuntimeError)):
        # URLError, requests' ConnectionError and huggingface_hub's offline errors are OSErrors;
        # timm raises RuntimeError for a model that has no pretrained weights.
        return ModelError(
            f"model {shown!r}: pretrained weights could not be loaded ({_describe(e)}); "
            "without network access, fill the cache on a connected machine or pass a local "
            "checkpoint with --weights FILE"
        )
    if kwargs:
        return ModelError(f"model {shown!r} cannot be built{what}: {_describe(e)}")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception (KeyError's repr-quoted message included)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# Keyword arguments whose meaning is the same across torchvision, timm and most user factories,
# checked before building so that a bad value gets its own message rather than whatever the
# constructor trips over (num_classes=-1: "Trying to create tensor with negative dimension").
_COUNT_KWARGS = {"num_classes": 0, "in_chans": 1, "in_channels": 1}
_RATE_KWARGS = (
    "drop_rate",
    "drop_path_rate",
    "attn_drop_rate",
    "proj_drop_rate",
    "pos_drop_rate",
    "dropout",
    "attention_dropout",
    "stochastic_depth_prob",
)


def check_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse builder kwargs whose values cannot be meant: every number finite, counts
    (``num_classes``, ``in_chans``) integers in range, drop rates in [0, 1).

    Raises:
        ModelError: names the ``--model-kwargs`` item and what is allowed.
    """
    for key, value in kwargs.items():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ModelError(f"--model-kwargs {key}={value!r}: allowed: finite numbers")
        if key in _COUNT_KWARGS:
            low = _COUNT_KWARGS[key]
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**31
            if not ok:
                extra = " (0: no classifier head, timm)" if low == 0 else ""
                raise ModelError(
                    f"--model-kwargs {key}={value!r}: allowed: an integer in [{low}, 2**31-1]{extra}"
                )
        if key in _RATE_KWARGS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
            if not ok:
                raise ModelError(f"--model-kwargs {key}={value!r}: allowed: a number in [0, 1)")


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
