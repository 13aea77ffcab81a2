"""Uout (Li et al. 2019): the ``uout:`` section, its planner and its layer.

Replaces each Dropout that reaches a BatchNorm with y = x + x·r, r ~ U(−β, β): its train/test
variance ratio is 1 + β²/3 instead of 1/q for keep rate q (``retrofit.layers.Uout``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from retrofit.edit import Edit
from retrofit.layers import Uout
from retrofit.spec import Spec, check_keys, number
from retrofit.techniques.dropout_sites import replace, replaced, why
from retrofit.techniques.record import Technique
from retrofit.techniques.table import num, short_source, table

if TYPE_CHECKING:
    from retrofit.analysis.context import Analysis

__all__ = ["TECHNIQUE", "UoutSettings", "UoutSpec", "plan_uout", "uout_layer"]


@dataclass(frozen=True)
class UoutSpec(Spec):
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
        check_keys(cls.section, d, cls.field_names())
        return cls(beta=number(f"{cls.section}.beta", d.get("beta", cls.beta), low=0, high=1))


@dataclass(frozen=True)
class UoutSettings:
    """The typed arguments of the Uout an ``uout`` edit inserts."""

    beta: float = 0.1


def plan_uout(analysis: Analysis, spec: UoutSpec) -> list[Edit]:
    """Replace every dropout that reaches a BatchNorm with ``Uout(beta)`` (Li et al. 2019).

    An ``nn.Dropout*`` module is swapped for a Uout module; a functional ``F.dropout`` call is
    replaced by a call of an added Uout module. Uout is the identity in eval, as Dropout was.
    """
    result = analysis.dropout_bn
    edits: list[Edit] = []
    done: set[str] = set()
    for site in result.flagged():
        edit = replace(
            site,
            TECHNIQUE.name,
            UoutSettings(spec.beta),
            f"{site.op}(p={site.p}) {why(result, site)}",
            done,
        )
        if edit is not None:
            edits.append(edit)
    return edits


def uout_layer(edit: Edit) -> nn.Module:
    """The layer a ``uout`` edit inserts: the Uout that replaces a flagged dropout."""
    s: UoutSettings = edit.settings
    return Uout(beta=s.beta)


def plan_table(edits: Sequence[Edit], model: str) -> list[str]:
    """What each Uout replaces, its beta and why (Li et al. 2019)."""
    betas = {e.settings.beta for e in edits}
    head = f"Uout (Li et al. 2019): replaces {len(edits)} dropout(s) that reach a BatchNorm"
    if len(betas) == 1:
        beta = num(next(iter(betas)))
        head += f", y = x + x·r with r ~ U(−{beta}, {beta})"
    rows = [
        (replaced(e), num(e.settings.beta), short_source(e.source), e.note or "") for e in edits
    ]
    return [head, *table(("replaces", "beta", "source", "why"), rows)]


TECHNIQUE = Technique(
    name="uout",
    parse=UoutSpec.parse,
    spec=UoutSpec,
    fields=UoutSpec.field_names(),
    planner=plan_uout,
    layer=uout_layer,
    layer_class=Uout,
    actions=("replace_module", "replace_call"),
    table=plan_table,
)
