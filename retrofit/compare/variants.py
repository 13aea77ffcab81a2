"""What a comparison runs: variants (one recipe file each) × seeds, and the settings they share.

A variant is a recipe file; its name is the file's stem (``recipes/sd.yaml`` → ``sd``). Besides
the recipe's own sections a variant file may hold one compare-only key, ``model_kwargs:``, the
builder arguments that differ for this variant (``{drop_rate: 0.5}`` for the model's own Dropout,
``{drop_path_rate: 0.1}`` for timm's own stochastic depth): the alternatives a user weighs against
retrofit's regularizers are often knobs of the model itself. They are merged over ``--model-kwargs``.

Every run is identified by a fingerprint of everything that decides its numbers (model, kwargs,
the resolved recipe with its seed, data, the weights file's content, device type): a finished
run with the same fingerprint is never redone; a run whose settings changed is redone.

Imports stay light (no torch) so that ``retrofit-cli compare --help`` and argument errors are instant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrofit.errors import RecipeError

__all__ = ["CompareError", "RunSpec", "Settings", "Variant", "load_variants"]

MODEL_KWARGS_KEY = "model_kwargs"


class CompareError(ValueError):
    """Bad input to a comparison (names, seeds, baseline, output directory); exit code 2."""


@dataclass(frozen=True)
class Variant:
    """One recipe file of a comparison.

    Attributes:
        name: the file's stem; the row label and the run directory.
        path: the file.
        recipe: the validated recipe as a resolved mapping (train overrides applied, no seed).
        model_kwargs: this variant's builder arguments (over the shared ``--model-kwargs``).
    """

    name: str
    path: Path
    recipe: dict[str, Any]
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def recipe_for(self, seed: int) -> dict[str, Any]:
        """The recipe of this variant's run with ``seed`` (``train.seed`` set)."""
        return {**self.recipe, "train": {**self.recipe.get("train", {}), "seed": seed}}


@dataclass(frozen=True)
class Settings:
    """What every run of a comparison shares."""

    model: str
    model_kwargs: dict[str, Any]
    data: str | None
    weights: str | None
    pretrained: bool
    device: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class RunSpec:
    """One training run: a variant with a seed, in ``out/runs/<variant>/seed<k>``."""

    variant: Variant
    seed: int
    settings: Settings
    root: Path

    @property
    def dir(self) -> Path:
        return self.root / "runs" / self.variant.name / f"seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"

    def model_kwargs(self) -> dict[str, Any]:
        return {**self.settings.model_kwargs, **self.variant.model_kwargs}

    def fingerprint(self, device_type: str, weights_digest: str | None) -> str:
        """A digest of everything that decides this run's numbers."""
        ident = {
            "model": self.settings.model,
            "model_kwargs": self.model_kwargs(),
            "recipe": self.variant.recipe_for(self.seed),
            "data": self.settings.data,
            "weights": weights_digest,
            "pretrained": self.settings.pretrained,
            "device": device_type,
        }
        text = json.dumps(ident, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (a re-trained backbone makes its fine-tuning runs stale)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _read_variant_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe mapping, model_kwargs) of one variant file; RecipeError names the file."""
    import yaml

    from retrofit.recipe import load_recipe

    if not path.is_file():
        raise CompareError(f"--recipes: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        load_recipe(path)  # raises the recipe loader's own message (line, column, problem)
        raise
    data = {} if data is None else data
    if not isinstance(data, dict):
        load_recipe(path)  # "a YAML mapping of sections: …"
    kwargs = data.pop(MODEL_KWARGS_KEY, None) or {}
    if not isinstance(kwargs, dict) or not all(
        isinstance(k, str) and k.isidentifier() for k in kwargs
    ):
        raise RecipeError(
            MODEL_KWARGS_KEY,
            kwargs,
            "a mapping of the model builder's keyword arguments, e.g. {drop_rate: 0.5}",
        )
    return data, kwargs


def load_variants(paths: list[str], train_overrides: dict[str, Any]) -> list[Variant]:
    """Read and validate every variant file, with ``train_overrides`` over each ``train:``.

    Raises:
        CompareError: two files share a stem, or none is given.
        RecipeError: a bad field in a file (the message names the file and the field).
    """
    from retrofit.recipe import Recipe

    if not paths:
        raise CompareError("--recipes: give at least one recipe file")
    variants: list[Variant] = []
    seen: dict[str, Path] = {}
    for p in paths:
        path = Path(p)
        name = path.stem
        if name in seen:
            raise CompareError(
                f"--recipes: {seen[name]} and {path} are both named {name!r} (a variant is "
                "named by its file's stem); rename one"
            )
        seen[name] = path
        try:
            data, kwargs = _read_variant_file(path)
            if train_overrides:
                data["train"] = {**(data.get("train") or {}), **train_overrides}
            recipe = Recipe.from_dict(data).to_dict()
        except RecipeError as e:
            raise CompareError(f"{path}: {e}") from None
        if "train" in recipe:
            recipe["train"] = {k: v for k, v in recipe["train"].items() if k != "seed"}
        variants.append(Variant(name, path, recipe, kwargs))
    return variants
