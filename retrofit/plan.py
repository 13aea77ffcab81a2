"""Sites + recipe → a Plan: the list of edits a rewrite will make. The dry run is a plan.

Each technique has a planner: a function ``(analysis, spec) -> list[Edit]`` registered in
``PLANNERS`` under its recipe section name. Planners read the analysis (traced graphs and the
sites found in them) and never touch the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch.fx as fx
from torch import nn

from retrofit.fixes import plan_dropout_fix, plan_uout
from retrofit.graph.dataflow import locate
from retrofit.graph.outline import NotOutlinable, branch_region
from retrofit.graph.residual import ResidualSite, find_residual_sites
from retrofit.graph.trace import Skipped, TraceResult, trace, trace_module
from retrofit.placement import plan_dropblock
from retrofit.recipe import Recipe, load_recipe

__all__ = ["Analysis", "Edit", "Plan", "PLANNERS", "plan", "survival"]


@dataclass
class Edit:
    """One change to the model.

    ``kind`` names the regularizer (``"stochastic_depth"``, ``"dropblock"``, ``"uout"`` …),
    ``module`` the module whose forward owns the site (``""`` for the root), ``node`` the fx node
    at the site. ``action`` says how the rewrite makes it:

    * ``"wrap_arg"``: wrap argument ``arg`` of the located node with a new module (a gate on the
      branch operand of a residual add);
    * ``"insert_after"``: feed the located node's output through a new module (DropBlock after a
      stage);
    * ``"replace_call"``: call a new module instead of the located function node;
    * ``"replace_module"``: swap the child module ``target`` for a new one (an ``nn.Identity``
      drop-path placeholder, a misplaced Dropout);
    * ``"set_rate"``: set the rate of the existing regularizer ``target`` (timm's DropPath,
      torchvision's StochasticDepth) — no second gate;
    * ``"outline"``: stochastic depth in batch/subset mode that skips the dropped branch's
      compute. In the owner's training graph the residual branch (operand ``arg`` of the located
      add) moves into a function the gate calls only when it keeps the branch, and the add becomes
      ``gate(shortcut, *inputs)``; the eval graph gets ``wrap_arg``. ``target``, if set, is an
      existing drop-path slot inside the branch: it stays in place at rate 0.

    ``key``/``ordinal`` locate the node again when the owner is re-traced on its own.
    """

    kind: str
    module: str
    node: str
    action: str
    key: str = ""
    ordinal: int = 0
    arg: int | None = None
    target: str | None = None
    source: str | None = None
    depth: int | None = None
    survival: float | None = None
    block: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    note: str | None = None

    @classmethod
    def at(cls, site: Any, **fields: Any) -> Edit:
        """An edit located at ``site``: anything with ``owner``, ``node``, ``key``, ``ordinal``
        and ``source`` (a residual site, a dropout site, a stage's call site, a head place)."""
        return cls(
            module=site.owner,
            node=site.node,
            key=site.key,
            ordinal=site.ordinal,
            source=site.source,
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}


@dataclass
class Analysis:
    """What planners read: the traced model, lazily computed site lists."""

    model: nn.Module
    traced: TraceResult
    _owner_graphs: dict[str, fx.GraphModule | None] = field(default_factory=dict, repr=False)

    @cached_property
    def residual_sites(self) -> list[ResidualSite]:
        return find_residual_sites(self.traced)

    def owner_graph(self, owner: str) -> fx.GraphModule | None:
        """The owner's own forward traced in training mode with its children as leaves — the
        graph the rewrite edits — or None if it cannot be traced (the rewrite then reports it)."""
        if owner not in self._owner_graphs:
            module = self.model.get_submodule(owner)
            saved = module.training
            module.training = True
            try:
                self._owner_graphs[owner] = trace_module(module, shallow=True)
            except Exception:  # fx raises many types; the rewrite will raise the same, with context
                self._owner_graphs[owner] = None
            finally:
                module.training = saved
        return self._owner_graphs[owner]

    def outline_refusal(self, site: ResidualSite, *, subset: bool) -> str | None:
        """Why ``site``'s branch cannot be outlined (see retrofit.graph.outline), or None."""
        gm = self.owner_graph(site.owner)
        if gm is None:
            return None
        modules = dict(self.model.get_submodule(site.owner).named_modules())
        try:
            add = locate(gm.graph, site.key, site.ordinal)
            branch_region(gm.graph, add, site.branch_arg, modules=modules, subset=subset)
        except NotOutlinable as e:
            return str(e)
        except LookupError:
            return None  # the rewrite locates it again and reports a mismatch
        return None


def survival(depth: int, num_blocks: int, p_L: float, schedule: str = "linear") -> float:
    """Survival probability of block ``depth`` (1-based) of ``num_blocks``.

    Huang et al. 2016, linear decay rule: p_l = 1 − (l/L)(1 − p_L), so p_0 = 1 (the input is
    always kept) and the last block survives with p_L. ``uniform`` gives every block p_L.
    """
    if schedule == "uniform":
        return p_L
    return 1.0 - (depth / num_blocks) * (1.0 - p_L)


def plan_stochastic_depth(analysis: Analysis, spec: Any) -> list[Edit]:
    """One edit per residual site. Row mode multiplies the branch by a mask (``wrap_arg``, or an
    existing drop-path module set to the rate); batch and subset modes outline the branch so a
    dropped one is not computed (Huang et al. 2016's saving), unless the owner's code forbids it.
    """
    sites = analysis.residual_sites
    blocks = list(dict.fromkeys(s.block for s in sites))  # first-seen order = execution order
    depth_of = {b: i + 1 for i, b in enumerate(blocks)}
    edits = []
    for site in sites:
        depth = depth_of[site.block]
        p = survival(depth, len(blocks), spec.p_L, spec.schedule)
        params: dict[str, Any] = {"mode": spec.mode, "scaling": spec.scaling}
        if getattr(spec, "seed", None) is not None:
            params["seed"] = spec.seed
        common = dict(
            kind="stochastic_depth",
            depth=depth,
            survival=p,
            block=site.block,
            params=params,
        )
        reuse_rate = (
            site.existing_type in ("timm.DropPath", "torchvision.StochasticDepth")
            and spec.mode == "row"
            and spec.scaling == "inverted"
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


Planner = Callable[[Analysis, Any], list[Edit]]
PLANNERS: dict[str, Planner] = {
    "stochastic_depth": plan_stochastic_depth,
    "dropblock": plan_dropblock,
    "uout": plan_uout,
    "dropout_fix": plan_dropout_fix,
}


@dataclass
class Plan:
    model: str
    edits: list[Edit]
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)

    def by_kind(self, kind: str) -> list[Edit]:
        return [e for e in self.edits if e.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "edits": [e.to_dict() for e in self.edits],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
            "recipe": self.recipe,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for e in self.edits:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        parts = [f"{n} {k}" for k, n in counts.items()] or ["no edits"]
        sd = self.by_kind("stochastic_depth")
        if sd:
            blocks = len({e.block for e in sd})
            reused = sum(1 for e in sd if e.action in ("set_rate", "replace_module"))
            parts.append(f"{blocks} blocks (L={blocks}), {reused} existing drop-path slots reused")
            outlined = sum(1 for e in sd if e.action == "outline")
            if outlined:
                parts.append(f"{outlined} branches outlined (skipped when dropped)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} module(s) not traceable (see skipped)")
        return f"{self.model}: " + ", ".join(parts)

    def table(self) -> str:
        """A readable table per technique (rendered by :mod:`retrofit.report`)."""
        from retrofit.report import plan_table

        return plan_table(self)

    def __str__(self) -> str:
        return self.table()


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _short_source(source: str | None) -> str:
    if not source:
        return ""
    path, _, line = source.rpartition(":")
    parts = path.split("/")
    return "/".join(parts[-2:]) + ":" + line


def analyse(model: nn.Module) -> Analysis:
    return Analysis(model, trace(model))


def plan(
    model: nn.Module, recipe: Recipe | dict | str | None, *, analysis: Analysis | None = None
) -> Plan:
    """What ``apply`` would do to ``model`` with ``recipe``, without doing it.

    Works on the meta device: tracing and site finding need no weights.
    """
    recipe = load_recipe(recipe)
    analysis = analysis or analyse(model)
    edits: list[Edit] = []
    notes: list[str] = []
    for section, planner in PLANNERS.items():
        spec = getattr(recipe, section, None)
        if spec is None:
            continue
        found = planner(analysis, spec)
        if not found:
            notes.append(f"{section}: no sites found in {type(model).__name__}")
        edits.extend(found)
    if recipe.cutout is not None:
        # Cutout acts on the input images, not on the graph: nothing to rewrite.
        notes.append(
            f"cutout: n_holes={recipe.cutout.n_holes}, length={recipe.cutout.length} is applied to "
            "each training batch by the trainer (retrofit.layers.BatchCutout in your own loop)"
        )
    return Plan(
        model=type(model).__name__,
        edits=edits,
        skipped=list(analysis.traced.skipped),
        notes=notes,
        recipe=recipe.to_dict(),
    )
