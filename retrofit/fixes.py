"""Fixes for Dropout before BatchNorm (Li et al., CVPR 2019): Uout, move, BN recalibration.

Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019 (arXiv:1801.05134). A dropout that reaches a BatchNorm makes BN
accumulate a training-time variance that inference never sees. Three remedies:

* ``uout: {beta}`` (recipe) — replace each flagged dropout with Uout, y = x + x·r,
  r ~ U(−β, β): its train/test variance ratio is 1 + β²/3 instead of 1/q for keep rate q.
* ``dropout_fix: after_last_bn`` (recipe) — remove the flagged dropouts and put one Dropout
  (same p) after the last BN, on the classifier's input, where no BN can see it: the placement
  the paper recommends and torchvision/timm use for ``drop_rate``.
* :func:`recalibrate_bn` (API) — for a model already trained with the bug: re-estimate every BN's
  running statistics with dropout off, so ``running_var`` is the variance inference really has.

The planners here read the Dropout → BN analysis (``retrofit.graph.dropout_bn``) and return
edits; ``retrofit.rewrite`` makes them and ``retrofit.apply`` verifies that eval output is
unchanged (both fixes are the identity in eval, like the dropouts they replace).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retrofit.edit import Edit
from retrofit.graph.dropout_bn import (
    DropoutBNAnalysis,
    DropoutSite,
    HeadPlace,
    find_head_place,
    is_running_stat_norm,
)
from retrofit.layers.uout import Uout

if TYPE_CHECKING:
    from retrofit.analysis import Analysis
    from retrofit.recipe import UoutSpec

__all__ = [
    "dropout_fix_layer",
    "plan_dropout_fix",
    "plan_uout",
    "recalibrate_bn",
    "run_batches",
    "uout_layer",
]


# --- planners ---------------------------------------------------------------------------------


def _dropout_bn(analysis: Analysis) -> DropoutBNAnalysis:
    # The training-mode trace (analysis.traced_training): an eval-mode one has fx's baked
    # ``F.dropout(x, p, self.training)`` as a no-op.
    return analysis.dropout_bn


def _victims(result: DropoutBNAnalysis, site: DropoutSite) -> list[str]:
    return [pair.norm for pair in result.pairs if pair.site is site]


def _why(result: DropoutBNAnalysis, site: DropoutSite) -> str:
    victims = _victims(result, site)
    more = f" and {len(victims) - 1} more" if len(victims) > 1 else ""
    return f"reaches {victims[0]}{more}"


def _replace(
    site: DropoutSite, kind: str, params: dict[str, Any], note: str, done: set[str]
) -> Edit | None:
    """The edit that swaps one flagged dropout for a new layer, or None when it cannot be made."""

    common = dict(kind=kind, params=params, note=note)
    if not site.fixable:
        return None
    if site.kind in ("module", "inside") and site.module:
        if site.module in done:  # one module called at several places is swapped once
            return None
        done.add(site.module)
        return Edit.at(site, **common, action="replace_module", target=site.module)
    if site.kind == "function":
        return Edit.at(site, **common, action="replace_call")
    return None


def plan_uout(analysis: Analysis, spec: UoutSpec) -> list[Edit]:
    """Replace every dropout that reaches a BatchNorm with ``Uout(beta)`` (Li et al. 2019).

    An ``nn.Dropout*`` module is swapped for a Uout module; a functional ``F.dropout`` call is
    replaced by a call of an added Uout module. Uout is the identity in eval, as Dropout was.
    """
    result = _dropout_bn(analysis)
    edits: list[Edit] = []
    done: set[str] = set()
    for site in result.flagged():
        edit = _replace(
            site, "uout", {"beta": spec.beta}, f"{site.op}(p={site.p}) {_why(result, site)}", done
        )
        if edit is not None:
            edits.append(edit)
    return edits


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
    result = _dropout_bn(analysis)
    edits: list[Edit] = []
    done: set[str] = set()
    rates: list[float] = []
    for site in result.flagged():
        edit = _replace(
            site,
            "dropout_fix",
            {"role": "remove"},
            f"removed {site.op}(p={site.p}): {_why(result, site)}",
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


def _insert(place: HeadPlace, p: float, mixed: str) -> Edit:

    common = dict(kind="dropout_fix")
    note = f"Dropout(p={p}){mixed} after the last BN, on the input of {place.classifier}"
    if place.action == "replace_module":
        return Edit.at(
            place,
            **common,
            action="replace_module",
            target=place.target,
            params={"role": "insert", "p": p},
            note=note + f" (reuses the empty slot {place.target})",
        )
    return Edit.at(
        place, **common, action="wrap_arg", arg=0, params={"role": "insert", "p": p}, note=note
    )


# --- layers the rewrite builds for these edits ------------------------------------------------


def uout_layer(edit: Edit) -> nn.Module:
    """``LAYER_FACTORIES["uout"]``: the Uout that replaces a flagged dropout."""
    return Uout(beta=float(edit.params.get("beta", 0.1)))


def dropout_fix_layer(edit: Edit) -> nn.Module:
    """``LAYER_FACTORIES["dropout_fix"]``: Identity for a removed dropout, Dropout(p) for the
    one after the last BN."""
    role = edit.params.get("role")
    if role == "remove":
        return nn.Identity()
    if role == "insert":
        return nn.Dropout(float(edit.params["p"]))
    raise ValueError(f"dropout_fix edit role has to be 'remove' or 'insert', but got {role!r}")


# --- recalibration ----------------------------------------------------------------------------


def _inputs(batch: Any) -> Any:
    """The model input of one batch: a tensor, or the first item of an ``(x, y)`` pair."""
    if isinstance(batch, list | tuple):
        if not batch:
            raise ValueError("an empty batch: expected a tensor or an (input, target) pair")
        return batch[0]
    return batch


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def run_batches(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Forward each batch (no grad, moved to the model's device and dtype); returns the count."""
    device, dtype = _device_dtype(model)
    if device.type == "meta":
        raise ValueError("the model is on the meta device: running batches needs real weights")
    count = 0
    with torch.no_grad():
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            x = _inputs(batch)
            if isinstance(x, torch.Tensor):
                x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
            model(x)
            count += 1
    return count


def recalibrate_bn(
    model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics with dropout off; in place, returned.

    Li et al. 2019: a model trained with Dropout before BN keeps a ``running_var`` inflated by
    dropout, which inference (dropout off) never sees. Recalibration runs ``batches`` (tensors or
    ``(input, target)`` pairs; training data, no labels needed) with every running-stat norm in
    training mode and *every other module in eval* — so ``nn.Dropout`` is off, and so is
    ``F.dropout(x, p, self.training)``, which follows its owner's flag — and with
    ``momentum=None``, torch's cumulative average, so each batch counts equally.

    Weights are untouched; only ``running_mean``, ``running_var`` and ``num_batches_tracked``
    change. Training flags and momenta are restored afterwards.

    Args:
        model: the trained model (real weights, any device).
        batches: an iterable of input tensors or ``(input, target)`` pairs.
        max_batches: stop after this many batches (None: all).

    Raises:
        ValueError: no batch was given, or the model is on the meta device.
    """
    norms = [m for m in model.modules() if is_running_stat_norm(m)]
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    # The old statistics come back if no batch arrives or a forward fails: nothing half-done.
    saved = [{k: v.detach().clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    count = 0
    try:
        for m, _ in flags:
            m.training = False  # flags directly: a model's train() override is not run
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.training = True
        count = run_batches(model, batches, max_batches)
    finally:
        for m, flag in flags:
            m.training = flag
        for m, momentum in momenta:
            m.momentum = momentum
        if count == 0:
            with torch.no_grad():
                for m, buffers in zip(norms, saved, strict=True):
                    for name, value in buffers.items():
                        getattr(m, name).copy_(value)
    if count == 0:
        raise ValueError("recalibrate_bn needs at least one batch, but `batches` was empty")
    return model
