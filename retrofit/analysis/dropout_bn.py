"""Dropout → BatchNorm paths: where Li et al. (CVPR 2019) "variance shift" can happen.

Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019 (arXiv:1801.05134). In training, inverted Dropout with keep rate q
scales the variance of what it passes on by about 1/q; a BatchNorm downstream accumulates that
inflated variance in ``running_var``. At test time Dropout is off, the real variance is lower,
and BN normalises with the wrong statistics; the error compounds through later layers.

The rule, one pure pass over each traced graph (no rewriting here):

* A **dropout site** is an ``nn.Dropout``/``Dropout1d/2d/3d`` module call or a functional
  ``F.dropout``/``dropout1d/2d/3d`` (``torch.dropout``, ``torch.feature_dropout``) call with
  p > 0 that is active in training. The graph is traced with every module in training mode, so
  ``F.dropout(x, p, self.training)`` shows up as active and a literal ``training=False`` does not.
* A **victim** is a norm that normalises with batch statistics in training and running
  statistics in eval: any ``_NormBase`` with ``track_running_stats=True`` (BatchNorm1d/2d/3d,
  SyncBatchNorm, lazy variants, timm's BatchNormAct2d and friends, InstanceNorm with running
  stats), or a functional ``batch_norm`` fed running buffers with ``training=True``.
  FrozenBatchNorm2d, LayerNorm, GroupNorm and norms without running stats always use the same
  statistics in both modes, so no shift reaches their output through them.
* A finding is a pair (site, victim) such that the victim is reachable from the site through
  data edges **without passing through another victim-type norm**: the first BN on each path
  absorbs the shift into its running statistics; the BNs after it are counted as "downstream".

Reading ``x.shape`` is not a data edge (a mask built from a shape carries no values).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from retrofit.analysis.dataflow import node_key
from retrofit.capture.concrete import is_metadata
from retrofit.capture.trace import TracedPart, TraceResult

__all__ = [
    "DROPOUT_MODULES",
    "DropoutBNAnalysis",
    "DropoutBNPair",
    "DropoutSite",
    "PartFlow",
    "find_dropout_bn",
    "is_dropout_module",
    "is_running_stat_norm",
    "locators",
    "node_label",
    "node_place",
]

# Functional dropouts and where their p / training arguments sit: (p index, training index,
# training keyword, training default). ``F.*`` default to training=True; ``torch.dropout`` has no
# default. Alpha dropout is left out: it keeps SELU's self-normalising statistics on purpose.
_DROPOUT_FUNCTIONS: dict[object, tuple[int, int, str, bool | None]] = {
    F.dropout: (1, 2, "training", True),
    F.dropout1d: (1, 2, "training", True),
    F.dropout2d: (1, 2, "training", True),
    F.dropout3d: (1, 2, "training", True),
    torch.dropout: (1, 2, "train", None),
    torch.feature_dropout: (1, 2, "train", None),
}
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# F.batch_norm(input, running_mean, running_var, weight, bias, training=False, ...) and the aten
# form torch.batch_norm(input, weight, bias, running_mean, running_var, training, ...):
# (running_mean index, training index, training default).
_BATCH_NORM_FUNCTIONS: dict[object, tuple[int, int, bool]] = {
    F.batch_norm: (1, 5, False),
    torch.batch_norm: (3, 5, False),
}
_FUNCTION_NAMES = {
    F.dropout: "F.dropout",
    F.dropout1d: "F.dropout1d",
    F.dropout2d: "F.dropout2d",
    F.dropout3d: "F.dropout3d",
    torch.dropout: "torch.dropout",
    torch.feature_dropout: "torch.feature_dropout",
}


# --- what is a dropout, what is a victim -------------------------------------------------------


def is_running_stat_norm(module: nn.Module) -> bool:
    """A norm that uses batch statistics in training and running statistics in eval.

    ``_NormBase`` covers BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants, timm's
    BatchNormAct2d/SyncBatchNormAct (subclasses of BatchNorm2d) and InstanceNorm; only those
    that track running statistics switch statistics between modes. FrozenBatchNorm2d,
    LayerNorm and GroupNorm are not ``_NormBase``.
    """
    return isinstance(module, nn.modules.batchnorm._NormBase) and bool(module.track_running_stats)


def is_dropout_module(module: nn.Module) -> bool:
    """``nn.Dropout``/``Dropout1d/2d/3d`` (and subclasses) with p > 0."""
    return isinstance(module, DROPOUT_MODULES) and float(module.p) > 0.0


def _structured_rate(module: nn.Module) -> float | None:
    """Drop rate of a structured regularizer (DropPath, StochasticDepth, DropBlock), else None.

    Only used with ``include_structured=True``; the issue keeps them out of the default rule
    because they drop whole residual branches or blocks, a different variance story.
    """
    name = type(module).__name__
    if name in ("DropPath", "DropBlock2d", "DropBlock3d"):
        return float(getattr(module, "drop_prob", getattr(module, "p", 0.0)))
    if name == "StochasticDepth":
        return float(module.p)
    if name == "StochasticDepthGate":
        return 1.0 - float(module.survival)
    if name == "DropBlock":
        return 1.0 - float(module.keep_prob)
    return None


def _arg(node: fx.Node, index: int, keyword: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(keyword, default)


def _functional_dropout(node: fx.Node) -> tuple[str, float | None] | None:
    """(op name, p) of an active functional dropout call; None if it is not one.

    p may be computed from the input (a node): then it is unknown (None) and counted as active.
    """
    if node.op != "call_function" or node.target not in _DROPOUT_FUNCTIONS:
        return None
    p_index, t_index, t_keyword, t_default = _DROPOUT_FUNCTIONS[node.target]
    p = _arg(node, p_index, "p", 0.5)
    training = _arg(node, t_index, t_keyword, t_default)
    if training is False:
        return None  # a literal training=False never drops (self.training was traced as True)
    if isinstance(p, int | float):
        if float(p) <= 0.0:
            return None
        return _FUNCTION_NAMES[node.target], float(p)
    return _FUNCTION_NAMES[node.target], None


def _functional_norm(node: fx.Node) -> bool:
    """A functional batch norm that uses batch stats now and running stats in eval."""
    if node.op != "call_function" or node.target not in _BATCH_NORM_FUNCTIONS:
        return False
    rm_index, t_index, t_default = _BATCH_NORM_FUNCTIONS[node.target]
    running_mean = _arg(node, rm_index, "running_mean", None)
    training = _arg(node, t_index, "training", t_default)
    return running_mean is not None and training is not False


# --- naming -----------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    if not name:
        return prefix
    return f"{prefix}.{name}" if prefix else name


def node_label(part: TracedPart, node: fx.Node) -> str:
    """How a node is named in findings and paths.

    A module call is the called module's qualified name; anything else is ``owner:op`` (the
    module whose forward runs it, ``<root>`` for the model itself, and the function or method,
    e.g. ``features.denseblock1.denselayer1:F.dropout``), which is how a functional dropout is
    pointed at.
    """
    if node.op == "call_module":
        return _join(part.prefix, str(node.target))
    owner = node.meta.get("owner", part.prefix)
    if node.op == "call_function":
        what = _FUNCTION_NAMES.get(node.target) or getattr(node.target, "__name__", node.name)
    elif node.op == "call_method":
        what = f".{node.target}"
    else:
        what = node.name
    return f"{owner or '<root>'}:{what}"


def locators(part: TracedPart) -> dict[fx.Node, tuple[str, int]]:
    """``(node_key, ordinal)`` of every node of ``part``: how a rewrite finds it again.

    The ordinal counts nodes with the same key *owned by the same module*, in topological order,
    so it matches a shallow re-trace of that owner (see ``retrofit.analysis.dataflow.locate``).
    """
    out: dict[fx.Node, tuple[str, int]] = {}
    counts: dict[tuple[str, str], int] = {}
    for node in part.graph_module.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = node_key(node)
        slot = (node.meta.get("owner_local", ""), key)
        out[node] = (key, counts.get(slot, 0))
        counts[slot] = counts.get(slot, 0) + 1
    return out


def node_place(
    part: TracedPart, node: fx.Node, where: dict[fx.Node, tuple[str, int]]
) -> dict[str, Any]:
    """How an edit finds ``node`` again (``owner``, ``node``, ``key``, ``ordinal``, from
    ``where = locators(part)``) and its ``source`` line."""
    key, ordinal = where[node]
    return dict(
        owner=node.meta.get("owner", part.prefix),
        node=node.name,
        key=key,
        ordinal=ordinal,
        source=node.meta.get("source"),
    )


# --- results ----------------------------------------------------------------------------------


@dataclass
class DropoutSite:
    """An active dropout in a traced graph.

    ``kind`` is ``"module"`` (an ``nn.Dropout*`` call; ``module`` is its qualified name),
    ``"function"`` (an ``F.dropout*`` call; ``owner`` + ``node`` locate it) or ``"inside"`` (a
    dropout inside a module the tracer keeps opaque; the site is that module's output).
    """

    name: str
    kind: str
    op: str
    p: float | None
    owner: str
    node: str
    part: str
    module: str | None = None
    key: str = ""
    ordinal: int = 0
    source: str | None = None
    note: str | None = None
    fixable: bool = True  # a rewrite can replace it (a module, or a call with a positional input)


@dataclass
class DropoutBNPair:
    """One finding: ``site`` reaches the norm ``norm`` along ``path`` without crossing another."""

    site: DropoutSite
    norm: str
    path: list[str]
    norm_source: str | None
    downstream: tuple[str, ...] = ()  # running-stat norms after ``norm`` (the shift carries on)
    note: str | None = None


@dataclass
class DropoutBNAnalysis:
    """Every active dropout site, the (site, victim) pairs, and what could not be checked."""

    sites: list[DropoutSite] = field(default_factory=list)
    pairs: list[DropoutBNPair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flagged(self) -> list[DropoutSite]:
        """Sites with at least one victim, in graph order, each once."""
        seen: dict[int, DropoutSite] = {}
        for pair in self.pairs:
            seen.setdefault(id(pair.site), pair.site)
        return list(seen.values())


# --- the pass ---------------------------------------------------------------------------------


class PartFlow:
    """Victim tests and forward reachability over one part's graph: ``norm`` maps every
    running-stat norm node to its (victim name, note), :meth:`search` finds the first norms a
    node reaches, :meth:`downstream` every norm below it."""

    def __init__(self, part: TracedPart):
        self.part = part
        self.modules = dict(part.module.named_modules())
        self.nodes = list(part.graph_module.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.norm: dict[fx.Node, tuple[str, str | None]] = {}
        for node in self.nodes:
            found = self._norm_of(node)
            if found is not None:
                self.norm[node] = found
        self._below: dict[fx.Node, int] | None = None

    def module_of(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def _norm_of(self, node: fx.Node) -> tuple[str, str | None] | None:
        """(victim name, note) if ``node`` is a running-stat norm, else None."""
        module = self.module_of(node)
        if module is not None:
            if is_running_stat_norm(module):
                return _join(self.part.prefix, str(node.target)), None
            if is_dropout_module(module) or _structured_rate(module) is not None:
                return None
            # A leaf the tracer keeps opaque (timm no-trace modules): a norm inside it is hit
            # first among its norms in registration order, which is the best a leaf lets us see.
            for name, inner in module.named_modules():
                if name and is_running_stat_norm(inner):
                    qual = _join(_join(self.part.prefix, str(node.target)), name)
                    return qual, f"inside {_join(self.part.prefix, str(node.target))}, not traced"
            return None
        if _functional_norm(node):
            owner_local = node.meta.get("owner_local", "")
            owner = self.modules.get(owner_local)
            # timm-style BN subclasses traced through call F.batch_norm on their own buffers:
            # the module is the victim, named like any BN.
            if owner is not None and owner_local and is_running_stat_norm(owner):
                return _join(self.part.prefix, owner_local), None
            return node_label(self.part, node), None
        return None

    def users(self, node: fx.Node) -> Iterator[fx.Node]:
        for user in node.users:
            if not is_metadata(user):
                yield user

    def search(self, start: fx.Node) -> tuple[list[tuple[fx.Node, list[fx.Node]]], bool]:
        """Victims reachable from ``start`` without crossing a victim-type norm, with a
        shortest path to each; and whether the dropout's output leaves the graph."""
        parent: dict[fx.Node, fx.Node | None] = {start: None}
        queue = deque([start])
        victims: list[fx.Node] = []
        escapes = False
        while queue:
            node = queue.popleft()
            for user in self.users(node):
                if user in parent:
                    continue
                parent[user] = node
                if user.op == "output":
                    escapes = True
                elif user in self.norm:
                    victims.append(user)  # the shift stops here: its running_var absorbs it
                else:
                    queue.append(user)
        out = []
        for victim in sorted(victims, key=self.order.__getitem__):
            path = [victim]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])  # type: ignore[arg-type]
            out.append((victim, path[::-1]))
        return out, escapes

    def downstream(self, node: fx.Node) -> list[fx.Node]:
        """Victim-type norms strictly downstream of ``node`` (any path)."""
        if self._below is None:
            # One reverse-topological sweep: a bitset of the norms below every node.
            below: dict[fx.Node, int] = {}
            for n in reversed(self.nodes):
                mask = 0
                for user in self.users(n):
                    mask |= below.get(user, 0)
                    if user in self.norm:
                        mask |= 1 << self.order[user]
                below[n] = mask
            self._below = below
        mask = self._below.get(node, 0)
        return [self.nodes[i] for i in _bits(mask)]


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _inner_sites(module: nn.Module, qual: str, common: dict) -> list[DropoutSite]:
    """Dropouts inside a leaf fx does not trace (torch.nn containers such as
    TransformerEncoderLayer, timm no-trace modules): the leaf's output is their site."""
    sites = []
    for name, inner in module.named_modules():
        where = _join(qual, name)
        if name and is_dropout_module(inner):
            note = f"inside {qual}, which is not traced: its output is the site"
            p = float(inner.p)
            sites.append(
                DropoutSite(
                    where, "inside", type(inner).__name__, p, module=where, note=note, **common
                )
            )
        elif isinstance(inner, nn.MultiheadAttention) and inner.dropout > 0:
            # A float attribute, not a module: no rewrite can swap it.
            note = "attention-weight dropout inside nn.MultiheadAttention"
            p = float(inner.dropout)
            op = "MultiheadAttention.dropout"
            sites.append(
                DropoutSite(
                    where, "inside", op, p, module=where, note=note, fixable=False, **common
                )
            )
    return sites


def _sites(part: TracedPart, flow: PartFlow, include_structured: bool) -> list[DropoutSite]:
    where = locators(part)
    sites: list[DropoutSite] = []
    for node in flow.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        common = dict(node_place(part, node, where), part=part.prefix)
        ordinal = common["ordinal"]
        module = flow.module_of(node)
        if module is not None:
            qual = _join(part.prefix, str(node.target))
            rate = _structured_rate(module) if include_structured else None
            if is_dropout_module(module):
                sites.append(
                    DropoutSite(
                        qual,
                        "module",
                        type(module).__name__,
                        float(module.p),
                        module=qual,
                        **common,
                    )
                )
            elif rate is not None and rate > 0.0:
                sites.append(
                    DropoutSite(qual, "module", type(module).__name__, rate, module=qual, **common)
                )
            elif node in flow.norm:
                continue
            else:
                sites += _inner_sites(module, qual, common)
            continue
        functional = _functional_dropout(node)
        if functional is not None:
            op, p = functional
            # owner:F.dropout, with #k for the k-th (0-based) such call in the same forward
            name = node_label(part, node) + (f"#{ordinal}" if ordinal else "")
            positional = bool(node.args) and isinstance(node.args[0], fx.Node)
            note = None if positional else "its input is passed by keyword: fix it by hand"
            sites.append(
                DropoutSite(name, "function", op, p, note=note, fixable=positional, **common)
            )
    return sites


def find_dropout_bn(traced: TraceResult, *, include_structured: bool = False) -> DropoutBNAnalysis:
    """Every (dropout site, victim norm) pair in the traced graphs of one model.

    ``traced`` should come from a training-mode trace
    (:func:`retrofit.capture.training.trace_training`): fx bakes
    ``self.training`` into the graph, and an eval-mode trace hides ``F.dropout(x, p,
    self.training)`` behind a constant ``training=False``.
    """
    result = DropoutBNAnalysis()
    for part in traced.parts:
        flow = PartFlow(part)
        labels = {n: node_label(part, n) for n in flow.nodes}
        for site in _sites(part, flow, include_structured):
            result.sites.append(site)
            start = next(n for n in flow.nodes if n.name == site.node)
            victims, escapes = flow.search(start)
            for victim, path in victims:
                norm, note = flow.norm[victim]
                result.pairs.append(
                    DropoutBNPair(
                        site=site,
                        norm=norm,
                        path=[site.name, *(labels[n] for n in path[1:-1]), norm],
                        norm_source=victim.meta.get("source"),
                        downstream=tuple(
                            dict.fromkeys(flow.norm[n][0] for n in flow.downstream(victim))
                        ),
                        note=note or site.note,
                    )
                )
            if escapes and part.prefix:
                result.notes.append(
                    f"{site.name}: its output leaves {part.prefix}, whose caller could not be "
                    "traced; norms after that point were not checked"
                )
    for skipped in traced.skipped:
        result.notes.append(f"{skipped.module} was not traced ({skipped.reason})")
    return result
