"""Cutout (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks with
Cutout"): the ``cutout:`` section. It acts on the input images, not on the model: no planner;
its record's input transform is what the trainer applies to each training batch (your own loop
uses ``retrofit.layers.BatchCutout``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from retrofit.errors import RecipeError
from retrofit.layers.cutout import BatchCutout, cutout
from retrofit.spec import Spec, boolean, check_keys, integer, numeric_string
from retrofit.techniques.record import Technique

__all__ = ["CutoutSpec", "TECHNIQUE", "batch_transform"]


@dataclass(frozen=True)
class CutoutSpec(Spec):
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
        check_keys(s, d, cls.field_names())
        return cls(
            n_holes=integer(f"{s}.n_holes", d.get("n_holes", cls.n_holes), low=0),
            length=cls._length(d.get("length", cls.length)),
            uniform_sampling=boolean(
                f"{s}.uniform_sampling", d.get("uniform_sampling", cls.uniform_sampling)
            ),
            per_batch=boolean(f"{s}.per_batch", d.get("per_batch", cls.per_batch)),
        )

    @classmethod
    def _length(cls, value: object) -> int | float:
        field = f"{cls.section}.length"
        allowed = "an integer >= 1 (pixels) or a float in (0, 1] (a fraction of the image side)"
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            raise RecipeError(field, value, allowed, f"write {int(value)} without quotes")
        if isinstance(value, float) or numeric_string(value) is not None:
            number = numeric_string(value) if isinstance(value, str) else value
            assert isinstance(number, float)
            if not 0.0 < number <= 1.0:
                hint = None
                if number > 1.0 and number.is_integer():
                    hint = f"write {int(number)} for {int(number)} pixels"
                raise RecipeError(field, value, allowed, hint)
            return number
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(field, value, allowed)
        return integer(field, value, low=1)  # pixels: an int64, like every integer of a recipe


def batch_transform(spec: CutoutSpec) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """The spec as ``f(images, generator)`` on an (N, C, H, W) training batch (the trainer draws
    the holes from a generator it seeds per step and rank)."""

    def apply_cutout(images: Tensor, generator: torch.Generator | None) -> Tensor:
        return cutout(images, spec.n_holes, spec.length, generator=generator,
                      uniform_sampling=spec.uniform_sampling, per_batch=spec.per_batch)  # fmt: skip

    return apply_cutout


def plan_note(spec: CutoutSpec) -> str:
    """Cutout acts on the input images, not on the graph: nothing to rewrite."""
    return (
        f"cutout: n_holes={spec.n_holes}, length={spec.length} is applied to each training batch "
        "by the trainer (retrofit.layers.BatchCutout in your own loop)"
    )


TECHNIQUE = Technique(
    name="cutout",
    parse=CutoutSpec.parse,
    spec=CutoutSpec,
    fields=CutoutSpec.field_names(),
    layer_class=BatchCutout,
    note=plan_note,
    input_transform=batch_transform,
)
