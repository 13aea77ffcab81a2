"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth", ECCV).

The ``stochastic_depth:`` section, its planner (one edit per residual site of
``analysis/residual.py``, survival p_l from ``retrofit.schedule``) and its layer
(``retrofit.layers.StochasticDepthGate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from retrofit.edit import Edit
from retrofit.errors import RecipeError
from retrofit.layers import StochasticDepthGate
from retrofit.schedule import block_survivals
from retrofit.spec import Spec, boolean, check_keys, choice, integer, number
from retrofit.techniques.record import Technique

if TYPE_CHECKING:
    from retrofit.analysis.context import Analysis

__all__ = ["StochasticDepthSpec", "TECHNIQUE", "gate", "plan_stochastic_depth"]


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


def plan_stochastic_depth(analysis: Analysis, spec: Any) -> list[Edit]:
    """One edit per residual site. Row mode multiplies the branch by a mask (``wrap_arg``, or an
    existing drop-path module set to the rate); batch and subset modes outline the branch so a
    dropped one is not computed (Huang et al. 2016's saving), unless the owner's code forbids it.
    """
    sites = analysis.residual_sites
    blocks = list(dict.fromkeys(s.block for s in sites))  # first-seen order = execution order
    depth_of = {b: i + 1 for i, b in enumerate(blocks)}
    p_of = block_survivals(blocks, spec.p_L, spec.schedule, stagewise=spec.stagewise)
    edits = []
    for site in sites:
        depth = depth_of[site.block]
        p = p_of[site.block]
        params: dict[str, Any] = {"mode": spec.mode, "scaling": spec.scaling}
        if getattr(spec, "seed", None) is not None:
            params["seed"] = spec.seed
        if spec.warmup:
            params["warmup"] = spec.warmup
        common = dict(
            kind="stochastic_depth",
            depth=depth,
            survival=p,
            block=site.block,
            params=params,
        )
        reuse_rate = (
            site.existing_type not in (None, "identity placeholder", "retrofit.StochasticDepthGate")
            and spec.mode == "row"
            and spec.scaling == "inverted"
            and not spec.warmup  # their rate is fixed; a warm-up needs a gate's set_progress
        )
        refusal = None
        if spec.mode in ("batch", "subset"):
            refusal = analysis.outline_refusal(site, subset=spec.mode == "subset")
            if refusal is None:
                slot = f"; {site.existing_type} {site.existing} " + (
                    "left in place"
                    if site.existing_type == "identity placeholder"
                    else "left in place at rate 0"
                )
                edits.append(
                    Edit.at(
                        site,
                        **common,
                        action="outline",
                        arg=site.branch_arg,
                        target=site.existing,
                        note="outlined: a dropped branch is not computed"
                        + (slot if site.existing_type else ""),
                    )
                )
                continue
            refusal = f"not outlined ({refusal}): the branch is masked, no compute saved"
        if reuse_rate:
            edits.append(
                Edit.at(
                    site,
                    **common,
                    action="set_rate",
                    target=site.existing,
                    note=f"reused {site.existing_type}",
                )
            )
        elif site.existing_type:
            note = f"reused the {site.existing_type} slot"
            edits.append(
                Edit.at(
                    site,
                    **common,
                    action="replace_module",
                    target=site.existing,
                    note=f"{note}; {refusal}" if refusal else note,
                )
            )
        else:
            edits.append(
                Edit.at(site, **common, action="wrap_arg", arg=site.branch_arg, note=refusal)
            )
    return edits


def gate(edit: Edit) -> nn.Module:
    """The layer a ``stochastic_depth`` edit inserts: a gate at the edit's survival p_l."""
    return StochasticDepthGate(
        survival=edit.survival if edit.survival is not None else 1.0,
        mode=edit.params.get("mode", "row"),
        scaling=edit.params.get("scaling", "inverted"),
        depth=edit.depth,
        seed=edit.params.get("seed"),
        warmup=edit.params.get("warmup", 0.0),
        # Names the site for seeded draws: unique per site (a transformer block's two gates
        # share a depth but draw independently) and the same in every process.
        stream=f"{edit.module}:{edit.key}:{edit.ordinal}",
    )


TECHNIQUE = Technique(
    name="stochastic_depth",
    parse=StochasticDepthSpec.parse,
    fields=StochasticDepthSpec.field_names() + StochasticDepthSpec.ALIASES,
    planner=plan_stochastic_depth,
    layer=gate,
)
