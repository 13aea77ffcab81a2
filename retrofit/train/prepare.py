"""Everything between "a model and a recipe" and "a model ready to train".

Order matters and is fixed here: resize the classifier first (so the plan, the rewrite and the
saved weights all see the final head), then plan, then ``retrofit.apply``, then lint the model
that will actually be trained (a recipe's Uout/dropout fix may already have cleared a finding).
The run directory gets the resolved recipe, the plan and the lint report before the first step.

The core API (``retrofit.apply``, ``plan``, ``lint``, ``load_recipe``, ``schedule``) is imported
lazily: the trainer is usable without regularizers while those modules are absent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.finetune_config import TrainConfig
from retrofit.lifecycle import Lifecycle
from retrofit.recipe import Recipe, load_recipe
from retrofit.techniques import model_edits

log = logging.getLogger("retrofit.train")


class LintFindingsError(RuntimeError):
    """``strict_lint`` was set and the lint found Dropout→BatchNorm variance-shift sites.

    The CLI maps it to exit code 1 (lint findings), like ``retrofit-cli lint``.
    """

    def __init__(self, findings: list[dict[str, Any]]) -> None:
        self.findings = findings
        first = "; ".join(_finding_line(f) for f in findings[:3])
        super().__init__(
            f"strict lint: {len(findings)} finding(s), refusing to train: {first}. Fix them with the "
            "recipe (uout: or dropout_fix:) or train without strict lint"
        )


def _finding_line(f: dict[str, Any]) -> str:
    if "dropout" in f and "norm" in f:
        return f"dropout {f['dropout']} reaches BatchNorm {f['norm']}"
    return json.dumps(f, default=str)


def resolve_recipe(recipe: Any) -> Recipe | None:
    """A Recipe (or None) from a Recipe, a path, or a dict."""
    return None if recipe is None else load_recipe(recipe)


def train_config_of(recipe: Any) -> TrainConfig:
    """The recipe's ``train:`` section as a TrainConfig (defaults when absent)."""
    section = getattr(recipe, "train", None) if recipe is not None else None
    return section if isinstance(section, TrainConfig) else TrainConfig.from_dict(section)


def has_model_edits(recipe: Recipe | None) -> bool:
    """Whether the recipe enables a technique that edits the model (read from the registry of
    techniques each time: a technique cannot be forgotten here)."""
    return recipe is not None and any(recipe.sections.get(k) for k in model_edits())


def recipe_dict(recipe: Any, cfg: TrainConfig) -> dict[str, Any]:
    """The recipe as a plain dict, with the resolved train section (defaults filled in)."""
    d: dict[str, Any] = {}
    if recipe is not None:
        if hasattr(recipe, "to_dict"):
            d = dict(recipe.to_dict())
        elif dataclasses.is_dataclass(recipe):
            d = dataclasses.asdict(recipe)
        else:
            d = {k: v for k, v in vars(recipe).items() if not k.startswith("_")}
    d = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in d.items() if v is not None}
    d["train"] = cfg.to_dict()
    return d


def example_input(
    input_size: tuple[int, ...], device: torch.device, batch: int = 2
) -> torch.Tensor:
    """A random input for tracing/verification, from a private generator (global RNG untouched)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(batch, *input_size, generator=g).to(device)


@dataclasses.dataclass
class Prepared:
    """What preparing did: the plan (dict) and its one-line summary, the lint's findings (dicts),
    its verdict in one line, and why it did not run (``lint_skipped``) if it did not."""

    plan: dict[str, Any] | None
    findings: list[dict[str, Any]]
    lint_skipped: str | None
    plan_summary: str | None = None
    lint_verdict: str | None = None
    lifecycle: Lifecycle | None = None  # updates, reports and strips the run's regularizers


def prepare_model(
    model: nn.Module,
    recipe: Any,
    cfg: TrainConfig,
    input_size: tuple[int, int, int],
    *,
    device: torch.device,
    out: Path | None,
    strict_lint: bool,
    apply: bool = True,
    allow_partial: bool = True,
) -> Prepared:
    """Plan and apply the recipe to ``model`` (in place), lint it, write the run's preamble files.

    ``out`` is None on non-zero ranks: every rank edits its model, only rank 0 writes.

    A ``strict_lint`` refusal writes nothing: the retry with a fixing recipe can use the same
    ``out``.

    Raises:
        LintFindingsError: ``strict_lint`` and the lint reported findings.
    """
    example = example_input(input_size, device)
    # The one lifecycle the integrations share (retrofit.lifecycle): apply, then lint the model
    # that will actually be trained.
    lifecycle = Lifecycle(
        recipe, example_input=example, allow_partial=allow_partial, strict_lint=strict_lint
    )
    start = lifecycle.start(model, apply=apply)
    the_plan = start.plan if apply and lifecycle.edits_model() else None
    plan_dict = the_plan.to_dict() if the_plan is not None else None
    plan_summary = start.plan_summary if the_plan is not None else None
    findings, skipped = start.findings, start.lint_skipped
    verdict = start.lint_verdict
    if findings and skipped is None:
        verdict = (verdict or "") + "; details in lint.json, or run retrofit-cli lint"
    if strict_lint and findings:
        raise LintFindingsError(findings)

    if out is not None:
        _write_preamble(out, recipe, cfg, plan_dict, {"findings": findings, "skipped": skipped})
    return Prepared(
        plan=plan_dict,
        findings=findings,
        lint_skipped=skipped,
        plan_summary=plan_summary,
        lint_verdict=verdict,
        lifecycle=lifecycle,
    )


def _write_preamble(
    out: Path, recipe: Any, cfg: TrainConfig, plan: dict[str, Any] | None, lint: dict[str, Any]
) -> None:
    """The run directory's first files: the resolved recipe, the plan and the lint report."""
    import yaml

    from retrofit.train.checkpoint import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        out / "recipe.yaml", yaml.safe_dump(recipe_dict(recipe, cfg), sort_keys=False)
    )
    if plan is not None:
        atomic_write_bytes(out / "plan.json", json.dumps(plan, indent=2, default=str))
    atomic_write_bytes(out / "lint.json", json.dumps(lint, indent=2, default=str))
