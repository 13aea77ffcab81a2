"""PNG plots of a run: training/validation curves and the stochastic-depth survival schedule.

matplotlib runs on the Agg backend (no display needed, safe on servers and in worker processes).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Loss, accuracy, lr and regularizer rates against optimizer steps → ``path``."""
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not steps and not epochs:
        return None
    has_rates = any(r.get("sd_kept") is not None or r.get("keep_prob") is not None for r in steps)
    plt = _pyplot()
    n = 4 if has_rates else 3
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4))

    ax = axes[0]
    ax.plot(
        [r["step"] for r in steps], [r["loss"] for r in steps], label="train (per log step)", lw=1
    )
    if epochs:
        ax.plot(
            [r["step"] for r in epochs],
            [r.get("train_loss") for r in epochs],
            "o-",
            label="train (epoch)",
        )
        ax.plot([r["step"] for r in epochs], [r.get("val_loss") for r in epochs], "s-", label="val")
    ax.set(title="loss", xlabel="step")
    ax.legend(fontsize=8)

    ax = axes[1]
    for key, label in (
        ("val_top1", "val top-1"),
        ("val_top5", "val top-5"),
        ("ema_val_top1", "EMA val top-1"),
    ):
        pts = [(r["step"], r[key]) for r in epochs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=label)
    ax.set(title="accuracy (%)", xlabel="step")
    if epochs:
        ax.legend(fontsize=8)

    ax = axes[2]
    ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    ax.set(title="learning rate", xlabel="step")

    if has_rates:
        ax = axes[3]
        for key, label in (
            ("sd_kept", "stochastic depth: kept fraction"),
            ("keep_prob", "DropBlock keep_prob"),
        ):
            pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label)
        ax.set(title="regularizer rates", xlabel="step", ylim=(0, 1.05))
        ax.legend(fontsize=8)

    fig.tight_layout()
    return _save(fig, path)


def plot_survival(plan: Mapping[str, Any] | None, path: str | Path) -> Path | None:
    """Bar chart of the survival probability p_l of each gated block (Huang et al. 2016, eq. 4)."""
    edits = [
        e
        for e in (plan or {}).get("edits", [])
        if e.get("kind") == "stochastic_depth" and e.get("survival") is not None
    ]
    if not edits:
        return None
    edits.sort(key=lambda e: e.get("depth") or 0)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(edits) + 2), 3.6))
    xs = [e.get("depth") or i + 1 for i, e in enumerate(edits)]
    ax.bar(xs, [e["survival"] for e in edits], color="tab:blue")
    ax.set(
        title="stochastic depth: survival p_l per block",
        xlabel="block l",
        ylabel="p_l",
        ylim=(0, 1.05),
    )
    if len(edits) <= 40:
        ax.set_xticks(xs)
        ax.set_xticklabels([e.get("module") or "(root)" for e in edits], rotation=90, fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Render into memory, then write atomically: a full disk never leaves half a PNG."""
    from retrofit.train.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())
