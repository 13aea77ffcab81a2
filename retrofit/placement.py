"""DropBlock placement: stages (graph/stages.py) + a ``dropblock:`` recipe section → edits.

Ghiasi et al. 2018 ("DropBlock: A regularization method for convolutional networks", NeurIPS)
apply DropBlock to ResNet-50's groups 3 and 4, block_size 7, keep_prob ramped linearly from 1 to
0.9 over training. For any CNN retrofit offers two placements:

* ``placement: stages`` (default): one DropBlock on each chosen stage's output. The edit is an
  ``insert_after`` on the call that ends the stage, in the nearest module with a ``forward`` of
  its own (``graph/stages.py:StageAnalysis.call_site``). A pass-through container
  (``nn.Sequential``) owns no code, so for torchvision's ResNet-50 "after ``layer3``" is the root
  ``ResNet``'s call of ``layer3.5`` (``layer3``'s last block), and for torchvision ConvNeXt
  "after ``features.5``" the root's call of ``features.5.8``. A Sequential never gains a child
  (its length, indexing and ``Sequential.forward`` stay as they were). The edit's ``target`` is
  the stage module and its note says "after stage 3 (layer3, reduction 16)", so a plan's table
  reads ``insert_after layer3`` on the row of node ``layer3_5``. The stage's next consumer (the
  next stage's first block, both its branch and its shortcut) sees the masked map.
* ``placement: blocks``: one DropBlock after every residual block of the chosen stages — after the
  block's output, i.e. after its add *and* the activation that follows it. The paper applies
  DropBlock after the convolutions and on the skip connection of each block; masking every
  block's output is the placement a rewrite can make in any CNN without editing block code,
  and it masks what both the next block's branch and its skip connection read. A residual add
  in the model's own ``forward`` (no block module) gets its DropBlock right after the add:
  masking with non-negative scale commutes with a following ReLU, so it is the same thing.
  A chosen stage without residual blocks (VGG) gets one DropBlock on its output, and a note.
  The edit's ``target`` is the block module (``layer3.0``).

A model that is itself a pass-through container (a bare ``nn.Sequential`` CNN) has no code to
insert into: the only way would add a child to the Sequential, so planning raises
:class:`SequentialOwnerError` instead.

"The residual blocks of a stage" are the residual sites (graph/residual.py) whose block output is
an NCHW map at the stage's reduction, computed after the previous stage's end and no later than
this stage's end. So for ResNet-50, stages [3, 4] give 6 + 3 DropBlocks.

The block_size of an edit is clamped to its feature map at the probe input (a 9 on ResNet's 7×7
``layer4`` becomes 7) and the edit's note says so; at run time ``drop_block`` clamps to the map it
actually sees. A per-stage ``block_size`` / ``gamma_scale`` list gives each chosen stage its own
value, matched to the stage by its position in ``dropblock.stages``. Every inserted DropBlock
starts at keep_prob 1.0 and ramps to the recipe's target through
``retrofit.schedule.update(model, t)``.

Video CNNs (5-D input, T×H×W maps: torchvision's ``r3d_18``, ``mc3_18``, ``r2plus1d_18``) are
placed the same way; the layer is 3-D DropBlock on their maps (blocks of bs×bs×bs, each side
clamped to its dimension; ``retrofit/layers/dropblock.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx

from retrofit.edit import Edit
from retrofit.errors import ModelError, RecipeError, TraceError
from retrofit.graph.residual import ResidualSite
from retrofit.graph.shapes import shape_of
from retrofit.graph.stages import CallSite, Stage, StageAnalysis
from retrofit.graph.trace import is_passthrough
from retrofit.layers import DropBlock

if TYPE_CHECKING:
    from retrofit.analysis import Analysis
    from retrofit.recipe import DropBlockSpec

__all__ = [
    "SequentialOwnerError",
    "dropblock_layer",
    "plan_dropblock",
    "select_stages",
]

_FIELD = "dropblock.stages"


class SequentialOwnerError(ModelError):
    """DropBlock would have to be added to a pass-through container (``nn.Sequential``).

    Only a model that is itself such a container gets here: every other call site belongs to the
    nearest module with a ``forward`` of its own (``trace.is_passthrough``).
    """


def select_stages(found: list[Stage], wanted: tuple[int | str, ...]) -> list[Stage]:
    """The stages a recipe names (1-based indices or stage module names), in model order.

    Raises:
        RecipeError: on ``dropblock.stages`` for an index out of range or an unknown name.
    """
    names = [s.module for s in found if s.module]
    allowed = f"1..{len(found)} or one of [{', '.join(names)}]"
    chosen: dict[int, Stage] = {}
    for item in wanted:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 1 <= item <= len(found):
                raise RecipeError(_FIELD, item, allowed, f"the model has {len(found)} stages")
            stage = found[item - 1]
        else:
            match = [s for s in found if s.module and s.module == item]
            if not match:
                raise RecipeError(_FIELD, item, allowed, "not a stage module of this model")
            stage = match[0]
        chosen[stage.index] = stage
    return [chosen[i] for i in sorted(chosen)]


def _dims(shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The map's (H, W), or (T, H, W) for a video map (N, C, T, H, W)."""
    assert shape is not None and len(shape) in (4, 5)
    return tuple(shape[2:])


def _edit(
    spec: DropBlockSpec,
    sizes: tuple[int, float],
    site: CallSite,
    shape: tuple[int, ...] | None,
    probe: tuple[int, ...],
    *,
    target: str,
    where: str,
    block: str | None = None,
    extra_note: str | None = None,
) -> Edit:

    dims = _dims(shape)
    wanted, gamma_scale = sizes
    block_size = wanted
    notes = [where]
    # The largest side a block can take: min(H, W) on a 2-D map (square blocks), the largest
    # dimension of a video map (each side clamps on its own; see layers/dropblock.py).
    largest = min(dims) if len(dims) == 2 else max(dims)
    if block_size > largest:
        block_size = largest
        notes.append(
            f"block_size {wanted} clamped to {block_size}: larger than the "
            f"{'×'.join(map(str, dims))} map at the {'×'.join(map(str, probe[2:]))} probe input"
        )
    if extra_note:
        notes.append(extra_note)
    params: dict[str, Any] = {
        "block_size": block_size,
        "keep_prob": spec.keep_prob,
        "per_channel": spec.per_channel,
        "ramp": spec.ramp,
    }
    # Only when they differ from the paper's, so existing plans read as before.
    if gamma_scale != 1.0:
        params["gamma_scale"] = gamma_scale
    if not spec.scale:
        params["scale"] = False
    return Edit.at(
        site,
        kind="dropblock",
        action="insert_after",
        target=target or None,
        block=block,
        params=params,
        note="; ".join(notes),
    )


def _checked(sa: StageAnalysis, site: CallSite, where: str) -> CallSite:
    """``site``, unless its owner is a pass-through container (a model that is an nn.Sequential).

    Rewriting such an owner would add the DropBlock as a child of the Sequential: ``len`` and
    indexing would change and ``Sequential.forward`` would run it after the last layer.
    """
    owner = sa.model.get_submodule(site.owner)
    if is_passthrough(owner):
        name = site.owner or "the model"
        raise SequentialOwnerError(
            f"cannot place DropBlock {where}: {name} is a {type(owner).__name__}, whose forward "
            "only chains its children, and a DropBlock inserted there would become one more "
            "child; wrap it in a module with a forward of its own"
        )
    return site


def _stage_site(stage: Stage) -> CallSite:
    if stage.site is None:
        raise TraceError(
            f"cannot place DropBlock after stage {stage.index} ({stage.module or '<root>'}): the "
            "module that calls it cannot be re-traced on its own"
        )
    return stage.site


def _block_outputs(
    sa: StageAnalysis, sites: list[ResidualSite]
) -> list[tuple[str, fx.Node, ResidualSite]]:
    """(block module, node of its output, one of its sites) per residual block, in order."""
    seen: dict[str, tuple[str, fx.Node, ResidualSite]] = {}
    for site in sites:
        if site.block in seen:
            continue
        # A block module ends at its output; an add in the root's own code is its own output.
        node = sa.module_output.get(site.block) if site.block else sa.node(site.node)
        if node is not None:
            seen[site.block] = (site.block, node, site)
    return sorted(seen.values(), key=lambda item: sa.position[item[1]])


def _blocks_in(
    sa: StageAnalysis, stage: Stage, blocks: list[tuple[str, fx.Node, ResidualSite]]
) -> list[tuple[str, fx.Node, ResidualSite]]:
    end = sa.position[sa.node(stage.node)]
    start = -1
    if stage.index > 1:
        start = sa.position[sa.node(sa.stages[stage.index - 2].node)]
    return [
        b
        for b in blocks
        if start < sa.position[b[1]] <= end and sa.reduction_of(b[1]) == stage.reduction
    ]


def plan_dropblock(analysis: Analysis, spec: DropBlockSpec) -> list[Edit]:
    """Planner for the recipe's ``dropblock:`` section (registered in ``plan.PLANNERS``).

    Raises:
        NoConvStagesError: the model has no conv feature maps (a ViT).
        RecipeError: ``dropblock.stages`` names a stage the model does not have.
    """
    sa = analysis.stages
    chosen = select_stages(sa.stages, spec.stages)
    # The recipe's entry for each chosen stage, for per-stage block_size / gamma_scale.
    sizes = {
        select_stages(sa.stages, (item,))[0].index: spec.for_stage(item) for item in spec.stages
    }
    probe = sa.probe_shape
    edits: list[Edit] = []
    blocks = _block_outputs(sa, analysis.residual_sites) if spec.placement == "blocks" else []
    for stage in chosen:
        label = f"stage {stage.index} ({stage.module or '<root>'}, reduction {stage.reduction})"
        in_stage = _blocks_in(sa, stage, blocks) if spec.placement == "blocks" else []
        if not in_stage:
            extra = None
            if spec.placement == "blocks":
                extra = "no residual blocks in this stage: placed on the stage output"
            edits.append(
                _edit(
                    spec,
                    sizes[stage.index],
                    _checked(sa, _stage_site(stage), f"after {label}"),
                    stage.shape,
                    probe,
                    target=stage.module,
                    where=f"after {label}",
                    extra_note=extra,
                )
            )
            continue
        for i, (block, node, site) in enumerate(in_stage, start=1):
            if block and sa.module_output.get(block) is node:
                call = sa.call_site(block)
            else:
                call = CallSite(site.owner, site.node, site.key, site.ordinal, site.source)
            where = f"after block {i}/{len(in_stage)} of {label}"
            edits.append(
                _edit(
                    spec,
                    sizes[stage.index],
                    _checked(sa, call, where),
                    shape_of(node),
                    probe,
                    target=block,
                    where=where,
                    block=block or None,
                )
            )
    return edits


def dropblock_layer(edit: Edit) -> DropBlock:
    """The layer a ``dropblock`` edit inserts (registered in ``rewrite.LAYER_FACTORIES``).

    It starts at keep_prob 1.0; ``retrofit.schedule.update(model, t)`` ramps it to
    ``params["keep_prob"]``.
    """
    params: dict[str, Any] = edit.params
    return DropBlock(
        keep_prob=params["keep_prob"],
        block_size=params["block_size"],
        per_channel=params.get("per_channel", False),
        ramp=params.get("ramp", 1.0),
        gamma_scale=params.get("gamma_scale", 1.0),
        scale=params.get("scale", True),
    )
