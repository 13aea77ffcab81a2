"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth", ECCV).

The ``stochastic_depth:`` section, its planner (one edit per residual site of
``analysis/residual.py``, survival p_l from ``retrofit.schedule``) and its layer
(``retrofit.layers.StochasticDepthGate``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from retrofit.edit import Edit
from retrofit.errors import RecipeError
from retrofit.layers import StochasticDepthGate
from retrofit.layers.stochastic_depth import MODES, SCALINGS
from retrofit.spec import Spec, boolean, check_keys, choice, integer, number
from retrofit.techniques.depth import SCHEDULES, block_survivals
from retrofit.techniques.record import Figures, Technique
from retrofit.techniques.table import depth_cells, mean, short_source, survival_span, table

if TYPE_CHECKING:
    from retrofit.analysis.context import Analysis
    from retrofit.analysis.residual import ResidualSite

__all__ = [
    "GateSettings",
    "StochasticDepthSpec",
    "TECHNIQUE",
    "gate",
    "paper_scaling_neutral",
    "plan_stochastic_depth",
]


@dataclass(frozen=True)
class StochasticDepthSpec(Spec):
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
    # One definition each: the depth rules' and the gate's (retrofit.layers.stochastic_depth).
    SCHEDULES: ClassVar[tuple[str, ...]] = SCHEDULES
    MODES: ClassVar[tuple[str, ...]] = MODES
    SCALINGS: ClassVar[tuple[str, ...]] = SCALINGS
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
        check_keys(s, d, cls.field_names() + cls.ALIASES)
        seed = d.get("seed")
        schedule = choice(f"{s}.schedule", d.get("schedule", cls.schedule), cls.SCHEDULES)
        p_L = number(f"{s}.p_L", d.get("p_L", cls.p_L), low=0.0, high=1.0)
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
            rate = number(field, rate, low=0.0, high=1.0, low_open=False, high_open=True)
            p_L, schedule = 1.0 - rate, "timm"
        stagewise = boolean(f"{s}.stagewise", d.get("stagewise", cls.stagewise))
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
            warmup=number(
                f"{s}.warmup", d.get("warmup", cls.warmup), low=0.0, high=1.0, low_open=False
            ),
            mode=choice(f"{s}.mode", d.get("mode", cls.mode), cls.MODES),
            scaling=choice(f"{s}.scaling", d.get("scaling", cls.scaling), cls.SCALINGS),
            seed=None if seed is None else integer(f"{s}.seed", seed, low=0),
        )


@dataclass(frozen=True)
class GateSettings:
    """The typed arguments of the gate a ``stochastic_depth`` edit inserts (the spec's ``mode``,
    ``scaling``, ``seed`` and ``warmup``; the survival p_l and depth l are the edit's own)."""

    mode: str = "row"
    scaling: str = "inverted"
    seed: int | None = None
    warmup: float = 0.0

    @property
    def subset(self) -> bool:
        """An outlined branch runs on the kept rows only (``Edit`` action ``outline``)."""
        return self.mode == "subset"

    def params(self) -> dict[str, Any]:
        """The plan's JSON form: seed and warm-up only when set, so plans read as before."""
        out: dict[str, Any] = {"mode": self.mode, "scaling": self.scaling}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.warmup:
            out["warmup"] = self.warmup
        return out


def plan_stochastic_depth(analysis: Analysis, spec: Any) -> list[Edit]:
    """One edit per residual site. Row mode multiplies the branch by a mask (``wrap_arg``, or an
    existing drop-path module set to the rate); batch and subset modes outline the branch so a
    dropped one is not computed (Huang et al. 2016's saving), unless the owner's code forbids it.
    """
    sites = analysis.residual_sites
    blocks = list(dict.fromkeys(s.block for s in sites))  # first-seen order = execution order
    depth_of = {b: i + 1 for i, b in enumerate(blocks)}
    p_of = block_survivals(blocks, spec.p_L, spec.schedule, stagewise=spec.stagewise)
    settings = GateSettings(spec.mode, spec.scaling, getattr(spec, "seed", None), spec.warmup)
    return [
        _site_edit(
            analysis,
            spec,
            site,
            dict(
                kind=TECHNIQUE.name,
                depth=depth_of[site.block],
                survival=p_of[site.block],
                block=site.block,
                settings=settings,
            ),
        )
        for site in sites
    ]


def _reuses_rate(site: ResidualSite, spec: Any) -> bool:
    """An existing drop-path module can be set to the rate instead of adding a gate."""
    return (
        site.existing_type not in (None, "identity placeholder", "retrofit.StochasticDepthGate")
        and spec.mode == "row"
        and spec.scaling == "inverted"
        and not spec.warmup  # their rate is fixed; a warm-up needs a gate's set_progress
    )


def _site_edit(analysis: Analysis, spec: Any, site: ResidualSite, common: dict[str, Any]) -> Edit:
    """The edit for one residual site: outlined, a reused rate, a gate in the slot, or a gate on
    the branch operand (the first that the site and the spec allow)."""
    refusal = None
    if spec.mode in ("batch", "subset"):
        refusal = analysis.outline_refusal(site, subset=spec.mode == "subset")
        if refusal is None:
            slot = f"; {site.existing_type} {site.existing} " + (
                "left in place"
                if site.existing_type == "identity placeholder"
                else "left in place at rate 0"
            )
            return Edit.at(
                site,
                **common,
                action="outline",
                arg=site.branch_arg,
                target=site.existing,
                note="outlined: a dropped branch is not computed"
                + (slot if site.existing_type else ""),
            )
        refusal = f"not outlined ({refusal}): the branch is masked, no compute saved"
    if _reuses_rate(site, spec):
        return Edit.at(
            site,
            **common,
            action="set_rate",
            target=site.existing,
            note=f"reused {site.existing_type}",
        )
    if site.existing_type:
        note = f"reused the {site.existing_type} slot"
        return Edit.at(
            site,
            **common,
            action="replace_module",
            target=site.existing,
            note=f"{note}; {refusal}" if refusal else note,
        )
    return Edit.at(site, **common, action="wrap_arg", arg=site.branch_arg, note=refusal)


def gate(edit: Edit) -> nn.Module:
    """The layer a ``stochastic_depth`` edit inserts: a gate at the edit's survival p_l."""
    s: GateSettings = edit.settings
    return StochasticDepthGate(
        survival=edit.survival if edit.survival is not None else 1.0,
        mode=s.mode,
        scaling=s.scaling,
        depth=edit.depth,
        seed=s.seed,
        warmup=s.warmup,
        # Names the site for seeded draws: unique per site (a transformer block's two gates
        # share a depth but draw independently) and the same in every process.
        stream=f"{edit.module}:{edit.key}:{edit.ordinal}",
    )


# --- what it reports ---------------------------------------------------------------------------

_ACTIONS = {
    "wrap_arg": "gate on the branch",
    "outline": "gate; branch skipped when dropped",
    "replace_module": "gate in slot {target}",
    "set_rate": "rate set on {target}",
}


def plan_table(edits: Sequence[Edit], model: str) -> list[str]:
    """Each block's depth l and survival p_l (Huang et al. 2016)."""
    s: GateSettings = edits[0].settings
    blocks = len({e.block for e in edits})
    head = (
        f"stochastic depth (Huang et al. 2016): {len(edits)} residual branch(es) in {blocks} "
        f"block(s), mode {s.mode}, scaling {s.scaling}"
    ) + survival_span(edits)
    rows = [
        (
            *depth_cells(e),
            _ACTIONS.get(e.action, e.action).format(target=e.target),
            short_source(e.source),
            e.note or "",
        )
        for e in edits
    ]
    return [head, *table(("l", "p_l", "block", "action", "source", "note"), rows)]


def plan_summary(edits: Sequence[Edit]) -> list[str]:
    blocks = len({e.block for e in edits})
    reused = sum(1 for e in edits if e.action in ("set_rate", "replace_module"))
    parts = [f"{blocks} blocks (L={blocks}), {reused} existing drop-path slots reused"]
    outlined = sum(1 for e in edits if e.action == "outline")
    if outlined:
        parts.append(f"{outlined} branches outlined (skipped when dropped)")
    return parts


def _means(rates: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    kept = [float(r["kept_fraction"]) for r in rates if r.get("kept_fraction") is not None]
    out = {
        "sd_survival": mean([float(r["survival"]) for r in rates]),
        "sd_planned": mean([float(r.get("target_survival", r["survival"])) for r in rates]),
        "sd_kept": mean(kept),
    }
    return {k: v for k, v in out.items() if v is not None}


def _planned(edits: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    survival = [e["survival"] for e in edits if e.get("survival") is not None]
    return {"sd_planned": sum(survival) / len(survival)} if survival else {}


def _parts(values: Mapping[str, Any]) -> list[str]:
    """``kept 0.93 (planned 0.95), survival 0.95`` (the parts that exist)."""
    parts = []
    if values.get("sd_kept") is not None:
        planned = values.get("sd_planned")
        parts.append(
            f"kept {values['sd_kept']:.2f}"
            + (f" (planned {planned:.2f})" if planned is not None else "")
        )
    if values.get("sd_survival") is not None:
        parts.append(f"survival {values['sd_survival']:.2f}")
    return parts


def _plot(rate: Mapping[str, Any]) -> dict[str, Any]:
    # The planned p_l: under a warm-up the current survival starts at 1.
    planned = rate.get("target_survival", rate.get("survival"))
    return {"kind": rate["kind"], "depth": rate.get("depth"), "survival": planned}


@contextmanager
def paper_scaling_neutral(model: nn.Module) -> Iterator[None]:
    """Gates with ``scaling="paper"`` scale the branch by p_l in eval *by design*
    (H = ReLU(p_l·f_l + id)); verification checks the rewrite with them at p_l = 1."""
    saved = []
    for m in model.modules():
        if isinstance(m, StochasticDepthGate) and m.scaling == "paper":
            saved.append((m, m.survival))
            m.survival = 1.0
    try:
        yield
    finally:
        for m, p in saved:
            m.survival = p


@contextmanager
def forced_paths(gates: list[StochasticDepthGate], keep: bool) -> Iterator[None]:
    """Every batch-mode gate in ``gates`` takes its kept (``keep=True``) or dropped path on each
    training call, whatever its draw, through the gate's own ``forced`` attribute (eager and
    compiled alike). Row- and subset-mode gates decide per row: at p_l = ½ on the kept pass one
    step takes both paths on a batch of two or more (the branch runs on every row in row mode,
    on at least one in subset mode, so whatever it calls is called); on the dropped pass they
    keep every row."""
    saved = [(g, g.survival, g.forced) for g in gates]
    try:
        for g in gates:
            if g.mode == "batch":
                g.forced = keep
            else:
                _set_survival(g, 0.5 if keep else 1.0)
        yield
    finally:
        for g, survival, forced in saved:
            g.forced = forced
            g.survival = survival


def _set_survival(gate: StochasticDepthGate, value: float) -> None:
    if isinstance(gate.survival, torch.Tensor):
        with torch.no_grad():
            gate.survival.fill_(value)
    else:
        gate.survival = value


def liveness_paths(model: nn.Module) -> list[tuple[str, list[nn.Module], Any]]:
    """The training passes verification runs (``retrofit.verify.checks.Path``): every branch
    kept first (it runs every branch, so gates nested in a branch are reached), then, only when
    a batch-mode gate has a dropped path the kept pass does not take, every branch dropped
    (cheap: no branch runs)."""
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    if not gates:
        return []
    paths = [("every stochastic-depth branch kept", gates, lambda: forced_paths(gates, True))]
    if any(g.mode == "batch" for g in gates):
        paths.append(
            ("every stochastic-depth branch dropped", gates, lambda: forced_paths(gates, False))
        )
    return paths


def _skips_branches(spec: Any, model: nn.Module) -> bool:
    """Batch mode outlines the branch and, when it drops it, does not run it: its parameters
    get no gradient in that step (``retrofit.train.distributed.needs_find_unused``)."""
    if spec is not None and spec.mode == "batch":
        return True
    return any(isinstance(m, StochasticDepthGate) and m.mode == "batch" for m in model.modules())


TECHNIQUE = Technique(
    name="stochastic_depth",
    parse=StochasticDepthSpec.parse,
    spec=StochasticDepthSpec,
    fields=StochasticDepthSpec.field_names() + StochasticDepthSpec.ALIASES,
    planner=plan_stochastic_depth,
    layer=gate,
    layer_class=StochasticDepthGate,
    actions=("wrap_arg", "outline", "replace_module", "set_rate"),
    table=plan_table,
    summary=plan_summary,
    figures=Figures(
        means=_means,
        planned=_planned,
        parts=_parts,
        logged={"sd_kept": "mean"},
        plot=_plot,
        per_depth=True,
    ),
    neutral=paper_scaling_neutral,
    liveness=liveness_paths,
    unused_parameters=_skips_branches,
)
