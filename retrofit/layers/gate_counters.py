"""What a stochastic-depth gate counts: samples seen, samples kept, draws made, recent outcomes.

The bookkeeping half of :class:`retrofit.layers.stochastic_depth.StochasticDepthGate`, kept apart
from the regularizer so that the layer carries its settings and this typed holder its counters.
The gate reports them through ``rates()`` (``retrofit.schedule.statistics`` sums them per site
and per block) and checkpoints save ``calls``/``kept``/``draws`` (:meth:`GateCounters.saved`, the
gate's side of ``retrofit.layers.protocol.Resumable``).

Counting adds no work to an eager step. Batch and subset decisions are made on the host, so they
are counted with Python integers. Row mode draws a mask per sample on the device: the counters
keep a reference to each step's small mask, count the pending masks on their device in one batch
every ``fold_every`` steps and read the count back (the only device sync) when ``kept`` is read.
Counting with a reduction each step made the gate ~1.5x slower than timm's drop_path on an H100,
where a gate's whole forward+backward is launch-bound at ~0.1 ms; deferred, the hot path is the
draw, the multiply and a list append. Inside a compiled graph the gate adds to 0-dim tensors
instead (:mod:`retrofit.layers.tensor_state`), so every count is the eager plus the compiled one.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from retrofit.layers.tensor_state import TensorState, scalar

__all__ = ["GateCounters"]


class GateCounters:
    """``calls`` (samples through the gate in training), ``kept`` (samples that kept their
    branch), ``draws`` (training calls: the key of seeded draws) and ``history`` (the kept
    fraction of each of the last ``history`` host-decided calls), see the module docstring."""

    def __init__(self, history: int) -> None:
        # Added to by compiled graphs (graph inputs, so counting never recompiles).
        self.t = TensorState(
            calls=scalar(0, torch.int64), kept=scalar(0, torch.int64), draws=scalar(0, torch.int64)
        )
        self.history: deque[float] = deque(maxlen=history)
        # Plain attributes, deliberately not buffers: counted on the host, masks not yet
        # counted (one row each per sample), and a device-side count not yet read back.
        self.host_calls = 0
        self.host_kept = 0
        self.host_draws = 0
        self.masks: list[Tensor] = []
        self.count_on_device: Tensor | None = None

    # ------------------------------------------------------------------ counting

    def next_draw(self) -> int:
        """The number of this training call (eager and compiled so far); advances the counter."""
        draw = self.draws
        self.host_draws += 1
        return draw

    def count(self, rows: int, kept: int, fraction: float | None) -> None:
        """A call decided on the host: ``kept`` of ``rows`` samples kept their branch;
        ``fraction`` (the call's kept fraction) goes to ``history`` unless None."""
        self.host_calls += rows
        self.host_kept += kept
        if fraction is not None:
            self.history.append(fraction)

    def count_mask(self, mask: Tensor, fold_every: int) -> None:
        """A row-mode call: ``mask`` (one value per sample, non-zero where kept) is counted later,
        on its device; only a reference is taken now."""
        self.host_calls += mask.shape[0]
        self.masks.append(mask)
        if len(self.masks) >= fold_every:
            self.fold()

    def count_in_graph(self, rows: int, kept: Tensor) -> None:
        """A call inside a compiled graph: in-place adds the graph performs (no host value)."""
        self.t.calls.add_(rows)
        self.t.kept.add_(kept.to(torch.int64))
        self.t.draws.add_(1)

    def graph_draw(self) -> Tensor:
        """This call's draw number as an int64 tensor, for in-graph counter-based draws."""
        return self.t.draws + self.host_draws

    def fold(self) -> None:
        """Count the pending masks on their device(s); no host sync unless the device changed."""
        if not self.masks:
            return
        by_device: dict[torch.device, list[Tensor]] = {}
        for mask in self.masks:
            by_device.setdefault(mask.device, []).append(mask.reshape(-1))
        self.masks = []
        for device, masks in by_device.items():
            count = torch.cat(masks).count_nonzero()
            acc = self.count_on_device
            if acc is not None and acc.device != device:
                self.host_kept += int(acc.item())
                acc = None
            self.count_on_device = count if acc is None else acc + count

    # ------------------------------------------------------------------ reading and setting

    @property
    def calls(self) -> int:
        return self.host_calls + int(self.t.calls)

    @calls.setter
    def calls(self, value: int) -> None:
        self.t.calls.zero_()
        self.host_calls = int(value)

    @property
    def kept(self) -> int:
        self.fold()
        if self.count_on_device is not None:
            self.host_kept += int(self.count_on_device.item())
            self.count_on_device = None
        return self.host_kept + int(self.t.kept)

    @kept.setter
    def kept(self, value: int) -> None:
        self.masks = []
        self.count_on_device = None
        self.t.kept.zero_()
        self.host_kept = int(value)

    @property
    def draws(self) -> int:
        return self.host_draws + int(self.t.draws)

    @draws.setter
    def draws(self, value: int) -> None:
        self.t.draws.zero_()
        self.host_draws = int(value)

    def reset(self) -> None:
        """Zero ``calls``/``kept``/``history``; ``draws`` is the RNG counter and stays."""
        self.calls = 0
        self.kept = 0
        self.history.clear()

    # ------------------------------------------------------------------ checkpoints

    def saved(self) -> list[int]:
        """``[calls, kept, draws]``: the list a checkpoint carries (its format since draws were
        added; older checkpoints hold ``[calls, kept]``)."""
        return [int(self.calls), int(self.kept), int(self.draws)]

    def restore(self, saved: Sequence[int], *, own: bool) -> None:
        """Put back :meth:`saved`'s list. ``calls``/``kept`` are this rank's tally: only from its
        own record (``own``); ``draws`` is the same on every rank of a seeded run, so it comes
        back from rank 0's record too (a world-size change)."""
        if own:
            self.calls, self.kept = int(saved[0]), int(saved[1])
        if len(saved) > 2:
            self.draws = int(saved[2])

    # ------------------------------------------------------------------ moving and copying

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Move the in-graph counters with the gate (``.to(device)``), keeping their dtype."""
        self.t.apply(fn)

    def __copy__(self) -> GateCounters:
        # retrofit.verify.checks saves a layer's attributes with copy.copy and puts them back
        # after a check: the saved copy must not alias the live tensors, deque or mask list.
        new = GateCounters.__new__(GateCounters)
        new.__dict__.update(self.__dict__)
        new.t = copy.copy(self.t)
        new.history = copy.copy(self.history)
        new.masks = list(self.masks)
        return new
