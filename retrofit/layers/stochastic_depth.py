"""Stochastic depth: randomly skip a residual branch during training.

Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016
(https://arxiv.org/abs/1603.09382). Block l computes

    H_l = ReLU(b_l · f_l(H_{l-1}) + id(H_{l-1})),   b_l ~ Bernoulli(p_l)

with the survival probability p_l decaying linearly over depth, p_l = 1 − (l/L)(1 − p_L).
At test time the paper uses the expectation, H_l = ReLU(p_l · f_l + id) (``scaling="paper"``).
The variant used by timm's ``drop_path`` and torchvision's ``StochasticDepth`` divides the kept
branches by p_l in training and is the identity at test time (``scaling="inverted"``, default);
both have the same expectation, the inverted one leaves inference untouched, which is what lets
``retrofit.verify.checks`` prove a rewrite did not change the model.

Two forms of the gate:

* **mask form** ``gate(f_out)``: multiplies the output of the residual branch f_l; it never sees
  the identity path. The branch is always computed (timm's ``drop_path``, torchvision's
  ``StochasticDepth`` work this way).
* **outlined form** ``gate(shortcut, *inputs, branch=f, outline=spec)``: the rewrite moved the
  branch's code into a function ``f`` that the owner's generated forward passes on each call,
  and the gate performs the residual add itself. In ``mode="batch"`` a dropped branch is not executed at all: no forward,
  no backward, its parameters get no gradient. That is the paper's compute saving (Huang et al.
  2016 report ~25% less training time for a 110-layer ResNet). In ``mode="subset"`` the branch
  runs on the kept rows only and its output is ``index_add``-ed into the shortcut, as DINOv2
  does for its ViT blocks (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
  Supervision", https://arxiv.org/abs/2304.07193). Changed semantics there: a BatchNorm inside
  the branch normalises with the statistics of the kept subset (and updates its running
  statistics from it); layers without cross-sample coupling (LayerNorm, convs, attention within a
  sample) compute exactly what they would on the full batch.

Seeded draws (``seed`` not None) make the batch/subset decisions counter-based
(:mod:`retrofit.layers.seeded_draws`: the same on every data-parallel rank and after a resumption);
row mode always draws from the global RNG (its masks are per sample; ranks need not agree). What
the gate counts lives in :mod:`retrofit.layers.gate_counters`.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from retrofit.layers.gate_counters import GateCounters
from retrofit.layers.protocol import Outline  # the outlined calling convention
from retrofit.layers.ramps import warmed_up
from retrofit.layers.seeded_draws import counter_uniform, draw_key, site_base, unit
from retrofit.layers.tensor_state import MirroredRate, TensorState, scalar

__all__ = [
    "COMPILED_FORMS",
    "Outline",
    "StochasticDepthGate",
    "compiled_form",
    "draw_key",
    "forced",
    "is_gate",
    "stochastic_depth",
    "subset_rows",
]

MODES = ("row", "batch", "subset")
SCALINGS = ("inverted", "paper")
# How an outlined batch/subset gate runs inside torch.compile (see StochasticDepthGate).
COMPILED_FORMS = ("skip", "mask")


def _check(survival: float, mode: str, scaling: str) -> None:
    # Same shape of message as torchvision.ops.stochastic_depth: quote the value and the range.
    if not 0.0 < survival <= 1.0:
        raise ValueError(f"survival probability has to be in (0, 1], but got {survival}")
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {', '.join(MODES)}, but got {mode!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling has to be one of {', '.join(SCALINGS)}, but got {scaling!r}")


def _subset_size(batch: int, survival: float) -> int:
    return max(1, min(batch, round(survival * batch)))


def subset_rows(
    batch: int,
    survival: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """Draw the rows kept by ``mode="subset"``: exactly ``k = max(1, round(survival·batch))``
    distinct rows, uniformly without replacement, and the inverted scale ``batch / k``.

    ``batch / k`` rather than ``1 / survival`` makes the expectation exact for the rounded k.
    A rewrite that wants the compute saving can evaluate f_l on ``x[index]`` only and
    ``index_add`` the scaled result onto the identity path.
    """
    k = _subset_size(batch, survival)
    index = torch.randperm(batch, device=device, generator=generator)[:k]
    return index, batch / k


def _keep_mask(
    x: Tensor, survival: float, mode: str, generator: torch.Generator | None
) -> tuple[Tensor, float]:
    """The 0/1 keep mask b (broadcastable to x, in x's dtype/device) and P(keep) for it."""
    if mode == "subset":
        index, scale = subset_rows(x.shape[0], survival, x.device, generator)
        mask = x.new_zeros((x.shape[0],) + (1,) * (x.ndim - 1))
        mask.index_fill_(0, index, 1.0)
        return mask, 1.0 / scale
    # As in timm's drop_path: one Bernoulli draw per row (or one per call), shape (N, 1, ..., 1),
    # so the mask costs N numbers and the only full-size op is the broadcast multiply.
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if mode == "row" else (1,) * x.ndim
    mask = x.new_empty(shape).bernoulli_(survival, generator=generator)
    return mask, survival


def stochastic_depth(
    x: Tensor,
    survival: float,
    mode: str = "row",
    training: bool = True,
    scaling: str = "inverted",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Stochastic depth (Huang et al. 2016) applied to the output x of a residual branch.

    Args:
        x: branch output, shape (N, ...), any dtype and memory format (both are preserved).
        survival: p_l, the probability that the branch is kept, in (0, 1].
        mode: ``"row"`` draws b ~ Bernoulli(p_l) per sample (mask (N, 1, ..., 1));
            ``"batch"`` draws one b for the whole batch per call (the paper's formulation);
            ``"subset"`` keeps exactly round(p_l·N) samples chosen without replacement.
        training: if False, return the inference form.
        scaling: ``"inverted"``: training x·b/p_l, inference x (returned as is);
            ``"paper"``: training x·b, inference x·p_l. In ``"subset"`` mode the inverted
            scale is N/k for the k kept rows.
        generator: optional RNG, on x's device.

    Returns:
        A tensor shaped like x. ``survival == 1`` returns x itself in every mode.
    """
    if isinstance(x, torch.fx.Proxy):
        # Reached when the caller imported this function by name, which torch.fx.wrap below does
        # not patch (it only patches this module's global): record the same single node.
        return x.tracer.create_proxy(
            "call_function",
            _stochastic_depth,
            (x, survival, mode, training, scaling, generator),
            {},
        )
    _check(survival, mode, scaling)
    if survival == 1.0:
        return x
    if not training:
        return x if scaling == "inverted" else x * survival
    mask, keep = _keep_mask(x, survival, mode, generator)
    if scaling == "inverted":
        # In place on the small mask, not on x: one full-size op in total (the multiply).
        mask.div_(keep)
    return x * mask


# One call_function node for torch.fx: the random mask never becomes part of a traced graph.
torch.fx.wrap("stochastic_depth")
_stochastic_depth = stochastic_depth  # the unpatched function, for the Proxy branch above


def _graph_capture(x: Tensor) -> bool:
    """True while torch.fx or torch.compile is tracing: no Python side effects then."""
    return (
        isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or torch.jit.is_scripting()
    )


def _residual_add(
    shortcut: Tensor, out: Tensor, alpha: float, index: Tensor | None, spec: Outline
) -> Tensor:
    """The outlined residual add ``shortcut + alpha·out`` (rows ``index`` only, in subset mode),
    with the original add's aliasing and dtype. One kernel: ``add``'s ``alpha`` does the
    scaling."""
    if spec.inplace == "shortcut":
        if index is None:
            return shortcut.add_(out, alpha=alpha)
        return shortcut.index_add_(0, index, out.to(shortcut.dtype), alpha=alpha)
    if index is None:
        result = torch.add(shortcut, out, alpha=alpha)
    else:
        dtype = torch.promote_types(shortcut.dtype, out.dtype)
        result = shortcut.to(dtype).index_add(0, index, out.to(dtype), alpha=alpha)
    if spec.inplace == "branch" and result.dtype != out.dtype:
        result = result.to(out.dtype)  # ``f += shortcut`` keeps f's dtype
    return result


class _Counted:
    """A gate attribute that reads and sets the counter of the same name in ``gate.counters``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, gate: Any, owner: type | None = None) -> Any:
        return self if gate is None else getattr(gate.counters, self.name)

    def __set__(self, gate: Any, value: int) -> None:
        setattr(gate.counters, self.name, value)


class _Draw(NamedTuple):
    """One host-side decision: the factor on the kept branch (0.0: the branch is dropped) and,
    in subset mode, the kept rows (None: every row)."""

    alpha: float
    index: Tensor | None


class StochasticDepthGate(nn.Module):
    """Stochastic depth on one residual site (see :func:`stochastic_depth`).

    ``survival``, ``mode``, ``scaling`` and ``depth`` (l, 1-based, for printing and plans) are
    attributes that may be changed between steps. ``target_survival`` is the planned p_l;
    with ``warmup`` > 0 (a fraction of training, Composer's ``drop_warmup``) ``survival`` starts
    at 1 and :meth:`set_progress` ramps it linearly to ``target_survival`` over the first
    ``warmup`` of training (``retrofit.schedule.update(model, t)`` calls it); a warm-up gate never
    driven by the schedule never drops and warns once. Without warm-up ``survival`` is the
    target and ``set_progress`` leaves it alone. The gate owns no parameters and no
    buffers, so inserting it leaves the model's state_dict keys unchanged.

    Called with one tensor it is the mask form (multiplies the branch output). Called as
    ``gate(shortcut, *inputs, branch=f, outline=spec)`` it computes the whole residual add and runs
    the branch only when kept (batch mode) or only on the kept rows (subset mode); see the module
    docstring. ``seed``/``stream`` make batch and subset draws counter-based
    (:mod:`retrofit.layers.seeded_draws`); the trainer seeds them under DDP and checkpoints the
    counters through the gate's ``SharedDraws`` and ``Resumable`` sides
    (:mod:`retrofit.layers.protocol`).

    Statistics for logging (:class:`~retrofit.layers.gate_counters.GateCounters`, the gate's
    ``counters``), updated by every training forward (survival 1.0 included: a block that is
    never dropped kept all of its samples): ``calls`` is the number of samples that went through
    the gate, ``kept`` how many of them kept their branch, ``kept_fraction = kept / max(calls,
    1)``, ``draws`` the number of training calls (the key of seeded draws; checkpoints save it with
    the other two); ``reset_stats()`` zeroes calls and kept. ``history`` holds the kept fraction of
    each of the last ``HISTORY`` eager calls in batch and subset mode (1.0/0.0 in batch mode: the
    recorded sequence of kept and dropped steps). Row-mode masks are counted on their device every
    ``FOLD_EVERY`` steps, and read back only when ``kept`` is read.

    **Under torch.compile** the gate reads only tensors (:mod:`retrofit.layers.tensor_state`):
    the survival a warm-up moves is a 0-dim tensor the schedule fills in place, so updates never
    recompile, and the counters are tensors the compiled graph adds to (``calls``, ``kept`` and
    ``draws`` sum the eager and the compiled counts). Row mode compiles to one graph with the
    draw, the count and the multiply fused. Outlined batch/subset gates have two forms, chosen by
    ``compiled`` (:func:`compiled_form` sets it for a whole model):

    * ``"skip"`` (default): the eager semantics exactly — the decision is made on the host, a
      dropped branch is not computed and its parameters get no gradient — at the price of graph
      breaks around every outlined gate (resnet18: 20 graphs). ``torch.cond`` cannot replace
      them in torch 2.14: it rejects branches that mutate an input, and a BatchNorm in training
      mutates its running statistics ("Higher order ops do not support input mutation").
    * ``"mask"``: no graph break at all. The decision is drawn inside the graph (seeded gates:
      a counter-based integer hash of (seed, site, draw), not the eager blake2b sequence), the
      branch runs on every row and is multiplied by the 0/scale decision. The kept fraction, the
      scale and the expectation are those of eager mode; the compute saving is lost, a dropped
      branch's parameters get zero (not no) gradients and its BatchNorm statistics move.

    ``forced`` (None, True or False) replaces every decision by keep (True: the branch runs,
    unscaled, as at survival 1) or drop (False): a liveness check that must run the kept or the
    dropped path sets it (:func:`forced` does so for a whole model); forced calls are not
    counted.
    """

    FOLD_EVERY = 64
    HISTORY = 256
    kind = "stochastic_depth"
    # The current p_l: a float, mirrored in the tensor compiled graphs read.
    survival = MirroredRate()

    def __init__(
        self,
        survival: float = 1.0,
        mode: str = "row",
        scaling: str = "inverted",
        depth: int | None = None,
        seed: int | None = None,
        stream: str = "",
        warmup: float = 0.0,
    ) -> None:
        super().__init__()
        _check(survival, mode, scaling)
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(f"warmup has to be in [0, 1], but got {warmup}")
        # Progress 0 before the first update: a warm-up starts from "never drop".
        p = 1.0 if warmup > 0.0 else float(survival)
        self._t = TensorState(survival=scalar(p, torch.float32))
        self.survival = p
        self.target_survival = survival
        self.warmup = warmup
        self._scheduled = warmup == 0.0
        self.mode = mode
        self.scaling = scaling
        self.depth = depth
        self._stream = stream
        self.seed = seed
        self.compiled = "skip"
        self.forced: bool | None = None
        self.counters = GateCounters(self.HISTORY)

    def _apply(self, fn: Any, recurse: bool = True) -> StochasticDepthGate:
        super()._apply(fn, recurse)
        self._t.apply(fn)
        self.counters.apply(fn)
        return self

    @property
    def identity_in_eval(self) -> bool:
        """The inverted scaling returns x at test time; the paper's multiplies the branch by
        p_l (``retrofit.layers.protocol.EvalIdentity``)."""
        return self.scaling == "inverted"

    # ------------------------------------------------------------------ rates

    def _alpha(self) -> float:
        """The factor on a kept branch: 1/p_l inverted, 1 with the paper's scaling."""
        return 1.0 / self.survival if self.scaling == "inverted" else 1.0

    # ------------------------------------------------------------------ seeding

    @property
    def seed(self) -> int | None:
        """Seed of the counter-based batch/subset draws (None: torch's global generator)."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        self._seed = value
        self._base = site_base(value, self._stream)

    @property
    def stream(self) -> str:
        """This site's name in the counter-based draws (unique per site, same in every process)."""
        return self._stream

    @stream.setter
    def stream(self, value: str) -> None:
        self._stream = value
        self._base = site_base(self._seed, value)

    def needs_shared_seed(self) -> bool:
        """Batch mode skips whole branches: under DDP every rank must skip the same ones
        (``retrofit.layers.protocol.SharedDraws``)."""
        return self.mode == "batch"

    def restart_draws(self) -> None:
        """The draw counter, the key of seeded draws, back to 0."""
        self.draws = 0

    # ------------------------------------------------------------------ schedule

    def set_progress(self, t: float) -> None:
        """survival = 1 − min(t / warmup, 1)·(1 − target_survival); no-op without warm-up."""
        if self.warmup > 0.0:
            self.survival = warmed_up(t, self.target_survival, self.warmup)
            self._scheduled = True

    def _warn_unscheduled(self) -> None:
        warnings.warn(
            f"stochastic depth (depth={self.depth}) has warmup={self.warmup} but its schedule was "
            "never set, so it never drops; call retrofit.schedule.update(model, t) once per step",
            stacklevel=3,
        )
        self._scheduled = True  # warn once

    # ------------------------------------------------------------------ outlining

    @property
    def outlined(self) -> bool:
        """Whether the rewrite moved this site's branch into a function the gate calls
        (``gate(shortcut, *inputs, branch=f, outline=spec)``; see the module docstring)."""
        return self.__dict__.get("_is_outlined", False)

    @outlined.setter
    def outlined(self, value: bool) -> None:
        self.__dict__["_is_outlined"] = bool(value)

    # ------------------------------------------------------------------ statistics

    # Training samples seen, samples kept, training calls made (eager and compiled; seeded draws
    # are keyed by ``draws``): the counters' own, readable and settable on the gate.
    calls = _Counted()
    kept = _Counted()
    draws = _Counted()

    @property
    def history(self) -> deque[float]:
        return self.counters.history

    @property
    def kept_fraction(self) -> float:
        return self.kept / max(self.calls, 1)

    def reset_stats(self) -> None:
        """Zero ``calls``/``kept``/``history``; ``draws`` is the RNG counter and stays."""
        self.counters.reset()

    def checkpoint_counters(self) -> list[int]:
        """``[calls, kept, draws]`` (``retrofit.layers.protocol.Resumable``)."""
        return self.counters.saved()

    def restore_counters(self, saved: Sequence[int], *, own: bool) -> None:
        """Put back :meth:`checkpoint_counters`' list (``[calls, kept]`` from older checkpoints)."""
        self.counters.restore(saved, own=own)

    # The row-mode masks not yet counted and the device-side count not yet read back
    # (tests/test_layers.py checks that counting on CUDA defers its sync).
    @property
    def _masks(self) -> list[Tensor]:
        return self.counters.masks

    @property
    def _count_on_device(self) -> Tensor | None:
        return self.counters.count_on_device

    # ------------------------------------------------------------------ draws

    def _keep_batch(self, key: int | None) -> bool:
        """One Bernoulli(p_l) decision for the whole batch, made on the host: no device sync."""
        u = float(torch.rand(())) if key is None else unit(key)
        return u < self.survival

    def _subset(self, n: int, device: torch.device, key: int | None) -> tuple[Tensor, float]:
        if key is None:
            return subset_rows(n, self.survival, device)
        # Seeded: drawn on the CPU, so every rank and every device type gets the same rows.
        index, scale = subset_rows(n, self.survival, "cpu", torch.Generator().manual_seed(key))
        return index.sort().values.to(device, non_blocking=True), scale

    def _host_draw(self, n: int, device: torch.device) -> _Draw:
        """Draw and count one training call on ``n`` rows, decided on the host: batch and
        subset mode, and every mode at survival 1. The one place both forms (mask and
        outlined) make these decisions."""
        draw = self.counters.next_draw()
        key = None if self.seed is None else draw_key(self.seed, self.stream, draw)
        history = self.mode != "row"  # row mode records no per-call outcome
        if self.survival == 1.0:
            self.counters.count(n, n, 1.0 if history else None)
            return _Draw(1.0, None)
        if self.mode == "batch":
            keep = self._keep_batch(key)
            self.counters.count(n, n if keep else 0, 1.0 if keep else 0.0)
            return _Draw(self._alpha() if keep else 0.0, None)
        index, scale = self._subset(n, device, key)
        k = index.numel()
        self.counters.count(n, k, k / n)  # known without reading a mask
        alpha = scale if self.scaling == "inverted" else 1.0
        return _Draw(alpha, None if k == n else index)

    def _row_mask(self, x: Tensor) -> Tensor:
        """Row mode in eager training: a Bernoulli mask per sample, counted later on its device."""
        self.counters.next_draw()
        mask, keep_p = _keep_mask(x, self.survival, "row", None)
        self.counters.count_mask(mask, self.FOLD_EVERY)  # only a reference on the hot path
        if self.scaling == "inverted":
            mask.div_(keep_p)  # in place: the pending reference sees 1/p or 0, still countable
        return x * mask

    # ------------------------------------------------------------------ forward

    def forward(
        self, x: Tensor, *inputs: Any, branch: Any = None, outline: Outline | None = None
    ) -> Tensor:
        if branch is None and inputs:
            raise TypeError("StochasticDepthGate: inputs for a branch were given, but no branch")
        spec = outline or Outline()
        if torch.compiler.is_compiling():
            if branch is None:
                return x * self._compiled_scale(x) if self.training else self._compiled_eval(x)
            if self.compiled == "mask" or self.mode == "row":
                return self._outlined_compiled(x, inputs, branch, spec)
        # Under no_grad it is a check (retrofit.verify.checks's liveness forward), not training.
        unscheduled = not self._scheduled and self.training and torch.is_grad_enabled()
        if unscheduled and not _graph_capture(x):
            self._warn_unscheduled()
        if branch is not None:
            return self._outlined(x, inputs, branch, spec)
        return self._mask_form(x)

    def _mask_form(self, x: Tensor) -> Tensor:
        """``gate(f_out)`` outside a compiled graph: f_out times its draw."""
        if not self.training or _graph_capture(x):
            # Through the wrapped functional, so a tracer records one node.
            return stochastic_depth(x, self.survival, self.mode, self.training, self.scaling)
        if self.forced is not None:
            return x if self.forced else x * 0.0
        _check(self.survival, self.mode, self.scaling)
        if self.mode == "row" and self.survival != 1.0:
            return self._row_mask(x)
        alpha, index = self._host_draw(x.shape[0], x.device)
        if index is not None:
            mask = x.new_zeros((x.shape[0],) + (1,) * (x.ndim - 1))
            return x * mask.index_fill_(0, index, alpha)
        return x if self.survival == 1.0 else x * alpha

    # ------------------------------------------------------------------ compiled forms

    def _compiled_eval(self, x: Tensor) -> Tensor:
        return x if self.scaling == "inverted" else x * self._t.survival.to(x.dtype)

    def _compiled_uniform(self, shape: tuple[int, ...], x: Tensor, rows: int | None) -> Tensor:
        """In-graph uniforms: seeded (batch/subset with a seed) from the counter, else torch's."""
        if self._base is None or self.mode == "row":
            return torch.rand(shape, device=x.device)
        u = counter_uniform(self._base, self.counters.graph_draw(), rows=rows)
        return u.reshape(shape)

    def _compiled_scale(self, x: Tensor) -> Tensor:
        """The training factor for x in a compiled graph: 0 or the scale, shaped (N, 1, …, 1)
        (one value (1, …, 1) in batch mode), drawn and counted in the graph from tensors only."""
        n = x.shape[0]
        if self.forced is not None:
            return x.new_full((1,) * x.ndim, 1.0 if self.forced else 0.0)
        p = self._t.survival
        inverted = self.scaling == "inverted"
        if self.mode == "subset":
            u = self._compiled_uniform((n,), x, rows=n)
            k = torch.round(p * n).clamp(1, n)
            keep = (u.argsort().argsort() < k).to(torch.float32)
            keep = keep.reshape((n,) + (1,) * (x.ndim - 1))
            kept = k
            scale = keep * (n / k) if inverted else keep
        else:
            shape = (n,) + (1,) * (x.ndim - 1) if self.mode == "row" else (1,) * x.ndim
            keep = (self._compiled_uniform(shape, x, rows=None) < p).to(torch.float32)
            kept = keep.sum() * (n if self.mode == "batch" else 1)
            scale = keep / p if inverted else keep
        self.counters.count_in_graph(n, kept)
        return scale.to(x.dtype)

    def _outlined_compiled(
        self, shortcut: Tensor, inputs: tuple[Any, ...], branch: Any, spec: Outline
    ) -> Tensor:
        """The outlined site inside a compiled graph: ``shortcut + scale·branch(*inputs)`` with
        the branch always computed (``compiled = "mask"``, and row mode)."""
        out = branch(*inputs)
        self._check_shapes(shortcut, out)
        out = out * self._compiled_scale(out) if self.training else self._compiled_eval(out)
        return _residual_add(shortcut, out, 1.0, None, spec)

    def _check_shapes(self, shortcut: Tensor, out: Tensor) -> None:
        if (
            out.shape != shortcut.shape
            and torch.broadcast_shapes(out.shape, shortcut.shape) != shortcut.shape
        ):
            # Dropping would return a result of another shape than keeping.
            raise RuntimeError(
                f"stochastic depth (depth={self.depth}): the branch output {tuple(out.shape)} "
                f"broadcasts the shortcut {tuple(shortcut.shape)}; this site cannot be outlined"
            )

    # The eager outlined form is split for torch.compile's "skip" form. The decision and the
    # bookkeeping (a host-side draw, counters, Python branching on the outcome) are excluded from
    # compilation entirely: dynamo would otherwise guard on the draw counter and the outcome and
    # recompile every step. ``_outlined`` itself is skipped without its callees, so the one call
    # it makes that is not excluded — the branch function, a frame of its own — is compiled
    # (once per site).

    @torch.compiler.disable
    def _decide(
        self, shortcut: Tensor, inputs: tuple[Any, ...], spec: Outline
    ) -> tuple[str, float, Tensor | None, tuple[Any, ...]]:
        """Draw and count this call: ``(action, alpha, index, branch_args)``; action is
        ``"drop"``, ``"run"`` (add ``alpha·f(branch_args)``, on rows ``index`` if not None) or
        ``"mask"`` (row mode on an outlined site: run f on every row, then mask it)."""
        p = self.survival
        if not self.training:
            return "run", 1.0 if self.scaling == "inverted" else p, None, inputs
        if self.forced is not None:
            return ("run" if self.forced else "drop"), 1.0, None, inputs
        _check(p, self.mode, self.scaling)
        if self.mode == "row" and p != 1.0:
            # The mode was changed after the rewrite: every row needs the branch; the mask form
            # (called on its output) draws and counts.
            return "mask", 1.0, None, inputs
        n = shortcut.shape[0]
        alpha, index = self._host_draw(n, shortcut.device)
        if alpha == 0.0:
            return "drop", alpha, None, inputs
        if index is None:
            return "run", alpha, None, inputs
        batched = spec.batched or (True,) * len(inputs)
        rows = tuple(
            t.index_select(0, index)
            if flag and isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == n
            else t
            for t, flag in zip(inputs, batched, strict=True)
        )
        return "run", alpha, index, rows

    @torch.compiler.disable
    def _join(
        self, shortcut: Tensor, out: Tensor, alpha: float, index: Tensor | None, spec: Outline
    ) -> Tensor:
        if index is None:
            self._check_shapes(shortcut, out)
        return _residual_add(shortcut, out, alpha, index, spec)

    @torch.compiler.disable
    def _dropped(self, shortcut: Tensor, spec: Outline) -> Tensor:
        if spec.inplace != "shortcut" and spec.copy_dropped:
            return shortcut.clone()
        return shortcut

    def _outlined(
        self, shortcut: Tensor, inputs: tuple[Any, ...], branch: Any, spec: Outline
    ) -> Tensor:
        """``shortcut + b·branch(*inputs)``, computing the branch only where b says so (class
        docstring). ``branch`` is the rewritten owner's code for this site, passed by the
        owner's generated forward on every call: nothing is stored on the gate, so a model that
        is copied or pickled rebuilds it from its own modules."""
        action, alpha, index, args = self._decide(shortcut, inputs, spec)
        if action == "drop":
            return self._dropped(shortcut, spec)
        out = branch(*args)
        if action == "mask":
            out = self.forward(out)
        return self._join(shortcut, out, alpha, index, spec)

    _outlined = torch.compiler.disable(_outlined, recursive=False)

    def rates(self) -> dict[str, Any]:
        """Settings and counters for logging (``retrofit.layers.protocol.Reporting``);
        ``kept_fraction`` (None before any training call: nothing was measured) may synchronise
        an accelerator once, and ``recent`` is the kept fraction of each eager training call
        since the last ``reset_stats()`` (1.0/0.0 in batch mode)."""
        calls, kept = self.calls, self.kept
        return {
            "depth": self.depth,
            "survival": self.survival,
            "target_survival": self.target_survival,
            "warmup": self.warmup,
            "mode": self.mode,
            "scaling": self.scaling,
            "calls": calls,
            "kept": kept,
            "kept_fraction": kept / calls if calls else None,
            "outlined": self.outlined,
            "seed": self.seed,
            "draws": self.draws,
            "compiled": self.compiled,
            "recent": list(self.history),
        }

    def extra_repr(self) -> str:
        depth = f"depth={self.depth}, " if self.depth is not None else ""
        extra = (f", seed={self.seed}" if self.seed is not None else "") + (
            ", outlined" if self.outlined else ""
        )
        if self.warmup > 0.0:
            extra += f", target_survival={self.target_survival:.4f}, warmup={self.warmup}"
        return (
            f"{depth}survival={self.survival:.4f}, mode={self.mode}, scaling={self.scaling}{extra}"
        )


def is_gate(module: nn.Module) -> bool:
    """True for a stochastic-depth gate inserted by retrofit."""
    return isinstance(module, StochasticDepthGate)


def compiled_form(model: nn.Module, form: str) -> nn.Module:
    """Set how every gate of ``model`` runs inside ``torch.compile``: ``"skip"`` (eager
    semantics, graph breaks around outlined gates) or ``"mask"`` (no graph break; the branch is
    computed and masked). See :class:`StochasticDepthGate`. Returns ``model``."""
    if form not in COMPILED_FORMS:
        raise ValueError(
            f"compiled form has to be one of {', '.join(COMPILED_FORMS)}, but got {form!r}"
        )
    for m in model.modules():
        if is_gate(m):
            m.compiled = form
    return model


@contextmanager
def forced(model: nn.Module, keep: bool) -> Iterator[None]:
    """Within the block every gate of ``model`` keeps (``keep=True``: the branch runs, unscaled)
    or drops (False) instead of drawing, and counts nothing; the previous ``forced`` values
    come back afterwards. For checks that must run one path (liveness forward + backward)."""
    gates = [m for m in model.modules() if is_gate(m)]
    saved = [g.forced for g in gates]
    for g in gates:
        g.forced = bool(keep)
    try:
        yield
    finally:
        for g, value in zip(gates, saved, strict=True):
            g.forced = value
