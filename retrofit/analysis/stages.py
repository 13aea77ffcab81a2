"""The stages of a CNN: where DropBlock goes.

Ghiasi et al. 2018 ("DropBlock: A regularization method for convolutional networks", NeurIPS)
apply DropBlock to ResNet-50's groups 3 and 4, the runs of blocks at reductions 16 and 32. For
any CNN, a *stage* is such a run: the feature maps at one spatial resolution after the stem,
ending at the last node before the next downsampling. Stage ``i`` (1-based) is what a recipe's
``dropblock: {stages: [3, 4]}`` names; its ``module`` is the name a recipe may use instead.

How stages are found (one pure analysis over the traced graph; nothing is rewritten here):

1. Every node's output shape, by shape propagation on the meta device (``capture/shapes.py``) for
   a probe input: ``example_input``, else (1, *timm's ``pretrained_cfg["input_size"]``), else
   1×3×224×224.
2. *Main-path* nodes: nodes no data edge jumps over (every value computed before them is used by
   them or before them). A block's interior is not on the main path (its shortcut jumps over it),
   its output is. This keeps channels-last interiors (ConvNeXt's ``permute`` → LayerNorm → MLP),
   attention maps and squeeze-excite vectors out of the picture.
3. A main-path node with an NCHW map gets a *reduction* r = input size / map size, rounded to a
   power of two and equal along H and W (an NHWC map, (N, H, W, C), fails that test: Swin's
   stages are not conv stages). 1×1 maps (global pooling) are not feature maps. A resolution is a
   *level* only if a conv runs inside it (a weighted op with an input and its output at that
   resolution): a ViT's patch embedding produces a 4-D map, but nothing convolves it. In a
   network where no conv runs inside any resolution (a plain stack of stride-2 convs, each
   halving the map) and no token sequence is on the main path, each halving conv's output
   makes a level.
4. **The stem.** In a network that reaches reduction 16 or more (every ImageNet CNN), the levels
   at reductions 1 and 2 are the stem: the stages are the levels at 4, 8, 16, 32 — the C2–C5
   convention of feature pyramids, and timm's ``feature_info`` without its reduction-2 entry.
   So ``stages: [3, 4]`` means reductions 16 and 32 in a ResNet, a ConvNeXt, an EfficientNet
   and a MobileNet alike (EfficientNet's and MobileNet's thin first block at reduction 2 counts
   as stem, as ResNet's conv1 + max-pool does). A small-image network (deepest level below 16,
   e.g. a CIFAR ResNet with a stride-1 stem) keeps all its levels: its stem is the start of
   stage 1, as ConvNeXt's patchify stem is.
5. The stage's end inside a level: among its main-path nodes, the last one at the shallowest
   module nesting, mapped to the outermost module whose output it is (``layer3``,
   ``features.5``). "Shallowest" keeps a downsampling layer's leading norm (ConvNeXt's
   ``features.2.0`` LayerNorm runs at the old resolution) out of the previous stage.

**Video CNNs** (a 5-D probe, (N, C, T, H, W): torchvision's ``r3d_18``, ``mc3_18``,
``r2plus1d_18``): the same analysis on their T×H×W maps, with the reduction read off H and W
(time is reduced on its own schedule) and only 5-D maps counted, so an image model's shapes are
never read this way. No stem rule: their stem is one strided conv that shares its level with
the first residual stage (``stem`` → ``layer1`` both at reduction 2), so ``layer1``–``layer4``
are stages 1–4 as in a 2-D ResNet.

When the model has timm's ``feature_info``, its module names choose the stages (timm's own
``layer3``, ``stages.2``, ``blocks.4``), with the same stem rule, keeping only entries whose
output is an NCHW map with the listed channel count (a ViT's or Swin's are not).

Each stage also carries where a rewrite inserts a layer after it: the nearest module with a
``forward`` of its own that runs the stage's last call, and the locator (``key``, ``ordinal``,
see ``analysis/dataflow.py``) of that call in the owner's own graph. Pass-through containers
(``nn.Sequential``, ``trace.is_passthrough``) own no code and are inlined into their owner's
graph, so "after ``layer3``" of torchvision's ResNet-50 is the root ``ResNet``'s call of
``layer3.5`` (the Sequential's last child), and "after ``features.16``" of MobileNetV3 (a
``Conv2dNormActivation``, a Sequential) is the root's call of ``features.16.2``. A rewrite at
such a site never adds a child to a Sequential.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from retrofit.analysis.dataflow import DataFlow, node_key
from retrofit.capture.concrete import is_metadata
from retrofit.capture.existing import regularizer_types
from retrofit.capture.probe import probe_input_size
from retrofit.capture.shapes import meta_like, propagate_shapes, shape_of
from retrofit.capture.trace import (
    TraceResult,
    is_passthrough,
    trace,
    trace_module,
)
from retrofit.errors import ModelError, TraceError

__all__ = [
    "CallSite",
    "NoConvStagesError",
    "Stage",
    "StageAnalysis",
    "analyse_stages",
]

# Below this deepest reduction a network is a small-image design whose first level is a stage.
_IMAGENET_DEPTH = 16
# Reductions that are stem in an ImageNet-style network.
_STEM_REDUCTION = 4


class NoConvStagesError(ModelError):
    """The model has no convolutional feature maps: DropBlock does not apply to it."""


@dataclass(frozen=True)
class CallSite:
    """Where a rewrite can insert a module after a node: the node in ``owner``'s own graph.

    ``owner`` is the qualified name of the nearest module with a ``forward`` of its own that
    produces the value (``""``: the root; never a pass-through ``nn.Sequential``, except a model
    that is one); ``node``/``key``/``ordinal``/``source`` locate it when ``owner`` is re-traced
    on its own with every child but pass-through containers as a leaf (what ``rewrite`` does).
    """

    owner: str
    node: str
    key: str
    ordinal: int
    source: str | None


@dataclass
class Stage:
    """One stage of a CNN (see the module docstring for the definition).

    Attributes:
        index: 1-based position, what ``dropblock: {stages: [...]}`` lists.
        module: qualified name of the module whose output ends the stage (``layer3``); a recipe
            may name it instead of the index. ``""`` only for a stage that ends in the root's own
            code (a functional op in ``forward``).
        shape: the stage output's shape for the probe input, e.g. (1, 1024, 14, 14), or
            (N, C, T, H, W) for a video CNN.
        reduction: input size / feature map size (4, 8, 16, 32), spatially (H and W).
        node: the fx node producing the stage output in the model's full graph.
        site: where a layer "after the stage" goes (None if that call cannot be located).
        found_by: ``"feature_info"`` (timm's) or ``"shapes"`` (shape propagation).
    """

    index: int
    module: str
    shape: tuple[int, ...]
    reduction: int
    node: str = ""
    site: CallSite | None = None
    found_by: str = "shapes"

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def spatial(self) -> tuple[int, int]:
        return self.shape[-2], self.shape[-1]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "module": self.module,
            "shape": list(self.shape),
            "reduction": self.reduction,
            "node": self.node,
            "found_by": self.found_by,
        }
        if self.site is not None:
            out["owner"] = self.site.owner
        return out


@dataclass
class StageAnalysis:
    """The stages plus the facts the DropBlock planner needs about the full graph."""

    model: nn.Module
    graph_module: fx.GraphModule | None  # None: stages read part by part (``_by_parts``)
    stages: list[Stage]
    probe_shape: tuple[int, ...]
    position: dict[fx.Node, int]
    module_output: dict[str, fx.Node]  # module qualified name → last node computed inside it
    calls: Any = None  # module name → its recorded Call (capture/calls.py), or None
    # Stages read part by part, all from one part (a detector's backbone): that part's prefix
    # and its own analysis (local names), where DropBlock can be placed after blocks.
    part: tuple[str, StageAnalysis] | None = None
    _shallow: dict[str, fx.GraphModule] = field(default_factory=dict, repr=False)

    def reduction_of(self, node: fx.Node) -> int | None:
        """Reduction of ``node``'s output if it is an NCHW (NCTHW) feature map, else None."""
        probe = self.probe_shape
        return _reduction(shape_of(node), (probe[-2], probe[-1]), probe[0], len(probe))

    def node(self, name: str) -> fx.Node:
        for n in self.graph_module.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def call_site(self, module: str) -> CallSite:
        """Where the output of ``module`` leaves it: its call in the owner's own graph.

        The owner is the nearest ancestor with a ``forward`` of its own; for a pass-through
        ``module`` the call is that of its last child (recursively): ``layer3`` of torchvision's
        ResNet-50 → the root's call of ``layer3.5``.
        """
        out = self.module_output.get(module)
        if out is None:
            raise LookupError(f"module {module!r} does not run in the traced forward")
        caller = _caller(out, module)
        # Pass-through containers (nn.Sequential) are inlined into their caller's graph
        # (trace.is_passthrough): the call to find is the container's last child, made by the
        # nearest ancestor that has code of its own.
        stack = _stack(out)
        while caller and is_passthrough(self.model.get_submodule(caller)):
            caller = _caller(out, caller) if caller in stack else ""
        while is_passthrough(container := self.model.get_submodule(module)) and len(container):
            module = f"{module}.{list(container._modules)[-1]}"
        gm = self._shallow_graph(caller)
        target = module[len(caller) + 1 :] if caller else module
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == target]
        if not calls:
            raise LookupError(f"{caller or '<root>'} does not call {module!r} in its own forward")
        # A module called more than once: the stage output is its last call.
        call = calls[-1]
        if any(u.op == "call_function" and u.target is operator.getitem for u in call.users):
            # The module returns a tuple or dict (``y, aux = block(x)``): its call is not the
            # map, which is made inside the module's own code (the node ``out``). A DropBlock
            # after the call would receive the tuple.
            return self.functional_site(out)
        return _site_of(gm, call, caller, self.model.get_submodule(caller))

    def output_site(self, module: str) -> CallSite:
        """Where ``module``'s own forward computes its output (the node it returns): inserting
        there adds the new layer to ``module`` itself, not to its caller. For a caller that
        iterates its children (torchvision's ``IntermediateLayerGetter``, an ``nn.ModuleDict``
        with a forward), a child added to the caller would run once more at its end."""
        while is_passthrough(container := self.model.get_submodule(module)) and len(container):
            module = f"{module}.{list(container._modules)[-1]}"
        gm = self._shallow_graph(module)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        node = out.args[0]
        if isinstance(node, tuple | list) and len(node) == 1:
            node = node[0]  # a graph specialised on a call returns its output's leaves
        if not isinstance(node, fx.Node) or node.op == "placeholder":
            # A tuple (PiT's stages return ``(x, cls_tokens)``, SelecSLS's ``[x, features]``):
            # the stage's map, where the module's own code computes it.
            map_node = self.module_output.get(module)
            if map_node is not None and map_node.meta.get("owner", "") == module:
                return self.functional_site(map_node)
            raise LookupError(f"{module!r} does not return one computed tensor")
        return _site_of(gm, node, module, self.model.get_submodule(module))

    def functional_site(self, node: fx.Node) -> CallSite:
        """The call site of a node computed by ``owner``'s own code (not a child's output)."""
        owner = node.meta.get("owner_local", "")
        key = node_key(node)
        ordinal = sum(
            1
            for n in self.graph_module.graph.nodes
            if self.position[n] < self.position[node]
            and n.op not in ("placeholder", "output", "get_attr")
            and n.meta.get("owner", "") == owner
            and node_key(n) == key
        )
        gm = self._shallow_graph(owner)
        same = [
            n
            for n in gm.graph.nodes
            if n.op not in ("placeholder", "output", "get_attr") and node_key(n) == key
        ]
        if ordinal >= len(same) or same[ordinal].meta.get("source") != node.meta.get("source"):
            raise LookupError(
                f"node {node.name} cannot be located in {owner or '<root>'}'s forward"
            )
        source = _own_source(self.model.get_submodule(owner), node.meta.get("source"))
        return CallSite(owner, same[ordinal].name, key, ordinal, source)

    def _shallow_graph(self, owner: str) -> fx.GraphModule:
        if owner not in self._shallow:
            call = self.calls(owner) if self.calls is not None else None
            module = self.model.get_submodule(owner)
            self._shallow[owner] = trace_module(module, shallow=True, call=call)
        return self._shallow[owner]


def _site_of(gm: fx.GraphModule, node: fx.Node, owner: str, module: nn.Module) -> CallSite:
    key = node_key(node)
    ordinal = 0
    for n in gm.graph.nodes:
        if n is node:
            break
        if n.op not in ("placeholder", "output", "get_attr") and node_key(n) == key:
            ordinal += 1
    return CallSite(owner, node.name, key, ordinal, _own_source(module, node.meta.get("source")))


def _own_source(module: nn.Module, source: str | None) -> str | None:
    """``source`` if it is a line of ``module``'s own class, else None.

    The tracer attributes code that lives in torch (``nn.Sequential.forward``) to the first frame
    outside torch and retrofit: whoever called ``plan`` or ``apply``. That line is not the
    owner's code and differs between planning and rewriting, so it must not be used to check
    that a re-traced node is the planned one.
    """
    if source is None:
        return None
    try:
        own = inspect.getsourcefile(type(module))
    except (TypeError, OSError):
        return None
    path = source.rpartition(":")[0]
    return source if own and os.path.abspath(path) == os.path.abspath(own) else None


def _stack(node: fx.Node) -> list[str]:
    """Qualified names of the modules ``node`` runs inside, outermost first."""
    return [qual for qual, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _caller(node: fx.Node, module: str) -> str:
    """The module whose forward called ``module`` on the way to ``node``: the entry before it."""
    stack = _stack(node)
    i = stack.index(module)
    return stack[i - 1] if i > 0 else ""


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0


def _reduction(
    shape: tuple[int, ...] | None, size: tuple[int, int], batch: int, rank: int = 4
) -> int | None:
    """Power-of-two reduction of an NCHW map (NCTHW when ``rank`` is 5, a video model's)
    relative to the input, or None if it is not one."""
    if shape is None or len(shape) != rank or shape[0] != batch:
        return None
    h, w = shape[-2], shape[-1]
    if h * w <= 1 or h > 2 * size[0] or w > 2 * size[1]:
        return None
    # Rounded in log space: Inception's unpadded 149/147/73/71… maps are reductions 2, 2, 4, 4.
    eh, ew = round(math.log2(size[0] / h)), round(math.log2(size[1] / w))
    if eh != ew or eh < 0:
        return None  # an NHWC map (N, H, W, C) or a token tensor, not an NCHW feature map
    return 2**eh


def _main_path(nodes: list[fx.Node], flow: DataFlow, *, handoff: bool = False) -> set[fx.Node]:
    """Nodes no data edge jumps over: every earlier tensor is consumed at or before them.

    ``handoff``: a value one top-level child hands to another that runs later (a detector
    backbone's ``body`` feature maps read by its ``fpn``) is not a jump either, like a returned
    value: the encoder's c3…c5 stay on the main path."""
    position = {n: i for i, n in enumerate(nodes)}
    # A decoder's skip inputs (a U-Net's encoder maps, concatenated after an upsampling) are
    # read past the encoder's end: they jump over no stage. Without this every encoder level
    # but the first would be off the main path.
    decoder = _first_upsampling(nodes)
    main: set[fx.Node] = set()
    open_until = -1
    for i, node in enumerate(nodes):
        shape = shape_of(node)
        carries = shape is not None and flow.depends_on_input(node)
        if carries and open_until <= i:
            main.add(node)
        # Only a feature map jumping ahead (a U-Net skip) takes what it jumps over off the main
        # path: a pooled side output (``aux = h.mean((2, 3))`` summed at the end, deep
        # supervision) is not an edge the encoder's maps flow along.
        if carries and len(shape) >= 3:
            # Returning a value is not jumping over what follows: an encoder that returns its
            # feature maps ``[c2, c3, c4, c5]`` keeps c3…c5 on the main path.
            top = _top(node)
            ends = (
                position[u]
                for u in node.users
                if u.op != "output"
                # Reading a map's size (``F.interpolate(x, size=low.shape[-2:])``, LRASPP's
                # head) is no data edge: the map itself is not carried past what follows.
                and not is_metadata(u)
                and not (handoff and top and _top(u) not in ("", top))
                and position[u] <= decoder
            )
            open_until = max(open_until, *ends, i)
    return main


# Ops that only relabel a tensor's dimensions: a permute of a head's (N, A, K, H, W) scores is
# not an upsampling, however its sizes compare.
_LAYOUT_OPS = frozenset(
    {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "expand", "expand_as",
     "contiguous", "squeeze", "unsqueeze", "movedim", "repeat"}
)  # fmt: skip


# Padding grows a map by a border (a blur pool's or a "same" conv's ``F.pad``), not a scale.
_PADDING_FUNCTIONS = frozenset({"pad", "constant_pad_nd"})
_PADDING_MODULES = tuple(
    cls
    for name in ("_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")
    if isinstance(cls := getattr(nn.modules.padding, name, None), type)
)


def _is_padding(node: fx.Node) -> bool:
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in _PADDING_FUNCTIONS
    if node.op == "call_module" and node.graph.owning_module is not None:
        try:
            module = node.graph.owning_module.get_submodule(str(node.target))
        except AttributeError:
            return False
        return isinstance(module, _PADDING_MODULES)
    return False


def _first_upsampling(nodes: list[fx.Node]) -> int:
    """Position of the first node that makes a feature map larger, in height and in width,
    than every map it reads (a transposed conv, an interpolation: where a decoder starts), else
    past the last node. A broadcast ``x * scale`` (squeeze-excite's (N, C, 1, 1) gate) reads
    a map as large as its output, and padding (TResNet's blur pool pads 56 → 58 before its
    stride-2 filter) adds a border: neither is an upsampling."""
    for i, node in enumerate(nodes):
        out = shape_of(node)
        name = getattr(node.target, "__name__", str(node.target))
        if out is None or len(out) < 4 or name in _LAYOUT_OPS or _is_padding(node):
            continue
        maps = [
            shape
            for shape in (shape_of(arg) for arg in node.all_input_nodes)
            if shape is not None and len(shape) == len(out) and shape[0] == out[0]
        ]
        if maps and all(out[-2] > s[-2] and out[-1] > s[-1] for s in maps):
            return i
    return len(nodes)


def _top(node: fx.Node) -> str:
    stack = _stack(node)
    return stack[0].split(".")[0] if stack else ""


def _module_outputs(nodes: Iterable[fx.Node]) -> dict[str, fx.Node]:
    last: dict[str, fx.Node] = {}
    for node in nodes:
        for qual in _stack(node):
            last[qual] = node
    return last


def _probe(model: nn.Module, example_input: Any) -> Any:
    if example_input is not None:
        return meta_like(example_input)
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    return torch.empty(1, *probe_input_size(model), dtype=dtype, device="meta")


def _root_graph(model: nn.Module, traced: TraceResult) -> fx.GraphModule:
    if traced.parts and traced.parts[0].prefix == "":
        return traced.parts[0].graph_module
    reason = traced.skipped[0].reason if traced.skipped else "no traced graph"
    raise TraceError(
        f"stages of {type(model).__name__} need its forward as one fx graph, and it could not "
        f"be traced: {reason}"
    )


def _is_regularizer(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(
        gm.get_submodule(str(node.target)), regularizer_types()
    )


def _levels(
    gm: fx.GraphModule,
    main: set[fx.Node],
    flow: DataFlow,
    size: tuple[int, int],
    batch: int,
    rank: int = 4,
    stem_rule: bool = True,
) -> list[tuple[int, list[fx.Node]]]:
    """(reduction, main-path nodes at it) for every level, in execution order."""
    nodes = list(gm.graph.nodes)
    reduction = {n: _reduction(shape_of(n), size, batch, rank) for n in nodes}
    # A conv "inside" a level reads and writes maps at that reduction; a patch embedding
    # (image → r16 tokens-to-be) does not make r16 a level.
    convolved = {
        reduction[n]
        for n in nodes
        if reduction[n] is not None
        and flow.weights[flow.order[n]]
        and any(reduction.get(a) == reduction[n] for a in n.all_input_nodes)
    }
    if not convolved and rank == 4 and not _tokens_on(main, batch):
        # No conv runs inside any level: every one changes the resolution (a plain stack of
        # stride-2 convs). Each such conv's output is its level's feature map. Only then, and
        # only with no token sequence on the main path: a transformer's conv stem or patch
        # embeddings make maps that its tokens, not convolutions, carry on (and a network
        # with levels of its own keeps them as they are: HRNet's, MobileNetV5's).
        convolved = {
            reduction[n]
            for n in nodes
            if reduction[n] is not None
            and flow.weights[flow.order[n]]
            and any(
                (r := reduction.get(a)) is not None and reduction[n] == 2 * r
                for a in n.all_input_nodes
            )
        }
    levels: list[tuple[int, list[fx.Node]]] = []
    for node in nodes:
        r = reduction[node]
        if node not in main or r is None or r not in convolved:
            continue
        if _is_regularizer(node, gm):
            continue  # a Dropout or an earlier DropBlock passes the stage output through
        if levels and r < levels[-1][0]:
            break  # upsampling: a decoder follows the encoder whose stages these are
        if not levels or r != levels[-1][0]:
            levels.append((r, []))
        levels[-1][1].append(node)
    if stem_rule and rank == 4 and levels and max(r for r, _ in levels) >= _IMAGENET_DEPTH:
        levels = [(r, ns) for r, ns in levels if r >= _STEM_REDUCTION]
    return levels


def _tokens_on(main: set[fx.Node], batch: int) -> bool:
    """A main-path value is a sequence of tokens, (N, L, C) with L > 1: a transformer's."""
    return any(
        (shape := shape_of(n)) is not None
        and len(shape) == 3
        and shape[0] == batch
        and shape[1] > 1
        for n in main
    )


def _stage_end(
    level: list[fx.Node], module_output: dict[str, fx.Node], earlier: set[str]
) -> tuple[fx.Node, str]:
    """The last node of the level at the shallowest module nesting, and its stage module.

    The stage module is the outermost module whose output the node is, among those that hold no
    earlier stage: ConvNeXt's last stage is ``features.7``, not the ``features`` Sequential
    that ends with it.
    """
    best: tuple[int, int, fx.Node, str] | None = None
    for i, node in enumerate(level):
        if node.op == "placeholder":
            continue  # the input image is not the end of a stage
        module = next(
            (q for q in _stack(node) if module_output.get(q) is node and q not in earlier), None
        )
        # A functional op nests like a child call of the module whose code runs it.
        owner = node.meta.get("owner", "")
        depth = _depth(module) if module is not None else _depth(owner) + 1
        if best is None or (depth, -i) < (best[0], -best[1]):
            best = (depth, i, node, module if module is not None else owner)
    if best is None:
        raise NoConvStagesError("a level holds nothing but the model input")
    return best[2], best[3]


def _from_shapes(
    gm: fx.GraphModule,
    main: set[fx.Node],
    flow: DataFlow,
    module_output: dict[str, fx.Node],
    size: tuple[int, int],
    batch: int,
    rank: int = 4,
) -> list[tuple[str, fx.Node, int]]:
    out = []
    earlier: set[str] = set()  # modules that hold an earlier stage's end
    for r, level in _levels(gm, main, flow, size, batch, rank):
        node, module = _stage_end(level, module_output, earlier)
        out.append((module, node, r))
        earlier.update(_stack(node))
    return out


def _feature_info(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    entries = getattr(info, "info", info)  # timm's FeatureInfo wraps the list of dicts
    try:
        return [dict(e) for e in entries if isinstance(e, dict) and "module" in e]
    except TypeError:
        return []


def _from_feature_info(
    model: nn.Module,
    module_output: dict[str, fx.Node],
    size: tuple[int, int],
    batch: int,
) -> list[tuple[str, fx.Node, int]] | None:
    entries = _feature_info(model)
    if not entries:
        return None
    out = []
    for entry in entries:
        node = module_output.get(entry["module"])
        if node is None:
            return None  # feature_info names a module the traced forward does not run
        shape = shape_of(node)
        r = _reduction(shape, size, batch)
        if r is None or shape is None or shape[1] != entry.get("num_chs", shape[1]):
            continue  # tokens (ViT) or NHWC (Swin): not a conv feature map
        out.append((entry["module"], node, int(entry.get("reduction", r))))
    if out and max(r for _, _, r in out) >= _IMAGENET_DEPTH:
        out = [e for e in out if e[2] >= _STEM_REDUCTION]
    return out


def analyse_stages(
    model: nn.Module,
    traced: TraceResult | None = None,
    example_input: Any = None,
    *,
    calls: Any = None,
) -> StageAnalysis:
    """Find the stages of ``model`` (see the module docstring); meta device only, no real compute.

    Raises:
        NoConvStagesError: the model has no convolutional feature maps (a ViT, a Swin, an MLP).
        TraceError: the model's forward could not be traced as one graph.
        ShapePropError: an operation cannot run on meta tensors.
    """
    traced = traced if traced is not None else trace(model, calls)
    if traced.parts and traced.parts[0].prefix != "":
        return _by_parts(model, traced, calls)
    gm = _root_graph(model, traced)
    call = getattr(gm, "meta", {}).get("retrofit_call")
    if call is not None:
        # A graph specialised on the recorded call: its placeholders are that call's tensors.
        args = tuple(meta_like(v) for v in call.flatten()[0] if isinstance(v, torch.Tensor))
    else:
        probe = _probe(model, example_input)
        # As in verify.eval_output: a tuple is the forward's positional arguments, image first.
        args = probe if isinstance(probe, tuple) else (probe,)
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        raise NoConvStagesError(
            f"DropBlock does not apply: no conv feature maps in {type(model).__name__} "
            f"(its input is not an image batch: {getattr(x, 'shape', type(x).__name__)})"
        )
    propagate_shapes(gm, *args)
    nodes = list(gm.graph.nodes)
    flow = DataFlow.of(gm)
    main = _main_path(nodes, flow)
    module_output = _module_outputs(nodes)
    size, batch = (int(x.shape[-2]), int(x.shape[-1])), int(x.shape[0])

    found, found_by = None, "feature_info"
    if x.ndim == 4:  # timm's feature_info describes image models
        found = _from_feature_info(model, module_output, size, batch)
    if not found:
        found = _from_shapes(gm, main, flow, module_output, size, batch, x.ndim)
        found_by = "shapes"
    if not found:
        raise NoConvStagesError(
            f"DropBlock does not apply: no conv feature maps in {type(model).__name__}"
        )
    analysis = StageAnalysis(
        model=model,
        graph_module=gm,
        stages=[],
        probe_shape=tuple(int(s) for s in x.shape),
        position={n: i for i, n in enumerate(nodes)},
        module_output=module_output,
        calls=calls,
    )
    for index, (module, node, r) in enumerate(found, start=1):
        try:
            if module and module_output.get(module) is node:
                site = analysis.call_site(module)
            else:
                site = analysis.functional_site(node)
        except Exception:  # listing stages must not fail on a caller fx cannot re-trace alone
            site = None
        shape = shape_of(node)
        assert shape is not None
        analysis.stages.append(Stage(index, module, shape, r, node.name, site, found_by))
    return analysis


def _by_parts(model: nn.Module, traced: TraceResult, calls: Any) -> StageAnalysis:
    """Stages of a model whose own forward cannot be one graph (control flow on tensor data):
    read from the parts the trace could read, each propagated on its recorded call, with
    reductions relative to the model's input; per reduction the last level in execution order.
    Enough to list stages and place DropBlock on stage outputs (not after every block)."""
    image = _image_batch(model, traced, calls)
    size, batch, rank = (
        (int(image.shape[-2]), int(image.shape[-1])),
        int(image.shape[0]),
        image.ndim,
    )
    by_reduction: dict[int, tuple[str, fx.Node, str, StageAnalysis]] = {}
    for part in traced.parts:
        _part_levels(part, calls, size, batch, rank, by_reduction)
    reductions = sorted(by_reduction)
    if rank == 4 and reductions and max(reductions) >= _IMAGENET_DEPTH:
        reductions = [r for r in reductions if r >= _STEM_REDUCTION]
    if not reductions:
        raise NoConvStagesError(
            f"DropBlock does not apply: no conv feature maps in {type(model).__name__}"
        )
    found = []
    local_stages = []
    for index, r in enumerate(reductions, start=1):
        prefix, node, local, sa = by_reduction[r]
        local_stages.append(Stage(index, local, shape_of(node), r, node.name, None, "parts"))
        shape = shape_of(node)
        assert shape is not None
        site = _part_site(prefix, node, local, sa)
        found.append(Stage(index, _join(prefix, local), shape, r, node.name, site, "parts"))
    parts = {by_reduction[r][0]: by_reduction[r][3] for r in reductions}
    part = None
    if len(parts) == 1:
        ((prefix, sa),) = parts.items()
        sa.stages = local_stages
        part = (prefix, sa)
    return StageAnalysis(
        model=model,
        graph_module=None,
        stages=found,
        probe_shape=tuple(int(v) for v in image.shape),
        position={},
        module_output={},
        calls=calls,
        part=part,
    )


def _image_batch(model: nn.Module, traced: TraceResult, calls: Any) -> torch.Tensor:
    """The image batch (4-D, or 5-D video) the stages' reductions are relative to."""
    root = _recorded(calls, "")
    image = (
        next((v for v in root.flatten()[0] if isinstance(v, torch.Tensor)), None) if root else None
    )
    if image is not None and image.ndim not in (4, 5):
        # The model takes its images otherwise (a detector: a list of 3×H×W images, resized and
        # batched by its own transform): reductions are relative to the first image batch one
        # of its parts computes on (the detector's backbone input).
        image = _first_batch(traced, calls)
    if image is None or image.ndim not in (4, 5):
        reason = traced.skipped[0].reason if traced.skipped else "no traced graph"
        raise TraceError(
            f"stages of {type(model).__name__}: its forward could not be read ({reason}) and "
            "no recorded input tells the size of its maps"
        )
    return image


def _part_site(prefix: str, node: fx.Node, local: str, sa: StageAnalysis) -> CallSite | None:
    """Where a stage found in a part is called, named from the model (None when the part's
    caller cannot be re-traced alone: listing stages must not fail on it)."""
    try:
        site = (
            sa.call_site(local)
            if local and sa.module_output.get(local) is node
            else sa.functional_site(node)
        )
        return CallSite(_join(prefix, site.owner), site.node, site.key, site.ordinal, site.source)
    except Exception:
        return None


def _first_batch(traced: TraceResult, calls: Any) -> torch.Tensor | None:
    for part in traced.parts:
        call = part.graph_module.meta.get("retrofit_call") or _recorded(calls, part.prefix)
        if call is None:
            continue
        first = next((v for v in call.flatten()[0] if isinstance(v, torch.Tensor)), None)
        if first is not None and first.ndim in (4, 5):
            return first
    return None


def _part_levels(
    part: Any,
    calls: Any,
    size: tuple[int, int],
    batch: int,
    rank: int,
    into: dict[int, tuple[str, fx.Node, str, StageAnalysis]],
) -> None:
    """The levels of one traced part, on its recorded call: each reduction's stage end goes into
    ``into`` (a later part overrides an earlier one at the same reduction)."""
    gm = part.graph_module
    call = gm.meta.get("retrofit_call") or _recorded(calls, part.prefix)
    if call is None:
        return
    args = tuple(meta_like(v) for v in call.flatten()[0] if isinstance(v, torch.Tensor))
    try:
        propagate_shapes(gm, *args)
    except Exception:  # a part whose shapes cannot be followed gives no stage
        return
    nodes = list(gm.graph.nodes)
    flow = DataFlow.of(gm)
    module_output = _module_outputs(nodes)
    sa = StageAnalysis(
        model=part.module,
        graph_module=gm,
        stages=[],
        probe_shape=tuple(int(v) for v in args[0].shape) if args else (),
        position={n: i for i, n in enumerate(nodes)},
        module_output=module_output,
        calls=lambda name, prefix=part.prefix: _recorded(calls, _join(prefix, name)),
    )
    earlier: set[str] = set()
    main = _main_path(nodes, flow, handoff=True)
    levels = _levels(gm, main, flow, size, batch, rank, stem_rule=False)
    for r, level in levels:
        try:
            node, local = _stage_end(level, module_output, earlier)
        except NoConvStagesError:
            continue  # a part fed feature maps (a detector's head): its inputs end no stage
        earlier.update(_stack(node))
        into[r] = (part.prefix, node, local, sa)


def _recorded(calls: Any, name: str) -> Any:
    try:
        return calls(name) if calls is not None else None
    except LookupError:  # NoCall: the recording forward failed
        return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)
