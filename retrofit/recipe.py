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

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retrofit.errors import RecipeError
from retrofit.finetune_config import TrainConfig
from retrofit.spec import check_keys, section_body
from retrofit.techniques import TECHNIQUES
from retrofit.techniques.cutout import CutoutSpec
from retrofit.techniques.dropblock import DropBlockSpec
from retrofit.techniques.dropout_fix import DROPOUT_FIXES
from retrofit.techniques.stochastic_depth import StochasticDepthSpec
from retrofit.techniques.uout import UoutSpec

__all__ = [
    "DROPOUT_FIXES",
    "CutoutSpec",
    "DropBlockSpec",
    "Recipe",
    "RecipeError",
    "StochasticDepthSpec",
    "UoutSpec",
    "load_recipe",
    "top_level",
]


def top_level() -> tuple[str, ...]:
    """The recipe's keys in canonical order: every technique's section, then ``train``."""
    return (*TECHNIQUES, "train")


def _misplaced_hint(key: str) -> str | None:
    """Point a top-level key that belongs inside a section (``p_L: 0.5``) at its section."""
    for name, technique in TECHNIQUES.items():
        if key in technique.fields:
            return f"'{key}' belongs inside the '{name}:' section"
    return None


def _train_config(value: object) -> Any:
    """Validate the ``train:`` section with :class:`retrofit.finetune_config.TrainConfig` (a core
    module: a recipe loads without importing the trainer)."""
    body = section_body("train", value)
    if body is None:
        return None
    try:
        return TrainConfig.from_dict(body)
    except RecipeError as e:
        if e.field.startswith("train"):
            raise
        # Keep the dotted path to the field consistent with the other sections.
        raise RecipeError(f"train.{e.field}", e.value, e.allowed) from e


# --- the recipe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: one spec per enabled technique plus the trainer's config.

    ``recipe.stochastic_depth`` (any technique's name) is its spec, None when disabled. Build one
    with :func:`load_recipe` or :meth:`Recipe.from_dict`; :meth:`to_dict` gives the resolved
    recipe (every default filled in), which loads back to an equal Recipe.
    """

    sections: Mapping[str, Any] = field(default_factory=dict)
    train: TrainConfig | None = None  # None: the trainer's defaults

    def __getattr__(self, name: str) -> Any:
        if name in TECHNIQUES:
            return self.sections.get(name)
        raise AttributeError(f"'Recipe' object has no attribute {name!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Recipe:
        """Validate a recipe mapping; raises :class:`RecipeError` on the first bad field."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise RecipeError("recipe", d, "a mapping of sections: " + ", ".join(top_level()))
        check_keys("", d, top_level(), hint=_misplaced_hint)
        sections: dict[str, Any] = {}
        for name, technique in TECHNIQUES.items():
            if name in d:
                spec = technique.parse(d[name])
                if spec is not None:
                    sections[name] = spec
        for name in sections:
            for other, reason in TECHNIQUES[name].excludes.items():
                if other in sections:
                    raise RecipeError(name, d[name], f"{name} or {other}, not both", reason)
        train = _train_config(d["train"]) if "train" in d else None
        return cls(sections, train)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, JSON/YAML-ready; disabled sections are left out."""
        out: dict[str, Any] = {}
        for name in top_level():
            value = self.train if name == "train" else self.sections.get(name)
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
        return [name for name in TECHNIQUES if name in self.sections]


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
            "a YAML mapping of sections: " + ", ".join(top_level()),
            f"the file holds a {type(data).__name__}",
        )
    return Recipe.from_dict(data)
