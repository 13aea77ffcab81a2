"""The life of a retrofit inside a training run, written once: apply → update each step → report
→ strip.

retrofit's trainer (``retrofit.train.loop``) and the three integrations
(``retrofit.integrations.lightning``, ``.hf``, ``.timm``) all drive the recipe through one
:class:`Lifecycle`, so they print the same plan summary and lint verdict once per run and log the
same figures (Composer's single event protocol, here with four events):

1. :meth:`Lifecycle.start`: ``retrofit.apply`` (sites found, eval output verified, the model
   restored if anything fails), then ``retrofit.lint`` on the model that will train. Returns a
   :class:`Start`: the plan's one-line summary and the lint verdict, printed once (rank 0).
2. :meth:`Lifecycle.update`: ``retrofit.schedule.update(model, t)`` before a step (DropBlock's
   keep_prob ramp, stochastic depth's warm-up).
3. :meth:`Lifecycle.report`: a :class:`Report` of the window since the previous report: the mean
   current survival, the mean kept fraction and the mean DropBlock keep_prob
   (``retrofit.schedule.summary``, the numbers the CLI prints), the planned mean survival, and the
   same per layer (``blocks``). A window without a training step has no report (``None``): an
   evaluation or the end of a run carries no training statistics.
4. :meth:`Lifecycle.strip`: ``retrofit.strip``, idempotent; the weights load into the original
   class with ``strict=True`` at any point (inserted layers hold no state).

The statistics themselves are ``retrofit.schedule``'s (``current_rates``, ``summary``); this
module only windows and names them. It is part of the core: it never imports ``retrofit.train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from retrofit import schedule
from retrofit.api import apply as retrofit_apply
from retrofit.lint import lint, summary_line
from retrofit.plan import Plan
from retrofit.recipe import Recipe, load_recipe
from retrofit.rewrite.execute import applied_plan, is_retrofitted, strip
from retrofit.techniques import TECHNIQUES, console_parts, model_edits, planned_figures

__all__ = ["Lifecycle", "Report", "Start", "block_rates", "planned_survival"]

log = logging.getLogger("retrofit")

# The per-layer values that move during training (the rest is in the plan): survival moves
# under a warm-up, keep_prob under DropBlock's ramp, kept_fraction is measured.
MOVING = ("survival", "kept_fraction", "keep_prob")


def block_rates(rates: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per layer, the values of :func:`retrofit.schedule.current_rates` that move in training
    (layers with none, such as Uout, are left out)."""
    # A value may be None (a kept fraction with no training call in the window): not measured.
    return {
        name: {k: float(r[k]) for k in MOVING if r.get(k) is not None}
        for name, r in rates.items()
        if any(k in r for k in MOVING)
    }


def planned_survival(plan: Plan | None) -> float | None:
    """The plan's mean stochastic-depth survival p_l (what the measured kept fraction is read
    against); None without stochastic-depth edits."""
    if plan is None:
        return None
    return planned(plan).get("sd_planned")


def planned(plan: Plan | None) -> dict[str, float]:
    """The plan's planned figures (``sd_planned`` …: each technique's ``figures.planned``)."""
    return {} if plan is None else planned_figures([e.to_dict() for e in plan.edits])


@dataclass(frozen=True)
class Start:
    """What a run prints once, before its first step (rank 0).

    Attributes:
        plan: the applied plan (None when nothing was applied).
        plan_summary: its one-line summary (``Plan.summary``).
        findings: the lint's findings as dicts (``Finding.to_dict``).
        lint_verdict: the lint's verdict in one line (``retrofit.lint.summary_line``), or why
            it did not run.
        lint_skipped: why the lint did not run (it crashed), else None.
    """

    plan: Plan | None = None
    plan_summary: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    lint_verdict: str | None = None
    lint_skipped: str | None = None

    def lines(self) -> list[str]:
        """``plan: …`` and ``lint: …``, as the CLI prints them."""
        out = []
        if self.plan_summary:
            out.append(f"plan: {self.plan_summary}")
        if self.lint_verdict:
            out.append(f"lint: {self.lint_verdict}")
        return out

    def params(self, prefix: str = "retrofit/") -> dict[str, Any]:
        """The same as hyper-parameters for a framework's logger (strings and a count)."""
        out: dict[str, Any] = {}
        if self.plan_summary:
            out[prefix + "plan"] = self.plan_summary
        if self.lint_verdict:
            out[prefix + "lint"] = self.lint_verdict
            out[prefix + "lint_findings"] = len(self.findings)
        return out


@dataclass(frozen=True)
class Report:
    """The figures of one window of training steps (since the previous report).

    Attributes:
        steps: training steps in the window.
        means: ``sd_survival`` (mean current survival), ``sd_kept`` (mean kept fraction of the
            gates over the window), ``keep_prob`` (mean DropBlock keep_prob), from
            ``retrofit.schedule.summary``; and ``sd_planned`` (the plan's mean survival). Keys
            without layers are absent.
        blocks: per layer, its ``survival`` / ``kept_fraction`` / ``keep_prob``
            (:func:`block_rates`).
        layers: how many inserted layers report (including those with no moving value).
    """

    steps: int
    means: dict[str, float]
    blocks: dict[str, dict[str, float]]
    layers: int

    def scalars(self, prefix: str = "retrofit/", *, per_block: bool = False) -> dict[str, float]:
        """Flat scalars for a logger: ``{prefix}sd_kept`` …, and with ``per_block``
        ``{prefix}{layer}/{value}`` for every layer (``retrofit/layer1.0/kept_fraction``)."""
        out = {prefix + k: v for k, v in self.means.items()}
        if per_block:
            for name, values in self.blocks.items():
                out.update({f"{prefix}{name or '<root>'}/{k}": v for k, v in values.items()})
        return out

    def line(self) -> str:
        """The CLI's wording: ``kept 0.93 (planned 0.95), survival 0.95, DropBlock keep_prob
        0.900`` (the parts that exist)."""
        return ", ".join(console_parts(self.means))


class Lifecycle:
    """One recipe's life in one training run (module docstring).

    Args:
        recipe: a recipe path, dict or :class:`~retrofit.Recipe` (None: nothing to apply; the
            lifecycle still lints, updates and reports a model retrofitted beforehand).
        example_input: the probe for ``apply``'s verification and the lint (see ``retrofit.apply``).
        verify: check the eval output is unchanged (``retrofit.apply``'s ``verify``).
        allow_partial: ``retrofit.apply``'s ``allow_partial``.
        training_call: ``retrofit.apply``'s ``training_call`` (what a training-mode forward is
            called with: a detector's targets …; see ``retrofit.verify.training_call``).
        run_lint: lint the model at start.
        strict_lint: let a lint crash propagate (otherwise the verdict says it did not run).
    """

    def __init__(
        self,
        recipe: Recipe | dict | str | None = None,
        *,
        example_input: Any = None,
        verify: bool = True,
        allow_partial: bool = True,
        training_call: Any = None,
        run_lint: bool = True,
        strict_lint: bool = False,
    ) -> None:
        self.recipe = load_recipe(recipe) if recipe is not None else None
        self.example_input = example_input
        self.verify = verify
        self.allow_partial = allow_partial
        self.training_call = training_call
        self.run_lint = run_lint
        self.strict_lint = strict_lint
        self.model: nn.Module | None = None
        self._progressive: list[nn.Module] = []
        self._measured: list[tuple[str, nn.Module]] = []
        self.started: Start | None = None
        self.progress = 0.0
        self._window_steps = 0
        self._planned: dict[str, dict[str, float]] = {}  # technique → its planned figures

    # ------------------------------------------------------------------ 1. start

    def edits_model(self) -> bool:
        """Whether the recipe has a technique that edits the model."""
        r = self.recipe
        return r is not None and any(r.sections.get(k) for k in model_edits())

    def start(self, model: nn.Module, *, apply: bool = True, t: float = 0.0) -> Start:
        """Apply the recipe to ``model`` in place (when ``apply`` and the recipe edits the model;
        ``apply=False`` adopts a model retrofitted beforehand), lint it, set the rates for
        progress ``t``. The model's train/eval flag is kept.

        Raises:
            whatever ``retrofit.apply`` raises (the model is then handed back unchanged); the
            lint's error only with ``strict_lint``.
        """
        was_training = model.training
        try:
            if apply and self.edits_model():
                retrofit_apply(
                    model, self.recipe, example_input=self.example_input, verify=self.verify,
                    allow_partial=self.allow_partial, training_call=self.training_call,
                )  # fmt: skip
        finally:
            model.train(was_training)
        self.model = model
        # The regularizers are in the model from here on: found once, not on every update.
        self._progressive = schedule.progressive_modules(model)
        self._measured = schedule.measured_modules(model)
        the_plan = applied_plan(model)
        self._planned = (
            {
                name: planned_figures([e.to_dict() for e in the_plan.by_kind(name)])
                for name in TECHNIQUES
            }
            if the_plan is not None
            else {}
        )
        findings, verdict, skipped = self._lint(model) if self.run_lint else ([], None, None)
        self.started = Start(
            plan=the_plan,
            plan_summary=the_plan.summary() if the_plan is not None else None,
            findings=findings,
            lint_verdict=verdict,
            lint_skipped=skipped,
        )
        self.update(t, new_step=False)
        return self.started

    def _lint(self, model: nn.Module) -> tuple[list[dict[str, Any]], str | None, str | None]:
        was_training = model.training
        try:
            result = lint(model, example_input=self.example_input)
        except Exception as e:
            # A lint crash must not cost a training run, unless the caller asked to be strict.
            if self.strict_lint:
                raise
            skipped = f"lint failed: {type(e).__name__}: {e}"
            log.warning("%s", skipped)
            return [], f"not run ({skipped})", skipped
        finally:
            model.train(was_training)
        return [f.to_dict() for f in result], summary_line(result), None

    # ------------------------------------------------------------------ 2. update

    def update(self, t: float, *, new_step: bool = True) -> None:
        """Set the rates for training progress ``t`` ∈ [0, 1]; ``new_step``: a training step
        runs at these rates (it joins the report's window)."""
        self.progress = t
        if self.model is None:
            return
        schedule.update_modules(self._progressive, t)
        if new_step:
            self._window_steps += 1

    # ------------------------------------------------------------------ 3. report

    def report(self, *, reset: bool = True) -> Report | None:
        """The window's figures (class docstring of :class:`Report`); ``reset`` starts the next
        window (the gates' kept counters are zeroed). None when no training step ran since the
        previous report, or nothing was started."""
        if self.model is None or self._window_steps == 0:
            return None
        rates = schedule.current_rates(self.model, found=self._measured)
        means = dict(schedule.summary(rates))
        # The plan's figures where the technique's layers report (sd_planned beside sd_survival).
        kinds = {r.get("kind") for r in rates.values()}
        for name, figures in self._planned.items():
            if name in kinds:
                for key, value in figures.items():
                    means.setdefault(key, value)
        out = Report(
            steps=self._window_steps, means=means, blocks=block_rates(rates), layers=len(rates)
        )
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        """Start a new window: no steps yet, the gates' counters zeroed."""
        self._window_steps = 0
        if self.model is None:
            return
        schedule.reset_stats(self.model, found=self._measured)

    # ------------------------------------------------------------------ 4. strip

    def strip(self, *copies: nn.Module | None) -> None:
        """``retrofit.strip`` the model (and ``copies`` of it, such as an EMA); idempotent. The
        life ends here: later updates and reports do nothing."""
        for m in (self.model, *copies):
            if m is not None and is_retrofitted(m):
                strip(m)
        self.model = None
