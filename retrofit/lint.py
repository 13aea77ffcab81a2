"""Lint for Dropout before BatchNorm, and the variance-shift measurement (Li et al., CVPR 2019).

Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019 (arXiv:1801.05134). In training, Dropout with keep rate q scales the
variance it passes on by about 1/q, and a BatchNorm after it stores that variance in
``running_var``; at test time Dropout is off, the variance BN sees is lower than the one it
normalises by, and the error compounds through the layers after it.

    findings = retrofit.lint(model)                      # graph only: the meta device is fine
    print(format_report(findings, model=model))          # summary, then dropout → victim BN, paths
    shifts = retrofit.measure_variance_shift(model, batches)   # the paper's Figure 1 ratio
    retrofit.recalibrate_bn(model, train_batches)        # fix a model already trained with it

The rule itself (what is a dropout site, what is a victim) lives in
``retrofit.analysis.dropout_bn``; this module turns it into findings, reports and measurements. The
recipe fixes (``uout``, ``dropout_fix: after_last_bn``) are planned in ``retrofit.techniques``, BN
recalibration lives in ``retrofit.fixes``.

``retrofit.lint`` is the :func:`lint` function (the package binds it after importing this
module); the rest is reached with ``from retrofit.lint import format_report``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from retrofit.analysis.context import Analysis
from retrofit.analysis.dropout_bn import DropoutBNPair, find_dropout_bn, is_running_stat_norm
from retrofit.capture.training import trace_training
from retrofit.errors import TraceError
from retrofit.fixes import recalibrate_bn, run_batches

__all__ = [
    "Finding",
    "LintResult",
    "format_report",
    "lint",
    "summary_line",
    "measure_variance_shift",
    "recalibrate_bn",
]

_FIXES = (
    "recipe 'uout: {beta: 0.1}' (recipes/uout.yaml) replaces it with Uout; "
    "'dropout_fix: after_last_bn' moves it after the last BN; "
    "a model already trained with it: retrofit.recalibrate_bn(model, batches)"
)


@dataclass
class Finding:
    """One Dropout → BatchNorm pair: ``dropout``'s output reaches ``norm`` through ``path``
    without passing through another BN, so ``norm.running_var`` stores a variance inflated by
    dropout that inference never sees (Li et al. 2019).

    Attributes:
        dropout: the dropout module's qualified name, or ``owner:F.dropout`` for a functional
            call (the module whose forward makes it; ``#k`` for its k-th such call).
        norm: the victim BatchNorm's qualified name.
        path: node/module names from the dropout to the norm, both included.
        source: ``file:line`` of the dropout in the model's code.
        norm_source: ``file:line`` where the norm is called.
        p: the drop probability (None when the code computes it).
        kind: ``module``, ``function`` or ``inside`` (a dropout inside a module fx cannot trace).
        op: the dropout's class or function (``Dropout``, ``F.dropout``…).
        downstream_norms: running-stat norms after ``norm``: the shift propagates into them.
        note: anything that qualifies the finding.
    """

    dropout: str
    norm: str
    path: list[str]
    source: str | None = None
    norm_source: str | None = None
    p: float | None = None
    kind: str = "module"
    op: str = "Dropout"
    downstream_norms: tuple[str, ...] = field(default=(), repr=False)
    note: str | None = None

    @property
    def downstream(self) -> int:
        """How many BNs lie further downstream of the victim."""
        return len(self.downstream_norms)

    @property
    def hint(self) -> str:
        """How to fix it."""
        where = f" (at {_short_source(self.source)})" if self.source else ""
        if self.kind == "inside" and self.op == "MultiheadAttention.dropout":
            return f"set dropout=0 on {self.dropout}{where}, or put a norm without running stats after it"
        return f"{self.op} {self.dropout}{where}: {_FIXES}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every attribute, ``downstream`` as a count, and the ``hint``."""
        out: dict[str, Any] = {
            "dropout": self.dropout,
            "norm": self.norm,
            "path": list(self.path),
            "source": self.source,
            "norm_source": self.norm_source,
            "p": self.p,
            "kind": self.kind,
            "op": self.op,
            "downstream": self.downstream,
            "hint": self.hint,
        }
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_pair(cls, pair: DropoutBNPair) -> Finding:
        site = pair.site
        return cls(
            dropout=site.name,
            norm=pair.norm,
            path=list(pair.path),
            source=site.source,
            norm_source=pair.norm_source,
            p=site.p,
            kind=site.kind,
            op=site.op,
            downstream_norms=pair.downstream,
            note=pair.note,
        )


class LintResult(list):
    """The findings (a plain ``list[Finding]``) plus what the lint could not check.

    Attributes:
        model: the model's class name.
        dropouts: every active dropout site found, flagged or not.
        notes: modules that could not be traced and dropouts whose output left a traced part:
            the lint is only as complete as the graph.
    """

    def __init__(
        self,
        findings: Iterable[Finding] = (),
        *,
        model: str = "",
        dropouts: Sequence[str] = (),
        notes: Sequence[str] = (),
    ):
        super().__init__(findings)
        self.model = model
        self.dropouts = list(dropouts)
        self.notes = list(notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "findings": [f.to_dict() for f in self],
            "dropouts": self.dropouts,
            "notes": self.notes,
        }


def lint(
    model: nn.Module, example_input: Any = None, *, include_structured: bool = False
) -> LintResult:
    """Find every Dropout whose output reaches a BatchNorm before another BN (Li et al. 2019).

    Reads the model's torch.fx graph, traced with every module in training mode (so
    ``F.dropout(x, p, self.training)`` counts and a literal ``training=False`` does not); the
    model's flags are restored and its weights are never touched, so the meta device is fine.

    Args:
        model: any ``nn.Module`` (torchvision, timm or your own).
        example_input: the probe a forward that cannot be traced with its defaults is
            recorded on (``retrofit.analysis.context``); default: a random batch of the model's size.
        include_structured: also treat stochastic depth / DropPath and DropBlock as dropout sites
            (the paper's rule is about element-wise dropout; these drop whole branches/blocks).

    Returns:
        A :class:`LintResult`: a list of :class:`Finding`, one per (dropout, victim BN) pair, in
        graph order, with ``notes`` on anything that could not be checked.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        TraceError: no part of the model could be traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lint expects an nn.Module, but got {type(model).__name__}")
    if "forward" in model.__dict__:  # a retrofitted root: its own rewritten forward is linted
        traced = trace_training(model)
    else:
        traced = Analysis(model, example_input).traced_training
    if not traced.parts:
        reasons = "; ".join(f"{s.module}: {s.reason}" for s in traced.skipped)
        raise TraceError(
            f"no part of {type(model).__name__} could be traced with torch.fx ({reasons})"
        )
    result = find_dropout_bn(traced, include_structured=include_structured)
    return LintResult(
        (Finding.from_pair(pair) for pair in result.pairs),
        model=type(model).__name__,
        dropouts=list(dict.fromkeys(site.name for site in result.sites)),
        notes=result.notes,
    )


# --- report -----------------------------------------------------------------------------------

_WHY = (
    "why: in training a dropout inflates the variance these BNs store in running_var; at test "
    "dropout is off, the real variance is lower, and the error compounds downstream"
)


def _short_source(source: str | None) -> str | None:
    """``file:line`` shortened for reports: library files from their package, user files relative
    to the working directory when under it."""
    if not source:
        return source
    path, _, line = source.rpartition(":")
    marker = os.sep + "site-packages" + os.sep
    if marker in path:
        path = path.split(marker, 1)[1]
    else:
        try:
            rel = os.path.relpath(path)
        except ValueError:  # another drive on Windows
            rel = path
        if not rel.startswith(".."):
            path = rel
    return f"{path}:{line}"


def _path(path: Sequence[str], classes: dict[str, str], limit: int = 8) -> str:
    items = [_named(p, classes) for p in path]
    if len(items) > limit:
        items = [*items[: limit // 2], f"… {len(items) - limit} more …", *items[-limit // 2 :]]
    return " → ".join(items)


def _named(name: str, classes: dict[str, str]) -> str:
    """``name (Class)`` for a module whose name alone says little: a Sequential member (``3``,
    ``features.3``) or the root; other names are printed as they are."""
    cls = classes.get(name)
    if cls is None or not (name == "" or name.rpartition(".")[2].isdigit()):
        return name or "<root>"
    return f"{name or '<root>'} ({cls})"


def _owner(dropout: str) -> str:
    """The module whose forward makes the dropout: its parent for a module, the named owner for a
    functional call (``owner:F.dropout#k``)."""
    if ":" in dropout:
        return dropout.split(":", 1)[0]
    return dropout.rpartition(".")[0]


def _fix(kind: str, op: str) -> str:
    if kind == "inside" and op == "MultiheadAttention.dropout":
        return "set the attention's dropout=0, or follow it with a norm without running stats"
    return "recipe uout: {beta: 0.1} (recipes/uout.yaml) or dropout_fix: after_last_bn"


def _p(p: float | None) -> str:
    return "p=?" if p is None else f"p={p:g}"


def summary_line(findings: Sequence[Finding]) -> str:
    """The verdict in one line (what the trainer prints before training)."""
    dropouts = list(getattr(findings, "dropouts", []))
    if not findings:
        if dropouts:
            return (
                f"clean: {len(dropouts)} dropout(s), none reaches a BatchNorm before the output "
                "or a norm without running statistics"
            )
        return "clean: no active dropout in the graph"
    n_dropouts = len({f.dropout for f in findings})
    n_norms = len({f.norm for f in findings})
    return (
        f"{n_dropouts} dropout(s) reach {n_norms} BatchNorm(s) ({len(findings)} finding(s); "
        "variance shift, Li et al. CVPR 2019); fix with recipe uout: or dropout_fix:"
    )


def _module_classes(model: nn.Module | None) -> dict[str, str]:
    if model is None:
        return {}
    return {name: type(m).__name__ for name, m in model.named_modules()}


def _block_summary(by_dropout: dict[str, list[Finding]], classes: dict[str, str]) -> list[str]:
    """One line per kind of block the dropouts sit in: how many, what they reach, the fix."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for name, group in by_dropout.items():
        first = group[0]
        block = classes.get(_owner(name), "") if classes else ""
        groups.setdefault((block, first.op, _p(first.p), first.kind), []).append(name)
    rows = []
    for (block, op, p, kind), names in groups.items():
        pairs = [f for n in names for f in by_dropout[n]]
        norms = {f.norm for f in pairs}
        norm_types = sorted({classes[n] for n in norms if n in classes})
        where = f"in {block} " if block else ""
        rows.append(
            (
                f"{len(names)} × {op} ({p}) {where}",
                f"→ {len(norms)} BN(s)" + (f" ({', '.join(norm_types)})" if norm_types else ""),
                f"fix: {_fix(kind, op)}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return [f"  {a.ljust(widths[0])}  {b.ljust(widths[1])}  {c}" for a, b, c in rows]


def _details(
    name: str,
    group: list[Finding],
    classes: dict[str, str],
    shifts: dict[str, float] | None,
    max_victims: int,
) -> list[str]:
    first = group[0]
    block, owner = classes.get(_owner(name)), _owner(name)
    where = (f", in {block} {owner}" if owner else f", in the model ({block})") if block else ""
    src = _short_source(first.source) or "source: the container's forward (no line of its own)"
    lines = ["", f"{_named(name, classes)}  [{first.op}, {_p(first.p)}{where}]  {src}"]
    if first.note:
        lines.append(f"  note: {first.note}")
    lines.append(f"  reaches {len(group)} BN(s):")
    for f in group[:max_victims]:
        shift = f"  shift ×{shifts[f.norm]:.3f}" if shifts and f.norm in shifts else ""
        norm = f.norm if f.norm not in classes else f"{f.norm} ({classes[f.norm]})"
        at = _short_source(f.norm_source)
        lines.append(f"  → {norm}{shift}" + (f"  ({at})" if at else ""))
        lines.append(f"      path: {_path(f.path, classes)}")
    if len(group) > max_victims:
        lines.append(f"  … and {len(group) - max_victims} more (--json lists every one)")
    victims = {f.norm for f in group}
    further = set().union(*(f.downstream_norms for f in group)) - victims
    if further:
        lines.append(f"  the shift then carries into {len(further)} more BN(s) downstream")
    return lines


def format_report(
    findings: Sequence[Finding],
    shifts: dict[str, float] | None = None,
    *,
    model: nn.Module | None = None,
    max_dropouts: int | None = 10,
    max_victims: int = 3,
) -> str:
    """A readable report: a summary first, then details per dropout, then what was not checked.

    The summary counts the dropouts and their victim BNs, grouped by the kind of block each
    dropout sits in, with the fix next to each group; the details list each dropout with its
    first ``max_victims`` victims, their paths and source lines.

    Args:
        findings: what :func:`lint` returned (a plain list of findings works too).
        shifts: optional :func:`measure_variance_shift` result, shown beside each victim.
        model: the linted model; when given, block types and module classes are named (members
            of an ``nn.Sequential`` have only numbers for names).
        max_dropouts: dropouts shown in detail (None: all; 0: the summary only).
        max_victims: victims listed per dropout (the rest are counted; JSON has them all).
    """
    notes = list(getattr(findings, "notes", []))
    lines = [summary_line(findings)]
    if shifts and not findings:
        lines += [f"  {k}: shift ×{v:.3f}" for k, v in shifts.items()]
    if findings:
        classes = _module_classes(model)
        by_dropout: dict[str, list[Finding]] = {}
        for f in findings:
            by_dropout.setdefault(f.dropout, []).append(f)
        lines += _block_summary(by_dropout, classes)
        lines.append(_WHY + ".")
        lines.append(
            "fixes: uout replaces each such dropout with Uout (y = x + x·r, r ~ U(−β, β)); "
            "after_last_bn removes them and puts one dropout after the last BN; weights already "
            "trained with them: retrofit.recalibrate_bn(model, batches)."
        )
        shown = list(by_dropout)[: len(by_dropout) if max_dropouts is None else max_dropouts]
        if shown:
            lines.append("")
            more = len(by_dropout) - len(shown)
            lines.append(
                f"details: {len(shown)} of {len(by_dropout)} dropout(s)"
                + (" (--max N for more, --json for every finding)" if more else "")
            )
            for name in shown:
                lines += _details(name, by_dropout[name], classes, shifts, max_victims)
    if notes:
        lines.append("")
    for note in notes:
        lines.append(f"not checked: {note}")
    return "\n".join(lines)


# --- measurement ------------------------------------------------------------------------------


def _probe_batches(
    model: nn.Module,
    batches: Iterable[Any] | None,
    num_batches: int,
    batch_size: int,
    seed: int,
) -> list[Any]:
    if batches is not None:
        out = []
        for batch in batches:
            if len(out) >= num_batches:
                break
            out.append(batch)
        return out
    from retrofit.capture.probe import probe_input_size

    size = probe_input_size(model)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *size, generator=generator) for _ in range(num_batches)]


class _InputStats:
    """Per-channel sum and sum of squares of a norm's input, in float64 (channels on dim 1)."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().to(torch.float64)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        total, squares = flat.sum(1), (flat * flat).sum(1)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total += total
            self.squares += squares
        self.n += flat.shape[1]

    def variance(self) -> torch.Tensor:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.n
        # Unbiased, as BN's running_var is (the batch variance it averages is unbiased).
        return (self.squares - self.n * mean * mean) / max(self.n - 1, 1)


def measure_variance_shift(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    *,
    findings: Sequence[Finding] | None = None,
    norms: Iterable[str] | None = None,
    fill: bool = True,
    num_batches: int = 8,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """The variance shift of each victim BN: how far ``running_var`` is from the variance of
    its input at test time (Li et al. 2019, Figure 1).

    For each BN the ratio is ``max(running_var/real_var, real_var/running_var)`` per channel
    (each with the BN's eps added, as BN itself normalises by ``var + eps``), averaged over
    channels: 1.0 means no shift; Dropout(p) right before a BN gives about 1/(1−p) on a linear
    path. Works on a deep copy: the model, its weights and statistics are untouched.

    1. ``fill=True`` (default): reset the running statistics and re-estimate them from the probe
       batches with the whole model in training mode — dropout on, as during training — using
       the cumulative average. ``fill=False`` keeps the model's own statistics (to measure a
       trained or recalibrated model as it is).
    2. Run the batches again in eval mode and record the real per-channel variance of each BN's
       input.

    Args:
        model: the model, with real weights (not on the meta device).
        batches: probe batches (tensors or ``(input, target)`` pairs); at most ``num_batches``
            are used. None: random normal images at the model's input size. (``retrofit-cli lint
            --measure --data D`` passes the trainer's batches of ``D``.)
        findings: the lint findings whose norms to measure (default: lint the model).
        norms: measure these norms (qualified names) instead of the findings' victims.
        fill: re-estimate running statistics with dropout on first (see above).
        num_batches, batch_size: the probe (``batch_size`` only for random batches).
        seed: seeds the random batches and dropout's masks while filling.

    Returns:
        ``{norm name: shift ratio}``, in graph order; a victim that is not a module (a
        functional batch_norm) is left out.

    Raises:
        ValueError: the model is on the meta device, or no batch was given.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            raise ValueError(
                "measure_variance_shift runs batches, so it needs real weights; the model is on "
                "the meta device"
            )
        break
    work = copy.deepcopy(model)
    if norms is not None:
        names = list(dict.fromkeys(norms))
    else:
        found = findings if findings is not None else lint(work)
        names = list(dict.fromkeys(f.norm for f in found))
    modules = dict(work.named_modules())
    targets = {n: modules[n] for n in names if n in modules and is_running_stat_norm(modules[n])}
    if not targets:
        return {}
    probe = _probe_batches(work, batches, num_batches, batch_size, seed)
    if not probe:
        raise ValueError("measure_variance_shift needs at least one probe batch")
    device = next((t.device for t in work.parameters()), torch.device("cpu"))
    # Seeded and forked: the same model and batches give the same figures, and the caller's
    # global RNG stream is left where it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if fill:
            for m in work.modules():
                m.training = True  # the whole model as in training: dropout on
                if is_running_stat_norm(m):
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average: every probe batch counts equally
            run_batches(work, probe)
        for m in work.modules():
            m.training = False
        stats = {name: _InputStats() for name in targets}
        handles = [m.register_forward_pre_hook(stats[name]) for name, m in targets.items()]
        try:
            run_batches(work, probe)
        finally:
            for h in handles:
                h.remove()
    out: dict[str, float] = {}
    for name, m in targets.items():
        if stats[name].n == 0:
            continue  # not on the path these inputs take
        eps = float(m.eps)
        real = stats[name].variance() + eps
        running = m.running_var.detach().to(torch.float64) + eps
        ratio = torch.maximum(running / real, real / running)
        out[name] = float(ratio.mean())
    return out
