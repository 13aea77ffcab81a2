"""Residual sites: the adds H = f(x) + shortcut(x) where stochastic depth belongs.

Huang et al. 2016 drop the residual branch f_l of block l: H_l = ReLU(b_l·f_l(H_{l-1}) + id(H_{l-1})).
Finding "the branch" in an arbitrary graph is the hard part. An add is a residual site when

1. both operands are tensors computed from the model input (a positional embedding, an attention
   bias or a mask read from parameters/buffers or from ``x.shape`` is not: shape reads cut data
   dependence);
2. they fork from a common input-dependent node (the latest common ancestor is the fork);
3. one operand is a *shortcut*: identity (nothing learned between fork and add) or a light
   projection (one learned map, e.g. a strided 1×1 conv + BN; or two in sequence with nothing
   nonlinear around a longer branch: GhostNet's depthwise + pointwise conv), and the other is
   a *branch* with at least two learned maps (convs, linears, matmuls) — in sequence, not side by side, when
   the shortcut is a projection — or, against an identity shortcut, one dense map (a conv with
   groups=1 or a linear: EfficientNetV2's conv-bn-act blocks);
4. the sum takes the branch's place: nothing but the add (and what it feeds) reads the branch's
   value. A positional embedding added to an attention's queries (``q = queries + query_pe``,
   the values and the next residual reading ``queries``) is not a residual.
5. the sum is read by what follows: in the model's own forward, two heads averaged or side
   outputs summed into the output (deep supervision), nothing learned reading the sum, are
   predictions merged, not a residual stream.

Rule 3 is what keeps the known false positives out: ConvNeXt-V2's GRN (``γ·(x·n) + β + x``: no
learned map between fork and add), convolutional position encodings and focal modulation (one
depthwise conv), RepVGG/MobileOne re-parameterisable branch sums (parallel single convs), while the sum of
those branches plus the identity — where timm itself applies drop path — stays a site.

That sum is read as a whole, whatever order the code adds its terms in: a chain of adds (any
association, ``+=`` included, ``retrofit/analysis/sums.py``) of one identity-like term (the
fork itself or one BatchNorm/affine of it) and at least two parallel single linear maps of the
same input is a re-parameterisable block (Ding et al. 2021; Vasu et al. 2023). smp's MobileOne
and timm's fastvit add the identity *first* (``out = scale(x) + identity(x); out += conv_i(x)``),
so no single add has the branch as an operand: the chain's last add is the site, its partial
sums are not, and the site records the shortcut's term index (``regroup``) for the rewrite.

Sites are grouped into blocks as the model defines them: the sites a module's own ``forward``
owns share one depth index (a transformer block's attention and MLP residuals), unless each
branch lives entirely inside one of its children, run one after the other — a module applying
a list of blocks in a loop (``for blk in self.blocks: x = x + blk(x)``, or ``for attn, ff in
self.layers`` with two residuals per block) gives every child its own depth.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from retrofit.analysis.dataflow import DataFlow, is_add, node_key
from retrofit.analysis.sums import sum_terms
from retrofit.capture.concrete import is_metadata
from retrofit.capture.existing import drop_rate_attribute
from retrofit.capture.trace import TracedPart, TraceResult

__all__ = ["ResidualSite", "existing_drop_path", "find_residual_sites"]

# Existing drop-path slots: a site whose branch output goes through one of these reuses it.
_DROP_PATH_NAMES = ("drop_path", "droppath", "stochastic_depth")


@dataclass
class ResidualSite:
    """One residual add. Node names refer to the graph of the traced part that contains it."""

    owner: str  # qualified name of the module whose forward performs the add
    node: str  # fx node name of the add
    key: str  # locator: node_key and ordinal among the owner's nodes with that key
    ordinal: int
    fork: str
    branch: str  # the operand computed by the heavy branch f_l
    shortcut: str  # identity or light projection operand
    branch_arg: int  # position of the branch operand in the add's args
    branch_weight: int
    shortcut_weight: int
    block: str  # module that defines the block (sites of one block share a depth)
    source: str | None
    existing: str | None = None  # qualified name of a drop-path module already on the branch
    existing_type: str | None = None
    # A sum of several terms (an identity-first RepVGG/MobileOne block): the shortcut's index
    # among the terms of the chain of adds ending at ``node`` (retrofit.analysis.sums). The
    # rewrite regroups the sum as ``shortcut + (the other terms)`` first, so operand
    # ``branch_arg`` (1) is then the whole branch; ``branch`` names the terms, joined by "+".
    regroup: int | None = None
    position: int = 0  # topological position in its part, for ordering

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "position"}


def _drop_path_kind(module: nn.Module, attr: str) -> str | None:
    name = type(module).__name__
    if name == "StochasticDepthGate":
        return "retrofit.StochasticDepthGate"
    if drop_rate_attribute(module) is not None:
        library = type(module).__module__.split(".")[0]
        return f"{library}.{name}"
    if isinstance(module, nn.Identity) and attr.lower().startswith(_DROP_PATH_NAMES):
        # timm writes ``self.drop_path = DropPath(r) if r > 0 else nn.Identity()``: the slot is
        # there even when the rate is zero.
        return "identity placeholder"
    return None


def existing_drop_path(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The drop-path module that produces ``node``, if any (its type name)."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return _drop_path_kind(module, str(node.target).rsplit(".", 1)[-1])


_REDUCING_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "flatten", "logsumexp"}
_REDUCING_FUNCTIONS = {
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    torch.flatten,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_REDUCING_MODULES = (
    nn.Flatten,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def _token_flatten(node: fx.Node, module: nn.Module | None = None) -> bool:
    """A flatten that keeps the batch and channel dimensions apart (``x.flatten(2)``: a map's
    positions made a token sequence, as an MViT shortcut does around its pooling), not the
    ``flatten(1)`` that feeds a classifier every feature of a sample at once."""
    if module is not None:
        start = module.start_dim if isinstance(module, nn.Flatten) else 0
    else:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return isinstance(start, int) and start >= 2


def _reduces(nodes: list[fx.Node], gm: fx.GraphModule) -> bool:
    """Whether any of ``nodes`` pools or flattens a tensor's dimensions away."""
    for node in nodes:
        reducing = (node.op == "call_method" and node.target in _REDUCING_METHODS) or (
            node.op == "call_function" and node.target in _REDUCING_FUNCTIONS
        )
        if reducing and not (node.target in ("flatten", torch.flatten) and _token_flatten(node)):
            return True
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, _REDUCING_MODULES) and not _token_flatten(node, module):
                return True
    return False


def _slot_on_branch(branch: fx.Node, gm: fx.GraphModule, flow: DataFlow) -> fx.Node | None:
    """The drop-path slot (an existing drop-path module or an ``nn.Identity`` placeholder) that
    produces ``branch``, looking back through up to two scalings applied after it (a layer
    scale: a per-channel multiply, no learned map)."""
    node = branch
    for _ in range(3):
        if existing_drop_path(node, gm) is not None:
            return node
        inputs = [a for a in node.all_input_nodes if flow.depends_on_input(a)]
        scaling = flow.weights[flow.order[node]] == 0 and (
            node.op == "call_module" or node.target in (operator.mul, torch.mul, "mul")
        )
        if len(inputs) != 1 or not scaling:
            return None
        node = inputs[0]
    return None


def _container_child(owner_local: str, paths: set[str]) -> str | None:
    """The list element (``blocks.3``) of ``owner`` that holds every path, if there is one."""
    if not paths:
        return None
    rel = []
    for p in paths:
        if owner_local and not p.startswith(owner_local + "."):
            return None
        rel.append((p[len(owner_local) + 1 :] if owner_local else p).split("."))
    common: list[str] = []
    for parts in zip(*rel, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    for i, part in enumerate(common):
        if part.isdigit():
            return ".".join(common[: i + 1])
    return None


def _single_child(owner_local: str, paths: set[str]) -> str | None:
    """The one direct child of ``owner`` that holds every path, if there is one."""
    children = set()
    for p in paths:
        if owner_local and not p.startswith(owner_local + "."):
            return None
        rel = p[len(owner_local) + 1 :] if owner_local else p
        if not rel:
            return None
        children.add(rel.split(".")[0])
    return children.pop() if len(children) == 1 else None


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else (a or b)


def _module_path(node: fx.Node) -> str:
    """Where a node's work happens, relative to the traced part: a module call's target, else its owner."""
    return str(node.target) if node.op == "call_module" else node.meta.get("owner_local", "")


def _leaves_through_maps(add: fx.Node, owner_local: str, flow: DataFlow) -> bool:
    """Whether every path from ``add`` out of its owning module crosses a learned map.

    A block's residual add leaves the block directly or through activations, norms and gates: a
    squeeze-excite after the add (RepVGG-SE, MobileOne) multiplies the add's own value by a gate
    computed from it, so a map-free path (add → mul → out) remains. An add inside a layer feeds
    the rest of the layer: every way out goes through another projection.
    """
    prefix = owner_local + "."

    def inside(node: fx.Node) -> bool:
        where = node.meta.get("owner_local", "")
        return node.op != "output" and (where == owner_local or where.startswith(prefix))

    stack, seen = [add], {add}
    while stack:
        node = stack.pop()
        for user in node.users:
            if not inside(user):
                return False  # reached the module's exit without a learned map
            if user not in seen and not flow.weights[flow.order[user]]:
                seen.add(user)
                stack.append(user)
    return True


class _Fork(NamedTuple):
    """The two operands of an add that fork from one node: the heavier one is the branch."""

    fork: fx.Node
    branch: fx.Node
    branch_arg: int
    branch_region: int  # bitset of the nodes only the branch needs
    branch_weight: int
    shortcut: fx.Node
    shortcut_region: int
    shortcut_weight: int


def _fork_of(node: fx.Node, flow: DataFlow) -> _Fork | None:
    """Split an add into branch and shortcut, or None when its operands do not both come from
    the input through a common node."""
    operands = [(i, a) for i, a in enumerate(node.args[:2]) if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return None
    (ia, a), (ib, b) = operands
    common = flow.anc(a) & flow.anc(b)
    fork_index = common.bit_length() - 1
    if fork_index < 0:
        return None
    if not (flow.depends_on_input(a) and flow.depends_on_input(b)):
        if not _learned_query(flow.nodes[fork_index], a, b, flow):
            return None
    elif not flow.ancestors[fork_index] & flow.inputs_mask:
        return None
    region_a = flow.anc(a) & ~flow.anc(b)
    region_b = flow.anc(b) & ~flow.anc(a)
    wa, wb = flow.weight(region_a), flow.weight(region_b)
    # The heavier side is the branch; on a tie, the deeper one, then the one that applies an
    # activation to its map (a conv-norm-act against a conv-norm projection).
    tie_a, tie_b = (0, False), (0, False)
    if wa == wb:
        gm = flow.graph_module
        tie_a = (flow.depth(region_a), _nonlinear_after_map(region_a, gm, flow))
        tie_b = (flow.depth(region_b), _nonlinear_after_map(region_b, gm, flow))
    fork = flow.nodes[fork_index]
    if (wa, tie_a) > (wb, tie_b):
        return _Fork(fork, a, ia, region_a, wa, b, region_b, wb)
    return _Fork(fork, b, ib, region_b, wb, a, region_a, wa)


def _learned_query(fork: fx.Node, a: fx.Node, b: fx.Node, flow: DataFlow) -> bool:
    """``q + f(q, x)`` where ``q`` is learned, not computed from the input: CaiT's class-attention
    (the class token attends to the patches), Perceiver's latents, DETR's object queries. The
    shortcut is the fork itself, and the branch reads it together with the input."""
    if fork is not a and fork is not b:
        return False
    other = b if fork is a else a
    return flow.depends_on_input(other) and any(
        n.op == "get_attr" for n in flow.region_nodes(flow.anc(fork))
    )


_ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    F.elu,
    F.leaky_relu,
    F.hardswish,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


def _is_activation(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(
            module, nn.MultiheadAttention
        )
    return False


def _nonlinear_after_map(region: int, gm: fx.GraphModule, flow: DataFlow) -> bool:
    """Whether a region applies an activation to the output of one of its learned maps."""
    nodes = flow.region_nodes(region)
    maps = 0
    for node in nodes:
        if flow.weights[flow.order[node]]:
            maps |= 1 << flow.order[node]
    return any(_is_activation(n, gm) and flow.anc(n) & maps for n in nodes)


def _two_map_projection(f: _Fork, gm: fx.GraphModule, flow: DataFlow) -> bool:
    """A projection shortcut of two learned maps in sequence and nothing nonlinear (GhostNet's
    depthwise conv-BN then pointwise conv-BN, Han et al. 2020; conv → BN → conv) around a branch
    longer and heavier than it. Two parallel paths that each activate their maps (an Inception
    sum, two heads averaged) are not a shortcut and a branch."""
    # A parameter added to the stream (TNT's patch position embedding after its projection)
    # weighs as one map in DataFlow; here the two must both be maps applied to the data.
    maps = [
        n
        for n in flow.region_nodes(f.shortcut_region & flow.weighted_mask)
        if not is_add(n) and n.target not in (operator.mul, torch.mul, "mul")
    ]
    return (
        f.shortcut_weight == 2
        and sum(flow.weights[flow.order[n]] for n in maps) == 2
        and flow.depth(f.shortcut_region) == 2
        and not _nonlinear_after_map(f.shortcut_region, gm, flow)
        and f.branch_weight > 2
        and flow.depth(f.branch_region) > 2
    )


def _is_block(f: _Fork, gm: fx.GraphModule, flow: DataFlow) -> bool:
    """Whether a fork is a residual block: a shortcut that carries its input forward around a
    branch of learned maps."""
    if _reduces(flow.region_nodes(f.shortcut_region), gm) or (
        f.shortcut_weight > 1 and not _two_map_projection(f, gm, flow)
    ):
        # A shortcut carries its input's representation forward (identity, or a projection
        # of it); one that pools it away is a head: ``(exit1(h.mean()) + exit2(g(h))) / 2``
        # averages two classifiers (early-exit and deep-supervision models).
        return False
    if f.branch_weight == 0 and (f.shortcut_weight or _slot_on_branch(f.branch, gm, flow) is None):
        # No learned map: not a block (ConvNeXt-V2's GRN), unless the model's author put a
        # drop-path slot on it (MetaFormer's pooling token mixer, ``x + drop_path(pool(x) -
        # x)``: a residual branch whose mixer has no weights by design).
        return False
    if (
        f.branch_weight == 1
        and f.shortcut_weight == 1
        and f.branch_region & flow.dense_mask
        and _nonlinear_after_map(f.branch_region, gm, flow)
        and not _nonlinear_after_map(f.shortcut_region, gm, flow)
    ):
        # A residual unit of one conv-norm-act against a conv-norm projection: the activation
        # makes it a branch, where RepVGG's and MobileOne's parallel conv-norm maps summed are
        # linear (what lets them be re-parameterised into one conv).
        return True
    if f.branch_weight == 1 and (f.shortcut_weight or not f.branch_region & flow.dense_mask):
        # One learned map is a block only when it is dense and the shortcut is the identity
        # (EfficientNetV2's conv-bn-act block); a depthwise conv added to its input is a
        # convolutional position encoding (CPVT/DaViT/CoaT), not a residual block.
        return False
    # Parallel single maps summed (RepVGG/MobileOne) are not a branch and a shortcut.
    return not (f.shortcut_weight == 1 and flow.depth(f.branch_region) < 2)


# What an identity-like shortcut term may apply to its input: a norm (RepVGG's and MobileOne's
# identity branch is a BatchNorm), an affine written out, nothing learned that mixes.
_LIGHT_MODULES = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Identity,
)
_AFFINE_OPS = {operator.mul, operator.add, torch.mul, torch.add, "mul", "add"}


def _identity_like(region: int, gm: fx.GraphModule, flow: DataFlow) -> bool:
    """A shortcut term: the fork itself, or at most two light ops on it (one BatchNorm, an
    affine): no learned map, nothing pooled away."""
    ops = [n for n in flow.region_nodes(region) if n.op not in ("get_attr", "placeholder")]
    if flow.weight(region) or _reduces(ops, gm) or len(ops) > 2:
        return False
    for node in ops:
        if node.op == "call_module":
            if not isinstance(gm.get_submodule(str(node.target)), _LIGHT_MODULES):
                return False
        elif node.target not in _AFFINE_OPS and not is_metadata(node):
            return False
    return True


class _Chain(NamedTuple):
    """A re-parameterisable sum read as a whole: the fork, with the shortcut term's index."""

    fork: _Fork
    regroup: int
    inner: list[fx.Node]  # the partial sums it absorbs (none of them is a site)
    terms: list[fx.Node]  # the branch terms


def _reparam_chain(add: fx.Node, gm: fx.GraphModule, flow: DataFlow) -> _Chain | None:
    """A sum ``shortcut(x) + Σ_i map_i(x)`` of one identity-like term and at least two parallel
    single linear maps of one input, in any order and association: a re-parameterisable block
    (RepVGG, Ding et al. 2021; MobileOne, Vasu et al. 2023; the identity-first spelling of smp's
    and timm fastvit's MobileOne). One map against the identity is a convolutional position
    encoding (rule 3), maps without an identity term an Inception-like merge: neither is this.
    """
    chain = sum_terms(add)
    nodes = chain.nodes if chain is not None else []
    if len(nodes) < 3 or not all(flow.depends_on_input(n) for n in nodes):
        return None
    common = ~0
    for n in nodes:
        common &= flow.anc(n)
    fork_index = common.bit_length() - 1
    if fork_index < 0 or not flow.ancestors[fork_index] & flow.inputs_mask:
        return None
    regions = []
    for n in nodes:
        others = 0
        for m in nodes:
            others |= flow.anc(m) if m is not n else 0
        regions.append(flow.anc(n) & ~others)
    light = [i for i, r in enumerate(regions) if _identity_like(r, gm, flow)]
    if len(light) != 1:
        return None
    s = light[0]
    branch = [i for i in range(len(nodes)) if i != s]
    for i in branch:
        single_linear_map = (
            flow.weight(regions[i]) >= 1
            and flow.depth(regions[i]) == 1
            and not _nonlinear_after_map(regions[i], gm, flow)
        )
        if not single_linear_map or len(nodes[i].users) != 1:
            return None  # a deeper or nonlinear term, or one also read elsewhere
    branch_region = 0
    for i in branch:
        branch_region |= regions[i]
    weight = flow.weight(branch_region)
    f = _Fork(
        flow.nodes[fork_index], nodes[branch[-1]], 1, branch_region, weight, nodes[s], regions[s], 0
    )
    assert chain is not None
    regroup = next(i for i, t in enumerate(chain.terms) if t is nodes[s])
    return _Chain(f, regroup, chain.inner, [nodes[i] for i in branch])


def _reparam_chains(gm: fx.GraphModule, flow: DataFlow) -> dict[fx.Node, _Chain]:
    """Every re-parameterisable sum of the graph, by its last add."""
    chains: dict[fx.Node, _Chain] = {}
    for node in gm.graph.nodes:
        user = next(iter(node.users), None) if len(node.users) == 1 else None
        if not is_add(node) or (user is not None and is_add(user) and node in _inner_of(user)):
            continue
        chain = _reparam_chain(node, gm, flow)
        if chain is not None:
            chains[node] = chain
    return chains


def _inner_of(add: fx.Node) -> list[fx.Node]:
    chain = sum_terms(add)
    return chain.inner if chain is not None else []


def _block_child(owner_local: str, f: _Fork, flow: DataFlow) -> str | None:
    """The child of the owner that holds the whole branch (a loop over ``blocks``), if one does."""
    # What the branch computes from the fork: a cross-attention's context (CaiT's patches) is
    # read by the branch but computed before it, elsewhere.
    fork_bit = 1 << flow.order[f.fork]
    region_nodes = [n for n in flow.region_nodes(f.branch_region) if flow.anc(n) & fork_bit]
    weighted = {_module_path(n) for n in region_nodes if flow.weights[flow.order[n]]}
    called = {
        _module_path(n)
        for n in region_nodes
        if n.op == "call_module" or n.meta.get("owner_local", "") != owner_local
    }
    return _container_child(owner_local, weighted) or _single_child(owner_local, called | weighted)


def _branch_goes_on(add: fx.Node, f: _Fork, flow: DataFlow) -> bool:
    """Whether the branch's value is also used on its own, by something the add does not feed.

    A residual add merges its branch back into the stream: the branch is computed to be added,
    and what follows reads the sum. A positional embedding added to the queries and keys of an
    attention (SAM's two-way transformer, DETR-style decoders: ``q = queries + query_pe;
    attn(q, q, queries)``) is an add of two input-dependent values whose operands look like a
    stream and an identity shortcut, but the stream goes on without it: the values and the next
    residual read ``queries``, the sum only feeds the projections. Reading the branch's shape
    elsewhere is no use of its value.
    """
    add_bit = 1 << flow.order[add]
    return any(
        user is not add and not is_metadata(user) and not flow.anc(user) & add_bit
        for user in f.branch.users
    )


_SCALINGS = {operator.truediv, operator.mul, torch.div, torch.mul, "div", "mul", "__truediv__"}


def _merges_predictions(add: fx.Node, f: _Fork, flow: DataFlow) -> bool:
    """Whether an add in the model's own forward merges predictions: two heads averaged (``(a +
    b) / 2``: an ensemble, a teacher and a student head) or side outputs summed (deep
    supervision: ``s1 + s2 + s3``, one 1×1 head per stage). The first head against the rest
    looks like a projection shortcut around a branch, but a residual sum is read by the next
    block, and this one is the output: nothing learned reads it, and it is halved or one of a
    chain of sums. An identity shortcut is never a head."""
    if f.shortcut_weight == 0:
        return False
    stack, seen, output = [add], {add}, False
    while stack:
        for user in stack.pop().users:
            if user.op == "output":
                output = True
            elif flow.weights[flow.order[user]]:
                return False  # a learned map reads the sum: a stream going on
            elif user not in seen:
                seen.add(user)
                stack.append(user)
    chained = any(isinstance(a, fx.Node) and is_add(a) for a in add.args[:2]) or any(
        is_add(u) for u in add.users
    )
    halved = any(
        u.target in _SCALINGS and any(isinstance(a, int | float) for a in u.args)
        for u in add.users
        if u.op in ("call_function", "call_method")
    )
    return output and (chained or halved)


def _sites_in_part(part: TracedPart) -> tuple[list[ResidualSite], DataFlow]:
    gm = part.graph_module
    flow = DataFlow.of(gm)
    chains = _reparam_chains(gm, flow)
    absorbed = {n for c in chains.values() for n in c.inner}
    sites: list[ResidualSite] = []
    ordinals: dict[tuple[str, str], int] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        owner_local = node.meta.get("owner_local", "")
        key = node_key(node)
        ordinal = ordinals.get((owner_local, key), 0)
        ordinals[(owner_local, key)] = ordinal + 1
        chain = chains.get(node)
        if chain is not None:
            f = chain.fork  # rules 3-4 read on the whole sum (_reparam_chain)
        else:
            f = _fork_of(node, flow) if is_add(node) and node not in absorbed else None
            if f is None or not _is_block(f, gm, flow) or _branch_goes_on(node, f, flow):
                continue
            if not part.prefix and _merges_predictions(node, f, flow):
                continue
        site = _site(part, node, f, flow, key, ordinal)
        if chain is not None:
            site.branch = "+".join(t.name for t in chain.terms)
            site.regroup = chain.regroup
            # A drop-path slot on one term is not on the branch: the gate takes the whole sum.
            site.existing = site.existing_type = None
        sites.append(site)
    return sites, flow


def _site(
    part: TracedPart, node: fx.Node, f: _Fork, flow: DataFlow, key: str, ordinal: int
) -> ResidualSite:
    gm = part.graph_module
    owner_local = node.meta.get("owner_local", "")
    child = _block_child(owner_local, f, flow)
    existing_type = existing_drop_path(f.branch, gm)
    return ResidualSite(
        owner=_join(part.prefix, owner_local),
        node=node.name,
        key=key,
        ordinal=ordinal,
        fork=f.fork.name,
        branch=f.branch.name,
        shortcut=f.shortcut.name,
        branch_arg=f.branch_arg,
        branch_weight=f.branch_weight,
        shortcut_weight=f.shortcut_weight,
        block=_join(part.prefix, _join(owner_local, child) if child else owner_local),
        source=node.meta.get("source"),
        existing=_join(part.prefix, str(f.branch.target)) if existing_type else None,
        existing_type=existing_type,
        position=flow.order[node],
    )


def _internal(site: ResidualSite, flow: DataFlow, prefix: str) -> bool:
    """A residual add inside a layer rather than around a block.

    A block's residual add ends it, or hands over to the next residual branch of the same block
    (a transformer block's MLP after its attention), so some path from it leaves the owning
    module without another learned map. When every way out goes through a projection, the add
    is internal to a layer: SwiftFormer's ``final(proj(g·k) + q)``, MViTv2's residual pooling
    ``proj(attn + q)``, BoTNet's relative-position logits. The model's own forward is exempt
    (its head follows the last block), and so are sites whose block is a child (a loop over
    blocks). So are adds whose branch already holds the model's own drop-path module: its
    author marked the branch residual (a block that ends in a projection to the next width:
    ``x = x + drop_path1(attn(x)); ...; return reduce(x)``).
    """
    if site.block != site.owner or site.owner == prefix or site.existing is not None:
        return False
    add = next(n for n in flow.graph_module.graph.nodes if n.name == site.node)
    return _leaves_through_maps(add, add.meta.get("owner_local", ""), flow)


def _blocks_of(candidates: list[str], owner: str) -> list[str]:
    """The block of each of one owner's sites (in execution order), from each site's candidate:
    the child of the owner that holds its whole branch, or the owner itself.

    Candidates stand when the owner runs its children one after the other, every site's branch
    inside one: a loop over blocks (``for blk in self.blocks: x = x + blk(x)``: every candidate
    different; a site whose branch no one child holds is then a block of its own, the owner),
    or over blocks of several residuals each (``for attn, ff in self.layers: x = attn(x) + x;
    x = ff(x) + x``: consecutive runs of one child). Otherwise the owner is the block of all its
    sites: a transformer block's attention and MLP residuals, whose branches share no one child;
    children visited in turn (``a, b, a, b``).
    """
    if len(candidates) > 1 and len(set(candidates)) == len(candidates):
        return candidates
    runs = [c for i, c in enumerate(candidates) if i == 0 or c != candidates[i - 1]]
    if owner not in candidates and len(runs) > 1 and len(set(runs)) == len(runs):
        return candidates
    return [owner] * len(candidates)


def find_residual_sites(traced: TraceResult) -> list[ResidualSite]:
    """Every residual site of every traced part, in execution order."""
    found = [(part, *_sites_in_part(part)) for part in traced.parts]
    sites = [site for _, part_sites, _ in found for site in part_sites]
    by_owner: dict[str, list[ResidualSite]] = {}
    for site in sites:
        by_owner.setdefault(site.owner, []).append(site)
    for owner_sites in by_owner.values():
        blocks = _blocks_of([s.block for s in owner_sites], owner_sites[0].owner)
        for s, block in zip(owner_sites, blocks, strict=True):
            s.block = block
    return [
        site
        for part, part_sites, flow in found
        for site in part_sites
        if not _internal(site, flow, part.prefix)
    ]
