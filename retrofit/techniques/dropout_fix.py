"""``dropout_fix: after_last_bn`` (Li et al. 2019, and where torchvision/timm put ``drop_rate``):
remove the dropouts that reach a BatchNorm and put one Dropout after the last BN."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from retrofit.analysis.dataflow import DataFlow
from retrofit.analysis.dropout_bn import (
    DROPOUT_MODULES,
    PartFlow,
    is_dropout_module,
    locators,
    node_label,
    node_place,
)
from retrofit.capture.trace import TraceResult
from retrofit.edit import Edit
from retrofit.spec import choice
from retrofit.techniques.dropout_sites import replace, replaced, why
from retrofit.techniques.record import Technique
from retrofit.techniques.table import num, short_source, table, where

if TYPE_CHECKING:
    from retrofit.analysis.context import Analysis

__all__ = [
    "DROPOUT_FIXES",
    "DropoutFixSettings",
    "HeadPlace",
    "TECHNIQUE",
    "dropout_fix_layer",
    "find_head_place",
    "plan_dropout_fix",
]

DROPOUT_FIXES = ("after_last_bn",)
ROLES = ("remove", "insert")


@dataclass(frozen=True)
class DropoutFixSettings:
    """The typed arguments of what a ``dropout_fix`` edit inserts: ``role`` ``remove`` (an
    nn.Identity where a flagged dropout was) or ``insert`` (the one Dropout(p) after the last
    BN)."""

    role: str
    p: float | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"dropout_fix role has to be one of {ROLES}, but got {self.role!r}")

    def params(self) -> dict[str, Any]:
        return {"role": self.role} if self.p is None else {"role": self.role, "p": self.p}


def plan_dropout_fix(analysis: Analysis, spec: str) -> list[Edit]:
    """``dropout_fix: after_last_bn``: remove the flagged dropouts, add one after the last BN.

    Each dropout that reaches a BatchNorm becomes an ``nn.Identity``; one ``nn.Dropout`` with
    their p (the largest, if they differ) goes on the classifier's input when no BN comes after
    it — into an existing ``Identity``/``Dropout(0)`` slot there, else wrapped around the
    classifier's argument. If an active dropout already sits there it is kept. When the graph has
    no such place, the dropouts are still removed and the first edit's note says why.
    """

    if spec != "after_last_bn":
        raise ValueError(f"dropout_fix has to be 'after_last_bn', but got {spec!r}")
    result = analysis.dropout_bn
    edits: list[Edit] = []
    done: set[str] = set()
    rates: list[float] = []
    for site in result.flagged():
        edit = replace(
            site,
            TECHNIQUE.name,
            DropoutFixSettings("remove"),
            f"removed {site.op}(p={site.p}): {why(result, site)}",
            done,
        )
        if edit is not None:
            edits.append(edit)
            rates.append(0.5 if site.p is None else site.p)
    if not edits:
        return edits
    p = max(rates)
    mixed = "" if len(set(rates)) == 1 else f" (largest of p = {sorted(set(rates))})"
    place = find_head_place(analysis.traced_training)
    if isinstance(place, str):
        edits[0].note = f"{edits[0].note}; no place after the last BN before a classifier: {place}"
        return edits
    if place.action == "existing":
        edits[0].note = (
            f"{edits[0].note}; the classifier {place.classifier} already has Dropout(p={place.p}) "
            f"{place.target} on its input, after the last BN: nothing added"
        )
        return edits
    edits.append(_insert(place, p, mixed))
    return edits


# --- where the one Dropout goes: after the last BN, before the classifier -------------------


@dataclass
class HeadPlace:
    """Where one Dropout can go after the last BN and before the classifier.

    ``action`` is ``"replace_module"`` (an existing ``nn.Identity`` / ``Dropout(p=0)`` slot
    feeding the classifier, ``target`` names it), ``"wrap_arg"`` (feed the classifier's input
    through a new module; ``owner``/``node``/``key``/``ordinal`` locate the classifier call) or
    ``"existing"`` (an active dropout already sits there: nothing to add).
    """

    action: str
    classifier: str
    owner: str
    node: str
    key: str
    ordinal: int
    source: str | None
    target: str | None = None
    p: float | None = None


def find_head_place(traced: TraceResult) -> HeadPlace | str:
    """The classifier's input, if no running-stat norm lies after it; else the reason (a str).

    The classifier is the last learned map (Linear, conv, F.linear, matmul) the model output
    depends on; a dropout on its input is after every BN when no BN is downstream of that input
    — which is where torchvision and timm put their own ``drop_rate``/``head_drop`` dropouts.
    """
    root = next((p for p in traced.parts if p.prefix == ""), None)
    if root is None:
        return "the model's own forward could not be traced, so its classifier is not known"
    gm = root.graph_module
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if not outputs:
        return "the traced graph has no output"
    flow = DataFlow.of(gm)
    region = flow.anc(outputs[0]) & flow.weighted_mask
    if not region:
        return "no learned map (Linear, conv) feeds the output"
    classifier = flow.nodes[region.bit_length() - 1]  # the topologically last one
    label = node_label(root, classifier)
    feat = classifier.args[0] if classifier.args else None
    if not isinstance(feat, fx.Node):
        return f"the classifier {label} takes no tensor as its first argument"
    part_flow = PartFlow(root)
    below = part_flow.downstream(feat) + ([classifier] if classifier in part_flow.norm else [])
    if below:
        return (
            f"a BatchNorm ({part_flow.norm[below[0]][0]}) comes after the input of the classifier "
            f"{label}"
        )
    common = dict(node_place(root, classifier, locators(root)), classifier=label)
    slot = part_flow.module_of(feat)
    if slot is not None:
        calls = sum(1 for n in part_flow.nodes if n.op == "call_module" and n.target == feat.target)
        if is_dropout_module(slot):
            return HeadPlace("existing", target=node_label(root, feat), p=float(slot.p), **common)
        empty = isinstance(slot, nn.Identity) or (
            isinstance(slot, DROPOUT_MODULES) and float(slot.p) == 0.0
        )
        if empty and calls == 1 and len(feat.users) == 1:
            return HeadPlace("replace_module", target=node_label(root, feat), **common)
    return HeadPlace("wrap_arg", **common)


def _insert(place: HeadPlace, p: float, mixed: str) -> Edit:

    common = dict(kind=TECHNIQUE.name, settings=DropoutFixSettings("insert", p))
    note = f"Dropout(p={p}){mixed} after the last BN, on the input of {place.classifier}"
    if place.action == "replace_module":
        return Edit.at(
            place,
            **common,
            action="replace_module",
            target=place.target,
            note=note + f" (reuses the empty slot {place.target})",
        )
    return Edit.at(place, **common, action="wrap_arg", arg=0, note=note)


def dropout_fix_layer(edit: Edit) -> nn.Module:
    """The layer a ``dropout_fix`` edit inserts: Identity for a removed dropout, Dropout(p) for the
    one after the last BN."""
    s: DropoutFixSettings = edit.settings
    if s.role == "remove":
        return nn.Identity()
    assert s.p is not None
    return nn.Dropout(s.p)


def plan_table(edits: Sequence[Edit], model: str) -> list[str]:
    """What the fix removes and where it puts the one dropout it keeps (Li et al. 2019)."""
    removed = [e for e in edits if e.settings.role == "remove"]
    added = [e for e in edits if e.settings.role == "insert"]
    head = (
        f"dropout fix after_last_bn (Li et al. 2019): removes {len(removed)} dropout(s) that "
        f"reach a BatchNorm, adds {len(added)} after the last one"
    )
    rows = []
    for e in edits:
        if e.settings.role == "insert":
            what = f"add Dropout(p={num(e.settings.p)})"
            at = e.target or f"{where(e, model)}:{e.node}"
        else:
            what, at = "remove", replaced(e)
        rows.append((what, at, short_source(e.source), e.note or ""))
    return [head, *table(("action", "module / call", "source", "note"), rows)]


def parse(value: Any) -> str | None:
    """The ``dropout_fix:`` value: one of :data:`DROPOUT_FIXES`, or null/absent."""
    return None if value is None else choice("dropout_fix", value, DROPOUT_FIXES)


TECHNIQUE = Technique(
    name="dropout_fix",
    parse=parse,
    planner=plan_dropout_fix,
    layer=dropout_fix_layer,
    actions=("replace_module", "replace_call", "wrap_arg"),
    table=plan_table,
    excludes={"uout": "'uout' replaces them and 'dropout_fix' removes them; keep one of the two"},
)
