"""What every layer retrofit inserts offers the rest of the program (a typed protocol).

``kind``: the technique it serves (its recipe section). ``rates()``: its current settings and
counters, JSON-ready, for logging (``retrofit.schedule.current_rates``, the trainer's metrics and
plots). Layers driven by training progress also have ``set_progress(t)``
(``retrofit.schedule.update``); layers that count what they did (kept branches) have
``reset_stats()``, which starts a new measuring window. Layers whose counters must survive an
interruption are ``Resumable`` (the trainer's checkpoint carries them per rank), and layers whose
random draws must agree between data-parallel ranks are ``SharedDraws`` (the trainer gives them a
common seed). Nothing reads a layer's private attributes, and nothing outside a layer's module
asks for its class: the trainer works on whatever implements these protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Counting",
    "EvalIdentity",
    "Outline",
    "Progressive",
    "Reporting",
    "Resumable",
    "SharedDraws",
]


@runtime_checkable
class Reporting(Protocol):
    kind: str

    def rates(self) -> dict[str, Any]: ...


@runtime_checkable
class Progressive(Protocol):
    def set_progress(self, t: float) -> None: ...


@runtime_checkable
class Counting(Protocol):
    def reset_stats(self) -> None: ...


@runtime_checkable
class EvalIdentity(Protocol):
    """``identity_in_eval``: in eval mode the layer returns its input as it came (DropBlock,
    Cutout, ShakeDrop, Uout, a stochastic-depth gate with the inverted scaling). An owner whose
    inserted layers all say so runs its own forward, as written, in eval
    (``retrofit.rewrite.execute.RetrofitForward``): the same output, bit for bit, with nothing
    generated. A layer without the attribute (a gate with the paper's ×p_l) gets an edited eval
    graph."""

    identity_in_eval: bool


@runtime_checkable
class Resumable(Protocol):
    """A layer whose counters travel with the checkpoint, one record per rank, so that a resumed
    run continues them (``retrofit.train.loop`` saves them under the checkpoint's ``"gates"``
    key, the name it had when only stochastic-depth gates had counters).

    ``checkpoint_counters()``: this rank's counters as a list of ints (the layer owns the order;
    the gate's is ``[calls, kept, draws]``). ``restore_counters(saved, own=...)`` puts back what
    ``checkpoint_counters()`` returned, also from checkpoints written before a counter was added
    (a shorter list). ``own`` is True when ``saved`` is this rank's own record; False when the
    world size changed and ``saved`` is rank 0's: then only counters every rank shares (the
    position in seeded draws) come back, a per-rank tally would be counted twice.
    """

    def checkpoint_counters(self) -> list[int]: ...

    def restore_counters(self, saved: Sequence[int], *, own: bool) -> None: ...


@runtime_checkable
class SharedDraws(Protocol):
    """A layer whose random draws may have to agree on every data-parallel rank.

    ``seed``: the seed of its counter-based draws (None: it draws from torch's global generator,
    which the trainer seeds per rank). ``needs_shared_seed()``: its draws decide which parameters
    a step uses (stochastic depth's batch mode skips whole branches), so under DDP every rank
    must draw alike. ``restart_draws()``: its draw counter back to 0 (a seeded run starts its
    sequence there; a resumed one restores it afterwards through ``Resumable``). ``kind``: the
    trainer derives the common seed of each kind of layer from ``train.seed`` and ``kind``
    (``retrofit.train.distributed.seed_shared_draws``).
    """

    kind: str
    seed: int | None

    def needs_shared_seed(self) -> bool: ...

    def restart_draws(self) -> None: ...


@dataclass(frozen=True)
class Outline:
    """How the outlined residual add must behave; decided by the rewrite from the owner's graph.

    The rewrite's ``outline`` action (``retrofit.edit.ACTIONS``) calls a layer that takes the
    outlined form as ``layer(shortcut, *inputs, branch=f, outline=Outline(...))`` and sets its
    ``outlined`` attribute (stochastic depth's gate in batch/subset mode).

    ``batched[i]``: input i carries the batch dimension (it depends on the module's input), so
    subset mode feeds the branch only the kept rows of it. ``inplace``: ``"shortcut"`` when the
    model wrote ``shortcut.add_(f)`` (the gate then adds in place too: the same aliasing as the
    original), ``"branch"`` for ``f.add_(shortcut)`` (the result keeps f's dtype), else ``""``.
    ``copy_dropped``: something downstream may mutate the add's result in place, or it leaves the
    module; a dropped branch then returns a copy of the shortcut, never the shortcut itself
    (e.g. torchvision's ``relu(out + identity)`` with ``inplace=True`` would otherwise overwrite
    the block's input, which autograd still needs).
    """

    batched: tuple[bool, ...] = ()
    inplace: str = ""
    copy_dropped: bool = True
