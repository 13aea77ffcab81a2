"""retrofit.lifecycle: the one apply → update → report → strip sequence the trainer and the
integrations share. Its windows: a report covers the training steps since the previous one, and
a window without a training step (an evaluation, the end of a run) has no report."""

from __future__ import annotations

import pytest
import torch

from retrofit.layers import StochasticDepthGate
from retrofit.lifecycle import Lifecycle, block_rates
from retrofit.rewrite.execute import is_retrofitted
from retrofit.schedule import block_survivals, warmed_up
from tests.test_train import TinyRes

RECIPE = {
    "stochastic_depth": {"p_L": 0.5, "warmup": 0.5, "mode": "row"},
    "dropblock": {"stages": [1, 2], "block_size": 3, "keep_prob": 0.8},
}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_start_update_report_strip():
    torch.manual_seed(0)
    model = TinyRes(num_classes=4)
    x = torch.randn(8, 3, 16, 16)
    life = Lifecycle(RECIPE, example_input=x[:2])
    start = life.start(model)
    assert start.plan_summary.startswith("TinyRes: 4 stochastic_depth, 2 dropblock")
    assert start.lines() == [f"plan: {start.plan_summary}", f"lint: {start.lint_verdict}"]
    assert start.lint_verdict.startswith("clean") and start.findings == []
    assert start.params()["retrofit/lint_findings"] == 0
    assert life.report() is None, "no training step yet: nothing to report"

    gates = [n for n, m in model.named_modules() if isinstance(m, StochasticDepthGate)]
    targets = list(block_survivals(["b1", "b2", "b3", "b4"], 0.5, "linear").values())
    model.train()
    for t in (0.25, 0.75):  # two steps in one window
        life.update(t)
        model(x).sum().backward()
    report = life.report()
    assert report.steps == 2 and report.layers == 6  # 4 gates, 2 DropBlocks
    survival = [warmed_up(0.75, p, 0.5) for p in targets]
    assert report.means["sd_survival"] == pytest.approx(sum(survival) / 4)
    assert report.means["sd_planned"] == pytest.approx(sum(targets) / 4)
    assert report.means["keep_prob"] == pytest.approx(0.8 + 0.2 * 0.25)  # ramp at t = 0.75
    assert [report.blocks[g]["survival"] for g in gates] == pytest.approx(survival)
    kept = [report.blocks[g]["kept_fraction"] for g in gates]
    assert report.means["sd_kept"] == pytest.approx(sum(kept) / 4)
    assert report.line() == (
        f"kept {report.means['sd_kept']:.2f} (planned {sum(targets) / 4:.2f}), "
        f"survival {sum(survival) / 4:.2f}, DropBlock keep_prob {0.8 + 0.2 * 0.25:.3f}"
    )
    scalars = report.scalars(per_block=True)
    assert scalars[f"retrofit/{gates[0]}/kept_fraction"] == kept[0]
    assert len(scalars) == 4 + 4 * 2 + 2 * 1  # means; gates: survival+kept; DropBlock keep_prob

    model.eval()
    with torch.no_grad():
        model(x)  # an evaluation is no training step
    assert life.report() is None, "the window restarted at the report; evaluation adds nothing"

    life.strip()
    assert not is_retrofitted(model)
    life.update(1.0)
    assert life.report() is None, "after strip the life is over"


def test_reports_read_the_layers_found_at_start_not_every_module(monkeypatch):
    """A report (every ``log_every`` steps of a run) reads the layers found once at start: the
    runtime-Protocol checks over every module cost ~20 ms a report on a 260-module segmenter.
    Its figures are those of a search of the whole model."""
    import retrofit.schedule as schedule

    torch.manual_seed(0)
    model = TinyRes(num_classes=4)
    x = torch.randn(8, 3, 16, 16)
    life = Lifecycle(RECIPE, example_input=x[:2])
    life.start(model)
    model.train()
    life.update(0.5)
    model(x).sum().backward()
    whole = schedule.current_rates(model)
    walks = []
    original = model.named_modules
    monkeypatch.setattr(
        model, "named_modules", lambda *a, **k: walks.append(1) or original(*a, **k)
    )
    report = life.report()
    assert walks == [], "the report searched the model again"
    assert report.layers == len(whole) == 6
    assert report.blocks == block_rates(whole)
    monkeypatch.undo()
    assert all(r["calls"] == 0 for r in schedule.current_rates(model).values() if "calls" in r)


def test_adopting_a_retrofitted_model_and_a_crashing_lint(monkeypatch):
    """``start(apply=False)`` adopts a model retrofitted beforehand (timm's hook line 1), and a
    lint that crashes does not cost the run: the verdict says it did not run."""
    import retrofit
    import retrofit.lifecycle as lifecycle

    model = retrofit.apply(TinyRes(num_classes=4), RECIPE, example_input=torch.randn(2, 3, 16, 16))

    def crash(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(lifecycle, "lint", crash)
    start = Lifecycle().start(model, apply=False)
    assert start.plan_summary.startswith("TinyRes: 4 stochastic_depth")
    assert start.lint_verdict == "not run (lint failed: RuntimeError: boom)"
    assert start.lint_skipped == "lint failed: RuntimeError: boom"
    with pytest.raises(RuntimeError, match="boom"):
        Lifecycle(strict_lint=True).start(model, apply=False)


def test_update_sets_the_layers_found_at_start_without_walking_the_model(monkeypatch):
    """An update runs every training step: the layers are found once, at start (a walk with a
    Protocol isinstance per module cost ~14 ms a step on lraspp_mobilenet_v3_large)."""
    from retrofit import schedule
    from retrofit.layers import DropBlock

    torch.manual_seed(0)
    model = TinyRes(num_classes=4)
    life = Lifecycle(RECIPE, example_input=torch.randn(2, 3, 16, 16), run_lint=False)
    life.start(model)
    found = schedule.progressive_modules(model)
    assert len(found) == 6  # 4 gates, 2 DropBlocks
    walks = []
    real_modules = torch.nn.Module.modules
    monkeypatch.setattr(
        torch.nn.Module, "modules", lambda self: walks.append(self) or real_modules(self)
    )
    life.update(0.75)
    assert walks == [], "update walked the model"
    monkeypatch.undo()
    blocks = [m for m in found if isinstance(m, DropBlock)]
    assert [b.keep_prob for b in blocks] == pytest.approx([0.8 + 0.2 * 0.25] * 2)
    rates = schedule.current_rates(model)
    gates = [r for r in rates.values() if r["kind"] == "stochastic_depth"]
    assert [g["survival"] for g in gates] == pytest.approx(
        [warmed_up(0.75, g["target_survival"], 0.5) for g in gates]
    )
