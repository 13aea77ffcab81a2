"""ShakeDrop (Yamada et al. 2018, "ShakeDrop Regularization for Deep Residual Learning",
arXiv:1802.02375): the ``shakedrop:`` section, its planner and its layer.

One edit per residual site of ``analysis/residual.py`` (the sites stochastic depth uses), the
gate's p_l from the same depth rules (``techniques/depth.py``: the paper takes stochastic depth's
linear decay rule, p_L = 0.5), the layer ``retrofit.layers.ShakeDrop`` on the branch operand of
the add (``wrap_arg``). The layer is the inverted form: the identity in eval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from retrofit.edit import Edit
from retrofit.errors import RecipeError
from retrofit.layers.shakedrop import MODES, ShakeDrop
from retrofit.spec import Spec, check_keys, choice, number
from retrofit.techniques.depth import SCHEDULES, block_survivals
from retrofit.techniques.record import Figures, Technique
from retrofit.techniques.table import depth_cells, mean, num, short_source, survival_span, table

if TYPE_CHECKING:
    from retrofit.analysis.context import Analysis

__all__ = ["ShakeDropSettings", "ShakeDropSpec", "TECHNIQUE", "plan_shakedrop", "shakedrop_layer"]


@dataclass(frozen=True)
class ShakeDropSpec(Spec):
    """ShakeDrop (Yamada et al. 2018, "ShakeDrop Regularization for Deep Residual Learning").

    Args:
        p_L: P(b_l = 1) of the last block, in (0, 1]; the paper uses 0.5 with the linear decay
            rule p_l = 1 − (l/L)(1 − p_L).
        schedule: ``linear`` (the paper's), ``uniform`` or ``timm`` (see ``retrofit.schedule``).
        alpha_range: [−a, a], the range of α in the forward, a in [0, 1]; the paper's best:
            [−1, 1]. Symmetric, so E[b + α − bα] = p_l and the inverted layer's eval is the
            identity.
        beta_range: [low, high], the range of β in the backward, within [0, 1]; the paper:
            [0, 1].
        mode: ``batch``: one b_l per step for the whole batch; ``row``: one per sample. α and
            β are drawn per sample in both.
    """

    section: ClassVar[str] = "shakedrop"
    SCHEDULES: ClassVar[tuple[str, ...]] = SCHEDULES
    MODES: ClassVar[tuple[str, ...]] = MODES

    p_L: float = 0.5
    schedule: str = "linear"
    alpha_range: tuple[float, float] = (-1.0, 1.0)
    beta_range: tuple[float, float] = (0.0, 1.0)
    mode: str = "batch"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ShakeDropSpec:
        """Validate a ``shakedrop:`` section (None → defaults)."""
        s = cls.section
        d = dict(d or {})
        check_keys(s, d, cls.field_names())
        return cls(
            p_L=number(f"{s}.p_L", d.get("p_L", cls.p_L), low=0.0, high=1.0),
            schedule=choice(f"{s}.schedule", d.get("schedule", cls.schedule), cls.SCHEDULES),
            alpha_range=cls._range("alpha_range", d.get("alpha_range", list(cls.alpha_range))),
            beta_range=cls._range("beta_range", d.get("beta_range", list(cls.beta_range))),
            mode=choice(f"{s}.mode", d.get("mode", cls.mode), cls.MODES),
        )

    @classmethod
    def _range(cls, name: str, value: object) -> tuple[float, float]:
        field = f"{cls.section}.{name}"
        alpha = name == "alpha_range"
        allowed = (
            "a symmetric range [-a, a] with a in [0, 1], e.g. [-1, 1]"
            if alpha
            else "a range [low, high] with 0 <= low <= high <= 1, e.g. [0, 1]"
        )
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise RecipeError(field, value, allowed)
        low, high = (
            number(f"{field}[{i}]", v, low=-1.0 if alpha else 0.0, high=1.0, low_open=False)
            for i, v in enumerate(value)
        )
        if low > high:
            raise RecipeError(field, value, allowed, f"low {low:g} is above high {high:g}")
        if alpha and low != -high:
            raise RecipeError(
                field, value, allowed, "the inverted layer needs E[α] = 0 (eval is the identity)"
            )
        return (low, high)


@dataclass(frozen=True)
class ShakeDropSettings:
    """The typed arguments of the ShakeDrop a ``shakedrop`` edit inserts (p_l and l are the
    edit's ``survival`` and ``depth``)."""

    alpha_range: tuple[float, float] = (-1.0, 1.0)
    beta_range: tuple[float, float] = (0.0, 1.0)
    mode: str = "batch"

    def params(self) -> dict[str, Any]:
        return {
            "alpha_range": list(self.alpha_range),
            "beta_range": list(self.beta_range),
            "mode": self.mode,
        }


def plan_shakedrop(analysis: Analysis, spec: ShakeDropSpec) -> list[Edit]:
    """One ShakeDrop per residual site, on the branch operand of its add, at the block's p_l."""
    sites = analysis.residual_sites
    blocks = list(dict.fromkeys(s.block for s in sites))  # first-seen order = execution order
    depth_of = {b: i + 1 for i, b in enumerate(blocks)}
    p_of = block_survivals(blocks, spec.p_L, spec.schedule)
    settings = ShakeDropSettings(spec.alpha_range, spec.beta_range, spec.mode)
    return [
        Edit.at(
            site,
            kind=TECHNIQUE.name,
            action="wrap_arg",
            arg=site.branch_arg,
            depth=depth_of[site.block],
            survival=p_of[site.block],
            block=site.block,
            settings=settings,
            note=(
                f"{site.existing_type} {site.existing} stays in the branch"
                if site.existing_type
                else None
            ),
        )
        for site in sites
    ]


def shakedrop_layer(edit: Edit) -> nn.Module:
    """The layer a ``shakedrop`` edit inserts, at the edit's p_l."""
    s: ShakeDropSettings = edit.settings
    survival = edit.survival if edit.survival is not None else 1.0
    return ShakeDrop(
        survival,
        alpha_range=s.alpha_range,
        beta_range=s.beta_range,
        mode=s.mode,
        depth=edit.depth,
    )


# --- what it reports ---------------------------------------------------------------------------


def plan_table(edits: Sequence[Edit], model: str) -> list[str]:
    """Each block's depth l and P(b_l = 1) = p_l."""
    s: ShakeDropSettings = edits[0].settings
    head = (
        f"ShakeDrop (Yamada et al. 2018): {len(edits)} residual branch(es), "
        f"α ~ U[{num(s.alpha_range[0])}, {num(s.alpha_range[1])}], "
        f"β ~ U[{num(s.beta_range[0])}, {num(s.beta_range[1])}], "
        f"b_l per {'sample' if s.mode == 'row' else 'batch'}, inverted (eval: identity)"
    ) + survival_span(edits)
    rows = [(*depth_cells(e), short_source(e.source), e.note or "") for e in edits]
    return [head, *table(("l", "p_l", "block", "source", "note"), rows)]


def _means(rates: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    kept = [float(r["kept_fraction"]) for r in rates if r.get("kept_fraction") is not None]
    out = {
        "shakedrop_kept": mean(kept),
        "shakedrop_planned": mean([float(r["survival"]) for r in rates]),
    }
    return {k: v for k, v in out.items() if v is not None}


def _planned(edits: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    survival = [e["survival"] for e in edits if e.get("survival") is not None]
    return {"shakedrop_planned": sum(survival) / len(survival)} if survival else {}


def _parts(values: Mapping[str, Any]) -> list[str]:
    """``ShakeDrop kept 0.71 (planned 0.75)``: the fraction with b_l = 1 (branch unshaken)."""
    if values.get("shakedrop_kept") is None:
        return []
    planned = values.get("shakedrop_planned")
    return [
        f"ShakeDrop kept {values['shakedrop_kept']:.2f}"
        + (f" (planned {planned:.2f})" if planned is not None else "")
    ]


def _plot(rate: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": rate["kind"], "depth": rate.get("depth"), "survival": rate.get("survival")}


TECHNIQUE = Technique(
    name="shakedrop",
    parse=ShakeDropSpec.parse,
    spec=ShakeDropSpec,
    fields=ShakeDropSpec.field_names(),
    planner=plan_shakedrop,
    layer=shakedrop_layer,
    layer_class=ShakeDrop,
    actions=("wrap_arg",),
    excludes={
        "stochastic_depth": "both act on the same residual branches (ShakeDrop's b_l is "
        "stochastic depth's gate); keep one of the two"
    },
    table=plan_table,
    figures=Figures(
        means=_means,
        planned=_planned,
        parts=_parts,
        logged={"shakedrop_kept": "mean"},
        plot=_plot,
    ),
)
