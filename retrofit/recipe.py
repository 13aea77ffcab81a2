"""The recipe: which regularizers to add, with the papers' hyper-parameters, and how to fine-tune.

A recipe is a YAML mapping (or a dict) with one section per technique. A section that is present
is enabled; ``stochastic_depth: {}`` or a bare ``stochastic_depth:`` enables it with the defaults
below; ``stochastic_depth: false`` (or leaving the section out) disables it::

    stochastic_depth: {p_L: 0.5, schedule: linear, mode: row, scaling: inverted}
    dropblock: {stages: [3, 4], block_size: 7, keep_prob: 0.9, placement: blocks}
    uout: {beta: 0.1}
    dropout_fix: after_last_bn
    cutout: {n_holes: 1, length: 16}
    train: {epochs: 3, batch_size: 64}

Every value is checked when the recipe is loaded, before any model is built: an unknown key (with
a did-you-mean), a wrong type or an out-of-range value raises :class:`RecipeError` naming the
field, the value and what is allowed. Files are read with ``yaml.safe_load`` only, so loading a
recipe never executes code. What can only be checked against a model (a stage index beyond the
model's last stage, a block_size larger than a feature map) is checked by the planner.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from retrofit.errors import RecipeError

__all__ = [
    "CutoutSpec",
    "DropBlockSpec",
    "Recipe",
    "RecipeError",
    "StochasticDepthSpec",
    "UoutSpec",
    "load_recipe",
]

DROPOUT_FIXES = ("after_last_bn",)


# --- validation helpers -----------------------------------------------------------------------
# Each takes the dotted field name so that every error points at the exact place in the YAML.


def _did_you_mean(key: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    """A 'did you mean' hint: case-insensitive match first (p_l → p_L), then difflib."""
    for candidate in allowed:
        if candidate.lower() == key.lower():
            return f"did you mean '{candidate}'?"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _check_keys(
    section: str, data: Mapping[str, Any], allowed: list[str] | tuple[str, ...]
) -> None:
    for key in data:
        if not isinstance(key, str):
            raise RecipeError(_join(section, str(key)), key, f"string keys: {', '.join(allowed)}")
        if key not in allowed:
            raise RecipeError(
                _join(section, key),
                data[key],
                f"keys {', '.join(allowed)}" if section else f"sections {', '.join(allowed)}",
                _did_you_mean(key, allowed) or _misplaced_hint(section, key),
            )


def _misplaced_hint(section: str, key: str) -> str | None:
    """Point a top-level key that belongs inside a section (``p_L: 0.5``) at its section."""
    if section:
        return None
    for name, cls in _SECTIONS.items():
        if key in cls.field_names():
            return f"'{key}' belongs inside the '{name}:' section"
    return None


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _numeric_string(value: object) -> float | None:
    """The number in a string like "1e-1", else None.

    PyYAML implements YAML 1.1, which reads an exponent without a dot ("1e-1") as a string. The
    trainer's ``train:`` section accepts such strings for its float fields, and so do the other
    sections, so one rule holds for every number in a recipe.
    """
    if not isinstance(value, str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _float(
    field: str,
    value: object,
    *,
    low: float,
    high: float,
    low_open: bool = True,
    high_open: bool = False,
) -> float:
    """A float in an interval; ints are accepted, bools are not (True is not the number 1 here)."""
    lo_br, hi_br = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"a number in {lo_br}{low:g}, {high:g}{hi_br}"
    number = _numeric_string(value)
    if number is not None:
        value = number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(field, value, allowed)
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        raise RecipeError(field, value, allowed) from None
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if not math.isfinite(v) or too_low or too_high:
        raise RecipeError(field, value, allowed)
    return v


# Integers end up in torch/numpy int64 (seeds, sizes, counts): nothing larger is meaningful.
INT64_MAX = 2**63 - 1


def _int(field: str, value: object, *, low: int) -> int:
    """An int in [low, 2**63-1]. Floats are rejected even when whole: 7.0 for a block size is a
    typo."""
    allowed = f"an integer in [{low}, 2**63-1]"
    if isinstance(value, bool) or not isinstance(value, int):
        hint = None
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            hint = f"write {int(value)} without quotes"
        raise RecipeError(field, value, allowed, hint)
    if not low <= value <= INT64_MAX:
        raise RecipeError(field, value, allowed)
    return value


def _choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    allowed = " | ".join(choices)
    if not isinstance(value, str) or value not in choices:
        hint = _did_you_mean(value, choices) if isinstance(value, str) else None
        raise RecipeError(field, value, allowed, hint)
    return value


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(field, value, "true | false")
    return value


def _section_mapping(section: str, value: object) -> dict[str, Any] | None:
    """The body of a section: a mapping, or None/true for the defaults; false disables it."""
    if value is None or value is True:
        return {}
    if value is False:
        return None
    if not isinstance(value, Mapping):
        raise RecipeError(
            section,
            value,
            "a mapping of its fields, empty for the defaults, or false to disable it",
        )
    return dict(value)


class _Spec:
    """Shared to_dict / field listing for the section dataclasses."""

    section: ClassVar[str]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Resolved values, ready for JSON/YAML (tuples become lists)."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


# --- sections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StochasticDepthSpec(_Spec):
    """Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth").

    Block l of L keeps its residual branch with survival probability p_l from
    ``retrofit.schedule``: ``linear`` p_l = 1 - (l / L) * (1 - p_L) (the paper), ``uniform``
    p_l = p_L, ``timm`` p_l = 1 - (1 - p_L) * (l - 1) / (L - 1) (timm's ``drop_path_rate``
    spacing: block 1 never dropped).

    Args:
        p_L: survival probability of the last block, in (0, 1]; the paper uses 0.5.
        drop_path_rate: timm's name for 1 - p_L, accepted instead of p_L (not with it); it implies
            ``schedule: timm`` and refuses any other schedule. Not stored: the resolved recipe
            says ``p_L``.
        schedule: ``linear`` (the paper's linear decay rule), ``uniform`` or ``timm``.
        stagewise: apply the schedule over stages instead of blocks: every block of a stage gets
            one rate (a block's stage is the container it sits in, ``layer3.1`` → ``layer3``;
            see ``retrofit.schedule``). Not with ``uniform``, where it would change nothing.
        warmup: fraction of training, in [0, 1], over which every survival goes linearly from 1
            to its p_l (Composer's ``drop_warmup``); 0 is no warm-up. Driven by
            ``retrofit.schedule.update(model, t)``.
        mode: ``row``: an independent draw per sample (timm's drop_path); ``batch``: one draw per
            block per step for the whole batch (the paper's formulation); a dropped block's
            branch is not computed at all; ``subset``: exactly round(p_l·N) samples of each
            batch keep the branch, chosen without replacement, and it runs on those rows only
            (DINOv2; a BatchNorm inside the branch then sees only those rows).
        scaling: ``inverted``: kept branches are scaled by 1/p_l in training and the gate is the
            identity in eval, so a pretrained model's inference is unchanged; ``paper``: no scaling
            in training, the branch is multiplied by p_l in eval (H = ReLU(p_l·f_l + id)).
        seed: makes the batch/subset draws counter-based, a function of (seed, site, call
            number): reproducible runs, resumable sequences and identical batch-mode draws on
            every DDP rank; None uses torch's global generator (row mode always does).
    """

    section: ClassVar[str] = "stochastic_depth"
    SCHEDULES: ClassVar[tuple[str, ...]] = ("linear", "uniform", "timm")
    MODES: ClassVar[tuple[str, ...]] = ("row", "batch", "subset")
    SCALINGS: ClassVar[tuple[str, ...]] = ("inverted", "paper")
    ALIASES: ClassVar[tuple[str, ...]] = ("drop_path_rate",)

    p_L: float = 0.5
    schedule: str = "linear"
    stagewise: bool = False
    warmup: float = 0.0
    mode: str = "row"
    scaling: str = "inverted"
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> StochasticDepthSpec:
        """Validate a ``stochastic_depth:`` section (None → defaults)."""
        s = cls.section
        d = dict(d or {})
        _check_keys(s, d, cls.field_names() + cls.ALIASES)
        seed = d.get("seed")
        schedule = _choice(f"{s}.schedule", d.get("schedule", cls.schedule), cls.SCHEDULES)
        p_L = _float(f"{s}.p_L", d.get("p_L", cls.p_L), low=0.0, high=1.0)
        if "drop_path_rate" in d:
            field = f"{s}.drop_path_rate"
            rate = d["drop_path_rate"]
            if "p_L" in d:
                raise RecipeError(
                    field,
                    rate,
                    "either p_L or drop_path_rate, not both",
                    f"drop_path_rate is 1 - p_L; p_L is {d['p_L']!r}: keep one of the two",
                )
            if "schedule" in d and schedule != "timm":
                raise RecipeError(
                    field,
                    rate,
                    "drop_path_rate with schedule: timm (or no schedule, which means timm)",
                    f"with schedule: {schedule} write p_L = 1 - drop_path_rate instead",
                )
            rate = _float(field, rate, low=0.0, high=1.0, low_open=False, high_open=True)
            p_L, schedule = 1.0 - rate, "timm"
        stagewise = _bool(f"{s}.stagewise", d.get("stagewise", cls.stagewise))
        if stagewise and schedule == "uniform":
            raise RecipeError(
                f"{s}.stagewise",
                True,
                "stagewise with schedule linear or timm",
                "schedule: uniform gives every block p_L, so stagewise would change nothing",
            )
        return cls(
            p_L=p_L,
            schedule=schedule,
            stagewise=stagewise,
            warmup=_float(
                f"{s}.warmup", d.get("warmup", cls.warmup), low=0.0, high=1.0, low_open=False
            ),
            mode=_choice(f"{s}.mode", d.get("mode", cls.mode), cls.MODES),
            scaling=_choice(f"{s}.scaling", d.get("scaling", cls.scaling), cls.SCALINGS),
            seed=None if seed is None else _int(f"{s}.seed", seed, low=0),
        )


@dataclass(frozen=True)
class DropBlockSpec(_Spec):
    """DropBlock (Ghiasi et al. 2018, "DropBlock: A regularization method for conv networks").

    Args:
        stages: the stages to regularize, as 1-based indices into ``retrofit.stages(model)`` or
            module names (``layer3``); the paper uses ResNet-50's groups 3 and 4. Video CNNs
            (5-D input) have stages too, on their T×H×W maps.
        block_size: side of the dropped squares (cubes on video maps); the paper uses 7
            (clamped to the feature map). A list gives one per stage, in the order of ``stages``
            (timm's ResNet uses [5, 3] on stages 3 and 4).
        keep_prob: target keep probability in (0, 1]; the paper uses 0.9 (0.75-0.95 range).
        gamma_scale: factor on the seed rate γ, > 0 (timm's ``gamma_scale``: 0.25 and 1.0 on
            ResNet stages 3 and 4); a list gives one per stage. The dropped fraction is then
            ≈ gamma_scale·(1 − keep_prob).
        scale: rescale the kept activations by count/kept, as the paper does; false leaves them
            unscaled (timm's ``scale_by_keep=False``).
        placement: ``stages``: one DropBlock on each chosen stage's output; ``blocks``: after
            every residual block inside the chosen stages, as the paper does for ResNet.
        per_channel: an independent mask per channel instead of one shared across channels.
        ramp: fraction of training over which keep_prob goes linearly from 1 to its target
            (the paper ramps over the whole run: 1.0).
    """

    section: ClassVar[str] = "dropblock"
    PLACEMENTS: ClassVar[tuple[str, ...]] = ("stages", "blocks")

    stages: tuple[int | str, ...] = (3, 4)
    block_size: int | tuple[int, ...] = 7
    keep_prob: float = 0.9
    gamma_scale: float | tuple[float, ...] = 1.0
    scale: bool = True
    placement: str = "stages"
    per_channel: bool = False
    ramp: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DropBlockSpec:
        """Validate a ``dropblock:`` section (None → defaults)."""
        s = cls.section
        d = dict(d or {})
        _check_keys(s, d, cls.field_names())
        stages = cls._stages(d.get("stages", list(cls.stages)))
        return cls(
            stages=stages,
            block_size=cls._per_stage(
                "block_size",
                d.get("block_size", cls.block_size),
                stages,
                lambda f, v: _int(f, v, low=1),
            ),
            keep_prob=_float(f"{s}.keep_prob", d.get("keep_prob", cls.keep_prob), low=0, high=1),
            gamma_scale=cls._per_stage(
                "gamma_scale",
                d.get("gamma_scale", cls.gamma_scale),
                stages,
                lambda f, v: _float(f, v, low=0.0, high=math.inf, high_open=True),
            ),
            scale=_bool(f"{s}.scale", d.get("scale", cls.scale)),
            placement=_choice(f"{s}.placement", d.get("placement", cls.placement), cls.PLACEMENTS),
            per_channel=_bool(f"{s}.per_channel", d.get("per_channel", cls.per_channel)),
            ramp=_float(f"{s}.ramp", d.get("ramp", cls.ramp), low=0.0, high=1.0),
        )

    @classmethod
    def _per_stage(cls, name: str, value: object, stages: tuple[int | str, ...], check: Any) -> Any:
        """One value for every stage, or a list with one per stage (in ``stages`` order)."""
        field = f"{cls.section}.{name}"
        if not isinstance(value, (list, tuple)):
            return check(field, value)
        if len(value) != len(stages):
            raise RecipeError(
                field,
                value,
                f"one value, or a list of {len(stages)} (one per stage of stages: {list(stages)})",
                f"the list has {len(value)}",
            )
        return tuple(check(f"{field}[{i}]", v) for i, v in enumerate(value))

    def for_stage(self, item: int | str) -> tuple[int, float]:
        """(block_size, gamma_scale) for the stage the recipe lists as ``item``."""
        i = self.stages.index(item)
        bs = self.block_size[i] if isinstance(self.block_size, tuple) else self.block_size
        gs = self.gamma_scale[i] if isinstance(self.gamma_scale, tuple) else self.gamma_scale
        return bs, gs

    @classmethod
    def _stages(cls, value: object) -> tuple[int | str, ...]:
        field = f"{cls.section}.stages"
        allowed = "a non-empty list of 1-based stage indices or module names, e.g. [3, 4]"
        # A single stage may be written without the list brackets.
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise RecipeError(field, value, allowed)
        out: list[int | str] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise RecipeError(field, value, allowed)
            if isinstance(item, int) and item < 1:
                raise RecipeError(field, value, allowed, f"stage {item}: stages count from 1")
            if isinstance(item, str) and not item.strip():
                raise RecipeError(field, value, allowed, "empty module name")
            if item in out:
                raise RecipeError(field, value, allowed, f"stage {item!r} is listed twice")
            out.append(item)
        return tuple(out)


@dataclass(frozen=True)
class UoutSpec(_Spec):
    """Uout (Li et al. 2019, "Understanding the Disharmony between Dropout and Batch Norm").

    Replaces every Dropout that reaches a BatchNorm (see ``retrofit.lint``) with
    y = x + x·r, r ~ U(-beta, beta) elementwise, whose variance shift is much smaller.

    Args:
        beta: half-width of the uniform noise, in (0, 1]; the paper uses 0.1.
    """

    section: ClassVar[str] = "uout"

    beta: float = 0.1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> UoutSpec:
        """Validate a ``uout:`` section (None → defaults)."""
        d = dict(d or {})
        _check_keys(cls.section, d, cls.field_names())
        return cls(beta=_float(f"{cls.section}.beta", d.get("beta", cls.beta), low=0, high=1))


@dataclass(frozen=True)
class CutoutSpec(_Spec):
    """Cutout (DeVries & Taylor 2017, "Improved Regularization of CNNs with Cutout").

    Zeroes ``n_holes`` squares of side ``length`` at uniform random centres of each training
    image (clipped at the border).

    Args:
        n_holes: squares per image, >= 0; the paper uses 1.
        length: side of each square: an integer >= 1 in pixels (the paper uses 16 on CIFAR-10,
            8 on CIFAR-100), or a float in (0, 1], a fraction of the image's shorter side
            (Composer's ``length``; 0.5 is Composer's default).
        uniform_sampling: every pixel equally likely to be masked: centres may lie outside the
            image by up to half the length (Composer's ``uniform_sampling``).
        per_batch: one set of hole positions for the whole batch (Composer's behaviour) instead
            of independent positions per image (the paper's).
    """

    section: ClassVar[str] = "cutout"

    n_holes: int = 1
    length: int | float = 16
    uniform_sampling: bool = False
    per_batch: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> CutoutSpec:
        """Validate a ``cutout:`` section (None → defaults)."""
        s = cls.section
        d = dict(d or {})
        _check_keys(s, d, cls.field_names())
        return cls(
            n_holes=_int(f"{s}.n_holes", d.get("n_holes", cls.n_holes), low=0),
            length=cls._length(d.get("length", cls.length)),
            uniform_sampling=_bool(
                f"{s}.uniform_sampling", d.get("uniform_sampling", cls.uniform_sampling)
            ),
            per_batch=_bool(f"{s}.per_batch", d.get("per_batch", cls.per_batch)),
        )

    @classmethod
    def _length(cls, value: object) -> int | float:
        field = f"{cls.section}.length"
        allowed = "an integer >= 1 (pixels) or a float in (0, 1] (a fraction of the image side)"
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            raise RecipeError(field, value, allowed, f"write {int(value)} without quotes")
        if isinstance(value, float) or _numeric_string(value) is not None:
            number = _numeric_string(value) if isinstance(value, str) else value
            assert isinstance(number, float)
            if not 0.0 < number <= 1.0:
                hint = None
                if number > 1.0 and number.is_integer():
                    hint = f"write {int(number)} for {int(number)} pixels"
                raise RecipeError(field, value, allowed, hint)
            return number
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(field, value, allowed)
        return value


_SECTIONS: dict[str, type[_Spec]] = {
    "stochastic_depth": StochasticDepthSpec,
    "dropblock": DropBlockSpec,
    "uout": UoutSpec,
    "cutout": CutoutSpec,
}
# Top-level keys in their canonical order (also the order of to_dict() and techniques()).
_TOP_LEVEL = ("stochastic_depth", "dropblock", "uout", "dropout_fix", "cutout", "train")


def _train_config(value: object) -> Any:
    """Validate the ``train:`` section with the trainer's own schema.

    The schema belongs to ``retrofit.train.config.TrainConfig``; it is imported lazily so that
    loading a recipe does not import the trainer's heavier dependencies.
    """
    body = _section_mapping("train", value)
    if body is None:
        return None
    if importlib.util.find_spec("retrofit.train.config") is None:
        # The trainer is not installed in this tree: keep the raw mapping so planning still works.
        return body
    config = importlib.import_module("retrofit.train.config")
    try:
        return config.TrainConfig.from_dict(body)
    except RecipeError as e:
        if e.field.startswith("train"):
            raise
        # Keep the dotted path to the field consistent with the other sections.
        raise RecipeError(f"train.{e.field}", e.value, e.allowed) from e


# --- the recipe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: one optional spec per technique plus the trainer's config.

    A field that is None is disabled. Build one with :func:`load_recipe` or
    :meth:`Recipe.from_dict`; :meth:`to_dict` gives the resolved recipe (every default filled in),
    which loads back to an equal Recipe.
    """

    stochastic_depth: StochasticDepthSpec | None = None
    dropblock: DropBlockSpec | None = None
    uout: UoutSpec | None = None
    dropout_fix: str | None = None
    cutout: CutoutSpec | None = None
    train: Any = None  # retrofit.train.config.TrainConfig, or None for the trainer's defaults

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Recipe:
        """Validate a recipe mapping; raises :class:`RecipeError` on the first bad field."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise RecipeError("recipe", d, "a mapping of sections: " + ", ".join(_TOP_LEVEL))
        _check_keys("", d, _TOP_LEVEL)
        specs: dict[str, Any] = {}
        for name, spec_cls in _SECTIONS.items():
            if name in d:
                body = _section_mapping(name, d[name])
                specs[name] = None if body is None else spec_cls.from_dict(body)  # type: ignore[attr-defined]
        fix = d.get("dropout_fix")
        if fix is not None:
            fix = _choice("dropout_fix", fix, DROPOUT_FIXES)
        if fix is not None and specs.get("uout") is not None:
            # Both act on the same flagged dropouts: one replaces them, the other removes them.
            raise RecipeError(
                "dropout_fix",
                fix,
                "only one fix for the flagged dropouts",
                "'uout' replaces them and 'dropout_fix' removes them; keep one of the two",
            )
        train = _train_config(d["train"]) if "train" in d else None
        return cls(dropout_fix=fix, train=train, **specs)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, JSON/YAML-ready; disabled sections are left out."""
        out: dict[str, Any] = {}
        for name in _TOP_LEVEL:
            value = getattr(self, name)
            if value is None:
                continue
            if hasattr(value, "to_dict"):
                out[name] = value.to_dict()
            elif isinstance(value, Mapping):
                out[name] = dict(value)
            else:
                out[name] = value
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (loads back with :func:`load_recipe`)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def techniques(self) -> list[str]:
        """The enabled techniques, in canonical order (``train`` is not a technique)."""
        return [name for name in _TOP_LEVEL[:-1] if getattr(self, name) is not None]


def load_recipe(src: str | os.PathLike[str] | Mapping[str, Any] | Recipe | None) -> Recipe:
    """Load and validate a recipe from a YAML file path, a mapping, or a Recipe (returned as is).

    ``None`` and an empty file give an empty recipe (no technique: a plain fine-tuning baseline).
    A missing or unreadable file, invalid YAML, or YAML that is not a mapping raises
    :class:`RecipeError`, as does any invalid field.
    """
    if isinstance(src, Recipe):
        return src
    if src is None or isinstance(src, Mapping):
        return Recipe.from_dict(src)
    if not isinstance(src, (str, os.PathLike)):
        raise RecipeError("recipe", src, "a path to a YAML file, a mapping or a Recipe")
    path = Path(src)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe", str(path), "an existing YAML file", "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError("recipe", str(path), "a readable UTF-8 YAML file", str(e)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError("recipe", str(path), "valid YAML", f"{where}{problem}") from None
    if data is not None and not isinstance(data, Mapping):
        raise RecipeError(
            "recipe",
            str(path),
            "a YAML mapping of sections: " + ", ".join(_TOP_LEVEL),
            f"the file holds a {type(data).__name__}",
        )
    return Recipe.from_dict(data)
