"""DropBlock (Ghiasi et al. 2018, "DropBlock: A regularization method for convolutional
networks", NeurIPS): the ``dropblock:`` section, its placement and its layer.

Placement: stages (analysis/stages.py) + a ``dropblock:`` recipe section → edits.

Ghiasi et al. 2018 ("DropBlock: A regularization method for convolutional networks", NeurIPS)
apply DropBlock to ResNet-50's groups 3 and 4, block_size 7, keep_prob ramped linearly from 1 to
0.9 over training. For any CNN retrofit offers two placements:

* ``placement: stages`` (default): one DropBlock on each chosen stage's output. The edit is an
  ``insert_after`` on the call that ends the stage, in the nearest module with a ``forward`` of
  its own (``analysis/stages.py:StageAnalysis.call_site``). A pass-through container
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
insert into: adding a child to the Sequential would change its length and indexing. A stage
(or block) it calls is then edited inside the code that computes its output: the stage's last
member with a forward of its own (a ResNet built as nested Sequentials: the stage's last
block). A stage with no such code (a bare torch layer) raises :class:`SequentialOwnerError`.

"The residual blocks of a stage" are the residual sites (analysis/residual.py) whose block output is
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

import dataclasses
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from retrofit.analysis.residual import ResidualSite
from retrofit.analysis.stages import CallSite, Stage, StageAnalysis
from retrofit.capture.shapes import shape_of
from retrofit.capture.trace import is_passthrough
from retrofit.edit import Edit
from retrofit.errors import RecipeError, RewriteError, TraceError
from retrofit.layers import DropBlock
from retrofit.spec import Spec, boolean, check_keys, choice, integer, number
from retrofit.techniques.record import Figures, Technique
from retrofit.techniques.table import mean, num, short_source, table, where

if TYPE_CHECKING:
    from retrofit.analysis.context import Analysis

__all__ = [
    "DropBlockSettings",
    "DropBlockSpec",
    "SequentialOwnerError",
    "TECHNIQUE",
    "dropblock_layer",
    "plan_dropblock",
    "select_stages",
]


@dataclass(frozen=True)
class DropBlockSpec(Spec):
    """DropBlock (Ghiasi et al. 2018, "DropBlock: A regularization method for conv networks").

    Args:
        stages: the stages to regularize, as 1-based indices into ``retrofit.stages(model)`` or
            module names (``layer3``); the paper uses ResNet-50's groups 3 and 4. Video CNNs
            (5-D input) have stages too, on their T×H×W maps.
        block_size: side of the dropped squares (cubes on video maps); the paper uses 7
            (clamped to the feature map). A list gives one per stage, in the order of ``stages``
            (timm's ResNet uses [5, 3] on stages 3 and 4).
        keep_prob: target keep probability in (0, 1]; the paper uses 0.9 (0.75-0.95 range).
        gamma_scale: factor on the seed rate γ, > 0 (timm's ``gamma_scale``: 0.25 and 1.0 on
            ResNet stages 3 and 4); a list gives one per stage. The dropped fraction is then
            ≈ gamma_scale·(1 − keep_prob).
        scale: rescale the kept activations by count/kept, as the paper does; false leaves them
            unscaled (timm's ``scale_by_keep=False``).
        placement: ``stages``: one DropBlock on each chosen stage's output; ``blocks``: after
            every residual block inside the chosen stages, as the paper does for ResNet.
        per_channel: an independent mask per channel instead of one shared across channels.
        ramp: fraction of training over which keep_prob goes linearly from 1 to its target
            (the paper ramps over the whole run: 1.0).
        fpn: also one DropBlock on every output level of the model's feature pyramid
            (torchvision's ``FeaturePyramidNetwork``, as in its Faster / Mask R-CNN, RetinaNet
            and FCOS), besides the chosen stages: the option Ghiasi et al. name for RetinaNet.
    """

    section: ClassVar[str] = "dropblock"
    PLACEMENTS: ClassVar[tuple[str, ...]] = ("stages", "blocks")

    stages: tuple[int | str, ...] = (3, 4)
    block_size: int | tuple[int, ...] = 7
    keep_prob: float = 0.9
    gamma_scale: float | tuple[float, ...] = 1.0
    scale: bool = True
    placement: str = "stages"
    per_channel: bool = False
    ramp: float = 1.0
    fpn: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DropBlockSpec:
        """Validate a ``dropblock:`` section (None → defaults)."""
        s = cls.section
        d = dict(d or {})
        check_keys(s, d, cls.field_names())
        stages = cls._stages(d.get("stages", list(cls.stages)))
        return cls(
            stages=stages,
            block_size=cls._per_stage(
                "block_size",
                d.get("block_size", cls.block_size),
                stages,
                lambda f, v: integer(f, v, low=1),
            ),
            keep_prob=number(f"{s}.keep_prob", d.get("keep_prob", cls.keep_prob), low=0, high=1),
            gamma_scale=cls._per_stage(
                "gamma_scale",
                d.get("gamma_scale", cls.gamma_scale),
                stages,
                lambda f, v: number(f, v, low=0.0, high=math.inf, high_open=True),
            ),
            scale=boolean(f"{s}.scale", d.get("scale", cls.scale)),
            placement=choice(f"{s}.placement", d.get("placement", cls.placement), cls.PLACEMENTS),
            per_channel=boolean(f"{s}.per_channel", d.get("per_channel", cls.per_channel)),
            ramp=number(f"{s}.ramp", d.get("ramp", cls.ramp), low=0.0, high=1.0),
            fpn=boolean(f"{s}.fpn", d.get("fpn", cls.fpn)),
        )

    @classmethod
    def _per_stage(cls, name: str, value: object, stages: tuple[int | str, ...], check: Any) -> Any:
        """One value for every stage, or a list with one per stage (in ``stages`` order)."""
        field = f"{cls.section}.{name}"
        if not isinstance(value, (list, tuple)):
            return check(field, value)
        if len(value) != len(stages):
            raise RecipeError(
                field,
                value,
                f"one value, or a list of {len(stages)} (one per stage of stages: {list(stages)})",
                f"the list has {len(value)}",
            )
        return tuple(check(f"{field}[{i}]", v) for i, v in enumerate(value))

    def for_stage(self, item: int | str) -> tuple[int, float]:
        """(block_size, gamma_scale) for the stage the recipe lists as ``item``."""
        i = self.stages.index(item)
        bs = self.block_size[i] if isinstance(self.block_size, tuple) else self.block_size
        gs = self.gamma_scale[i] if isinstance(self.gamma_scale, tuple) else self.gamma_scale
        return bs, gs

    @classmethod
    def _stages(cls, value: object) -> tuple[int | str, ...]:
        field = f"{cls.section}.stages"
        allowed = "a non-empty list of 1-based stage indices or module names, e.g. [3, 4]"
        # A single stage may be written without the list brackets.
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise RecipeError(field, value, allowed)
        out: list[int | str] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise RecipeError(field, value, allowed)
            if isinstance(item, int) and item < 1:
                raise RecipeError(field, value, allowed, f"stage {item}: stages count from 1")
            if isinstance(item, str) and not item.strip():
                raise RecipeError(field, value, allowed, "empty module name")
            if item in out:
                raise RecipeError(field, value, allowed, f"stage {item!r} is listed twice")
            out.append(item)
        return tuple(out)


@dataclass(frozen=True)
class DropBlockSettings:
    """The typed arguments of the DropBlock a ``dropblock`` edit inserts: the spec's, with this
    stage's ``block_size`` (clamped to its map) and ``gamma_scale``."""

    block_size: int
    keep_prob: float
    per_channel: bool = False
    ramp: float = 1.0
    gamma_scale: float = 1.0
    scale: bool = True

    def params(self) -> dict[str, Any]:
        """The plan's JSON form: gamma_scale and scale only when they differ from the paper's,
        so existing plans read as before."""
        out: dict[str, Any] = {
            "block_size": self.block_size,
            "keep_prob": self.keep_prob,
            "per_channel": self.per_channel,
            "ramp": self.ramp,
        }
        if self.gamma_scale != 1.0:
            out["gamma_scale"] = self.gamma_scale
        if not self.scale:
            out["scale"] = False
        return out


_FIELD = "dropblock.stages"


class SequentialOwnerError(RewriteError, ValueError):
    """DropBlock would have to be added to a pass-through container (``nn.Sequential``).

    Only a model that is itself such a container gets here: every other call site belongs to the
    nearest module with a ``forward`` of its own (``trace.is_passthrough``). The model is fine;
    retrofit cannot edit it there: a refusal (``RefusedError``, CLI exit 3), not bad input.
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
    settings = DropBlockSettings(
        block_size=block_size,
        keep_prob=spec.keep_prob,
        per_channel=spec.per_channel,
        ramp=spec.ramp,
        gamma_scale=gamma_scale,
        scale=spec.scale,
    )
    return Edit.at(
        site,
        kind=TECHNIQUE.name,
        action="insert_after",
        target=target or None,
        block=block,
        settings=settings,
        note="; ".join(notes),
    )


def _checked(sa: StageAnalysis, site: CallSite, where: str, module: str | None) -> CallSite:
    """``site``, unless its owner is a pass-through container (a model that is an nn.Sequential).

    Rewriting such an owner would add the DropBlock as a child of the Sequential: ``len`` and
    indexing would change and ``Sequential.forward`` would run it after the last layer. What
    ``module`` (the stage or block) outputs is then placed inside the code that computes it:
    ``output_site`` follows a Sequential to its last member (a ResNet built as nested
    Sequentials: the stage's last block, whose own forward returns the stage's output).
    """
    owner = sa.model.get_submodule(site.owner)
    if is_passthrough(owner) and module:
        try:
            inner = sa.output_site(module)
        except LookupError:
            inner = None
        code = sa.model.get_submodule(inner.owner) if inner is not None else None
        # A module of the model's own code; not a torch layer (an nn.ReLU given a child).
        if code is not None and not type(code).__module__.startswith("torch."):
            return inner
    if is_passthrough(owner):
        name = site.owner or "the model"
        raise SequentialOwnerError(
            f"cannot place DropBlock {where}: {name} is a {type(owner).__name__}, whose forward "
            "only chains its children, and a DropBlock inserted there would become one more "
            "child; wrap it in a module with a forward of its own"
        )
    return site


def _iterates_children(owner: Any) -> bool:
    # A container with a forward of its own (torchvision's IntermediateLayerGetter is an
    # nn.ModuleDict whose forward loops over self.items()) would also run an added child.
    return isinstance(owner, nn.ModuleDict | nn.ModuleList | nn.Sequential) and not (
        is_passthrough(owner)
    )


def _outside_containers(sa: StageAnalysis, stage: Stage) -> CallSite:
    site = _stage_site(stage)
    if stage.module and _iterates_children(sa.model.get_submodule(site.owner)):
        return sa.output_site(stage.module)
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
    """Planner for the recipe's ``dropblock:`` section (its technique record's planner): the
    chosen stages, then (``fpn: true``) the feature pyramid's output levels.

    Raises:
        NoConvStagesError: the model has no conv feature maps (a ViT).
        RecipeError: ``dropblock.stages`` names a stage the model does not have;
            ``dropblock.fpn`` on a model without a torchvision ``FeaturePyramidNetwork``.
    """
    edits = _plan_stages(analysis, spec)
    return edits + plan_fpn(analysis, spec) if spec.fpn else edits


def _plan_stages(analysis: Analysis, spec: DropBlockSpec) -> list[Edit]:
    sa = analysis.stages
    if sa.graph_module is None and spec.placement == "blocks" and sa.part is not None:
        return _plan_in_part(analysis, spec, sa)
    if sa.graph_module is None and spec.placement == "blocks":
        raise TraceError(
            f"dropblock.placement: blocks needs {type(analysis.model).__name__}'s forward as one "
            "graph, and it could not be read (see the plan's skipped modules); its stages were "
            "read part by part: use placement: stages"
        )
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
                    _checked(sa, _outside_containers(sa, stage), f"after {label}", stage.module),
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
                if _iterates_children(sa.model.get_submodule(call.owner)):
                    call = sa.output_site(block)
            else:
                call = CallSite(site.owner, site.node, site.key, site.ordinal, site.source)
            where = f"after block {i}/{len(in_stage)} of {label}"
            edits.append(
                _edit(
                    spec,
                    sizes[stage.index],
                    _checked(sa, call, where, block),
                    shape_of(node),
                    probe,
                    target=block,
                    where=where,
                    block=block or None,
                )
            )
    return edits


def _plan_in_part(analysis: Analysis, spec: DropBlockSpec, sa: StageAnalysis) -> list[Edit]:
    """``placement: blocks`` on a model whose stages all lie in one traced part (a detector's
    backbone, read apart from the detector's untraceable forward): planned in that part's own
    analysis, on its residual sites, and named in the model."""
    assert sa.part is not None
    prefix, local_sa = sa.part
    head = f"{prefix}." if prefix else ""

    def local(name: str) -> str:
        return name[len(head) :] if head and name.startswith(head) else name

    sites = [
        dataclasses.replace(site, owner=local(site.owner), block=local(site.block))
        for site in analysis.residual_sites
        if not head or site.owner == prefix or site.owner.startswith(head)
    ]
    part_analysis = _PartAnalysis(local_sa, sites)
    edits = _plan_stages(part_analysis, spec)  # type: ignore[arg-type]
    out = []
    for edit in edits:
        out.append(
            dataclasses.replace(
                edit,
                module=_join(prefix, edit.module),
                target=_join(prefix, edit.target) if edit.target is not None else None,
                block=_join(prefix, edit.block) if edit.block is not None else None,
            )
        )
    return out


@dataclasses.dataclass
class _PartAnalysis:
    """What plan_dropblock reads of an Analysis, for one part in its own (local) names."""

    stages: StageAnalysis
    residual_sites: list[ResidualSite]

    @property
    def model(self) -> Any:
        return self.stages.model


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _pyramids(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """torchvision's ``FeaturePyramidNetwork`` modules of ``model`` (none unless torchvision is
    already imported: a model cannot hold one otherwise)."""
    ops = sys.modules.get("torchvision.ops")
    fpn_type = getattr(ops, "FeaturePyramidNetwork", None)
    if fpn_type is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, fpn_type)]


def _fpn_levels(name: str, fpn: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convolution that computes each output level: the 3×3 ``layer_blocks`` (P2–P5 of
    Faster R-CNN, P3–P5 of RetinaNet), then the extra block's own convs (RetinaNet's / FCOS's
    ``p6``, ``p7``). Faster R-CNN's extra ``pool`` level is a stride-2 subsample of P5 inside
    ``LastLevelMaxPool``: it has no conv and carries P5's mask."""
    levels = []
    for i, block in enumerate(fpn.layer_blocks):
        conv = [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
        levels.append((f"{name}.layer_blocks.{i}", conv))
    extra = getattr(fpn, "extra_blocks", None)
    for child, m in extra.named_children() if extra is not None else []:
        if isinstance(m, nn.Conv2d):
            levels.append((f"{name}.extra_blocks.{child}", m))
    return levels


def _conv_output(analysis: Analysis, level: str, conv: nn.Conv2d) -> tuple[int, ...]:
    """The level's output shape at the probe: the recorded input of its conv, through the
    conv's own output-size formula."""
    call = analysis.call(level)
    x = call.args[0] if call is not None and call.args else None
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise TraceError(f"cannot place DropBlock after {level}: it did not run on the probe input")
    dims = []
    for i, side in enumerate(x.shape[2:]):
        k, st, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        pad = conv.padding[i] if isinstance(conv.padding, tuple) else 0
        dims.append((side + 2 * pad - d * (k - 1) - 1) // st + 1)
    return (int(x.shape[0]), conv.out_channels, *dims)


def plan_fpn(analysis: Analysis, spec: DropBlockSpec) -> list[Edit]:
    """``dropblock.fpn``: one DropBlock after every output level of each feature pyramid,
    in the level's own module (the pyramid's forward gathers its levels in a dict, which a
    layer inserted after the pyramid's call would receive). Per-stage ``block_size`` /
    ``gamma_scale`` lists give the pyramid the last listed stage's values.

    Raises:
        RecipeError: on ``dropblock.fpn`` when the model has no feature pyramid.
    """
    pyramids = _pyramids(analysis.model)
    if not pyramids:
        raise RecipeError(
            "dropblock.fpn", True, "true only for a model with torchvision's "
            "FeaturePyramidNetwork (Faster / Mask / Keypoint R-CNN, RetinaNet, FCOS)",
            f"{type(analysis.model).__name__} has none",
        )  # fmt: skip
    sa, sizes = analysis.stages, spec.for_stage(spec.stages[-1])
    edits = []
    for name, fpn in pyramids:
        levels = _fpn_levels(name, fpn)
        for i, (level, conv) in enumerate(levels, start=1):
            shape = _conv_output(analysis, level, conv)
            where = (f"after FPN level {i}/{len(levels)} ({level}, reduction "
                     f"{sa.probe_shape[-1] // shape[-1]})")  # fmt: skip
            site = _checked(sa, sa.output_site(level), where, level)
            edits.append(_edit(spec, sizes, site, shape, sa.probe_shape, target=level, where=where))
    return edits


def dropblock_layer(edit: Edit) -> DropBlock:
    """The layer a ``dropblock`` edit inserts (its technique record's layer).

    It starts at keep_prob 1.0; ``retrofit.schedule.update(model, t)`` ramps it to the
    settings' ``keep_prob``.
    """
    s: DropBlockSettings = edit.settings
    return DropBlock(
        keep_prob=s.keep_prob,
        block_size=s.block_size,
        per_channel=s.per_channel,
        ramp=s.ramp,
        gamma_scale=s.gamma_scale,
        scale=s.scale,
    )


# --- what it reports ---------------------------------------------------------------------------

_STAGE = re.compile(r"\bstage (\d+)")


def plan_table(edits: Sequence[Edit], model: str) -> list[str]:
    """The stage, block_size and keep_prob of each DropBlock (Ghiasi et al. 2018)."""
    first: DropBlockSettings = edits[0].settings
    head = f"DropBlock (Ghiasi et al. 2018): {len(edits)} layer(s)"
    targets = {e.settings.keep_prob for e in edits}
    if len(targets) == 1:
        head += f", keep_prob ramps from 1 to {num(targets.pop())}"
        head += f" over the first {first.ramp:.0%} of training"
    if first.per_channel:
        head += ", a mask per channel"
    rows = []
    for e in edits:
        # The stage index is in the planner's note ("after stage 3 (layer3, reduction 16)"); the
        # rest of the note (a clamped block_size, a stage without blocks) stays in the last column.
        note = e.note or ""
        stage = _STAGE.search(note)
        rest = "; ".join(part for part in note.split("; ") if not part.startswith("after "))
        rows.append(
            (
                stage.group(1) if stage else "",
                e.target or e.node,
                num(e.settings.block_size),
                num(e.settings.keep_prob),
                where(e, model),
                short_source(e.source),
                rest,
            )
        )
    header = ("stage", "after", "block_size", "keep_prob", "inserted in", "source", "note")
    return [head, *table(header, rows)]


def _means(rates: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    keep_prob = mean([float(r["keep_prob"]) for r in rates])
    return {} if keep_prob is None else {"keep_prob": keep_prob}


def _parts(values: Mapping[str, Any]) -> list[str]:
    if values.get("keep_prob") is None:
        return []
    return [f"DropBlock keep_prob {values['keep_prob']:.3f}"]


def _plot(rate: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": rate["kind"], "target": rate.get("target_keep_prob")}


TECHNIQUE = Technique(
    name="dropblock",
    parse=DropBlockSpec.parse,
    spec=DropBlockSpec,
    fields=DropBlockSpec.field_names(),
    planner=plan_dropblock,
    layer=dropblock_layer,
    layer_class=DropBlock,
    actions=("insert_after",),
    table=plan_table,
    # An epoch record carries the keep_prob its last step ran at (the ramp moves it).
    figures=Figures(means=_means, parts=_parts, logged={"keep_prob": "last"}, plot=_plot),
)
