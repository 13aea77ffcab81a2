"""Schedules: the survival of each residual block over depth, and every rate over training.

Pure functions of (position, hyper-parameters) — no model, no state — plus :func:`update`, which
applies the training-progress schedules to a model's inserted layers.

**Over depth** (stochastic depth, Huang et al. 2016, "Deep Networks with Stochastic Depth"):
block l of L survives with

* ``linear`` (the paper's linear decay rule, Composer's ``drop_distribution="linear"``):
  p_l = 1 − (l/L)(1 − p_L), l = 1..L, so p_0 = 1 and the last block keeps p_L;
* ``uniform`` (Composer's ``"uniform"``): p_l = p_L for every block;
* ``timm`` (timm's ``drop_path_rate`` spacing, ``calculate_drop_path_rates`` and ResNet's
  ``drop_path_rate · idx/(N − 1)``): with d = 1 − p_L (timm's ``drop_path_rate``),
  p_l = 1 − d·(l − 1)/(L − 1). Block 1 is never dropped and block L keeps p_L. It differs from
  the paper's rule by d·(L − l)/(L(L − 1)), at most d/L: 0.031 on ResNet-50 (L = 16) at p_L 0.5.

``stagewise=True`` applies the rule over stages instead of blocks: every block of stage s of S
gets the rule's value at position s of S (``linear``: 1 − (s/S)(1 − p_L); ``timm``:
1 − d·(s − 1)/(S − 1), the "linear increase across stages, same rate within each stage" that
timm's ``calculate_drop_path_rates(stagewise=True)`` documents). A block's stage is the
container it sits in — its qualified module name without the last component (:func:`stage_of`):
``layer3.1`` → ``layer3``, ``stages.2.blocks.0`` → ``stages.2.blocks``, ``blocks.7`` → ``blocks``
(a ViT is one stage). Blocks that are siblings in one ``nn.Sequential``/``nn.ModuleList`` are one
stage in every zoo this project measures; stages are numbered in the order their first block runs.

**Over training** (progress t = step / total_steps ∈ [0, 1]): DropBlock's keep_prob goes
linearly from 1 to its target (Ghiasi et al. 2018, "Scheduled DropBlock": a fixed low keep_prob
from the start hurts early training), and with ``stochastic_depth.warmup`` each gate's survival
goes linearly from 1 to its p_l over the first ``warmup`` fraction of training (Composer's
``drop_warmup``: the drop rate ramps up from 0). A training loop, retrofit's or the user's own
(or a callback of ``retrofit.integrations``), calls

    retrofit.schedule.update(model, t)      # t = step / total_steps, in [0, 1]

once per step; every submodule with a ``set_progress(t)`` method is updated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from retrofit.layers.protocol import Counting, Progressive, Reporting
from retrofit.layers.ramps import linear_ramp, progress, warmed_up
from retrofit.layers.slots import reset_slot, slot_rates, watched
from retrofit.techniques import TECHNIQUES
from retrofit.techniques.depth import SCHEDULES, block_survivals, stage_of, survival

__all__ = [
    "SCHEDULES",
    "block_rates",
    "block_survivals",
    "current_rates",
    "measured_modules",
    "linear_ramp",
    "progressive_modules",
    "reset_stats",
    "stage_of",
    "statistics",
    "summary",
    "survival",
    "update",
    "update_modules",
    "warmed_up",
]


def update(model: nn.Module, t: float) -> None:
    """Set every inserted regularizer's rate for training progress t ∈ [0, 1]."""
    update_modules(progressive_modules(model), t)


def progressive_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that :func:`update` sets (those with ``set_progress``).

    A loop that updates every step finds them once (``isinstance`` against a runtime Protocol
    checks attributes: over a whole model it costs milliseconds a step) and calls
    :func:`update_modules` on the list.
    """
    return [m for m in model.modules() if isinstance(m, Progressive)]


def update_modules(modules: Sequence[nn.Module], t: float) -> None:
    """:func:`update` on the modules :func:`progressive_modules` found."""
    t = progress(t)
    for module in modules:
        module.set_progress(t)


def measured_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules :func:`current_rates` and :func:`reset_stats` read, with their names: the
    layers retrofit inserted and the model's reused drop-path slots.

    A loop that reports every few steps finds them once and passes them as ``found``: the
    runtime-Protocol ``isinstance`` checks over every module of a model cost ~20 ms a report on
    a 260-module segmenter (and grow with the model).
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, Reporting | Counting) or watched(m)
    ]


def current_rates(
    model: nn.Module, *, found: Sequence[tuple[str, nn.Module]] | None = None
) -> dict[str, dict[str, Any]]:
    """Current rate of every retrofit regularizer, by module name, for logging.

    Each value has a ``kind`` (the technique's name: ``"stochastic_depth"``, ``"dropblock"``,
    ``"uout"`` …) and that layer's hyper-parameters. Stochastic depth is
    reported per site, for the gates retrofit inserted and for the model's own drop-path slots
    it reused (``retrofit.layers.slots``, those carry ``reused``: the slot's class name):
    ``depth`` (the block l), ``survival`` (now) and ``target_survival`` (planned p_l), the
    training samples counted since the last reset (``calls``, ``kept``) and ``kept_fraction =
    kept / calls`` (None before any training call: nothing measured; reading it may synchronise
    an accelerator once). Gates add whether the branch is ``outlined`` (skipped when dropped),
    their ``seed`` and ``draws`` counter, and ``recent``: the kept fraction of each eager
    training call since the last reset (at most ``StochasticDepthGate.HISTORY``). ``found``:
    what :func:`measured_modules` gave for this model (it is searched otherwise).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules() if found is None else found:
        if isinstance(module, Reporting):
            out[name] = {"kind": module.kind, **module.rates()}
        else:
            slot = slot_rates(module)
            if slot is not None:
                out[name] = slot
    return out


def reset_stats(model: nn.Module, *, found: Sequence[tuple[str, nn.Module]] | None = None) -> None:
    """Start a new measuring window: zero the kept/calls counters of every counting layer and
    every reused drop-path slot (draw counters stay: they key the seeded draws). ``found``: as
    for :func:`current_rates`."""
    for _, module in model.named_modules() if found is None else found:
        if isinstance(module, Counting):
            module.reset_stats()
        else:
            reset_slot(module)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _per_depth(rates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    kinds = {name for name, t in TECHNIQUES.items() if t.figures.per_depth}
    return [r for r in rates.values() if r.get("kind") in kinds]


def block_rates(rates: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per block l (the sites sharing a ``depth``), from :func:`current_rates`, over the layers
    of the techniques that report per depth (stochastic depth's gates and reused slots):
    ``sites`` (how many), mean ``survival`` (now) and ``target_survival`` (planned p_l), summed
    ``calls`` and ``kept``, and ``kept_fraction = kept / calls`` (None when the block made no
    training call). Ordered by depth."""
    by_depth: dict[int, list[dict[str, Any]]] = {}
    for i, r in enumerate(_per_depth(rates)):
        by_depth.setdefault(int(r.get("depth") or i + 1), []).append(r)
    out: dict[int, dict[str, Any]] = {}
    for depth in sorted(by_depth):
        sites = by_depth[depth]
        calls = sum(int(r.get("calls") or 0) for r in sites)
        kept = sum(int(r.get("kept") or 0) for r in sites)
        out[depth] = {
            "sites": len(sites),
            "survival": _mean([float(r["survival"]) for r in sites]),
            "target_survival": _mean(
                [float(r.get("target_survival", r["survival"])) for r in sites]
            ),
            "calls": calls,
            "kept": kept,
            "kept_fraction": kept / calls if calls else None,
        }
    return out


def summary(rates: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The scalars every consumer reports (the trainer's console line and metrics.jsonl, the
    framework loggers of ``retrofit.integrations``), from :func:`current_rates`: each
    technique's own (its record's ``figures.means`` over its layers), in recipe order:

    * stochastic depth, over every site — inserted gates and reused slots, survival 1.0
      included: ``sd_survival``, mean current survival; ``sd_planned``, mean planned p_l;
      ``sd_kept``, mean kept fraction over the sites that made training calls since the last
      reset (left out when none did: an eval-only window has no training statistic);
    * DropBlock: ``keep_prob``, mean current keep_prob;
    * any other technique: the scalars its record names.

    Keys without layers are left out."""
    out: dict[str, float] = {}
    for name, technique in TECHNIQUES.items():
        mine = [r for r in rates.values() if r.get("kind") == name]
        if mine:
            out.update(technique.figures.means(mine))
    return out


def statistics(model: nn.Module) -> dict[str, Any]:
    """Everything a report needs in one read: :func:`summary`'s scalars, ``blocks``
    (:func:`block_rates`) and ``layers`` (:func:`current_rates`). The one source of the
    numbers users see; it does not reset the counters (:func:`reset_stats` does)."""
    rates = current_rates(model)
    return {**summary(rates), "blocks": block_rates(rates), "layers": rates}
