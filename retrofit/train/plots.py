"""PNG plots of a run: ``curves.png`` (losses, accuracy, lr, and every regularizer layer over
training) and ``survival.png`` (stochastic depth's p_l per block, planned and measured).

Both are sized for a laptop screen (at most 1100×750 px at 100 dpi), every axis is labelled and
ticks use the default 9–10 pt font. matplotlib runs on the Agg backend (no display needed, safe
on servers and in worker processes).

``layers`` below is what the trainer reads from the model once (:func:`regularizer_layers`):
per stochastic-depth gate its depth l and planned survival p_l, per DropBlock its target
keep_prob. With it the plots put the measured kept fractions of ``metrics.jsonl`` beside the plan.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retrofit.techniques import TECHNIQUES

DPI = 100
WIDTH_IN = 11.0  # 1100 px


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def regularizer_layers(rates: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The static facts the plots need, from ``retrofit.schedule.current_rates(model)``, as
    each layer's technique states them (its record's ``figures.plot``): ``{name: {"kind",
    "depth", "survival"}}`` for gates, ``{name: {"kind", "target"}}`` for DropBlock layers."""
    out: dict[str, dict[str, Any]] = {}
    for name, r in rates.items():
        technique = TECHNIQUES.get(r.get("kind", ""))
        facts = technique.figures.plot(r) if technique is not None else None
        if facts is not None:
            out[name] = facts
    return out


# --- what the records say, per block ----------------------------------------------------------


def _owner(gate: str) -> str:
    """``layer1.0`` from ``layer1.0.retrofit_stochastic_depth0`` (the block a gate sits in)."""
    parent, _, leaf = gate.rpartition(".")
    return parent if leaf.startswith("retrofit_") else gate


def _sd_rows(
    steps: Sequence[Mapping[str, Any]], layers: Mapping[str, Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """One row per block depth l: label, planned p_l, and the kept fraction per log window
    (the mean over the block's gates when it has several residual branches)."""
    names = list(dict.fromkeys(n for r in steps for n, v in (r.get("rates") or {}).items()
                               if "kept_fraction" in v))  # fmt: skip
    if not names:
        return []
    info = {n: dict((layers or {}).get(n, {})) for n in names}
    for i, n in enumerate(names):
        info[n].setdefault("depth", i + 1)  # no layer facts: record order is execution order
    by_depth: dict[int, list[str]] = {}
    for n in names:
        by_depth.setdefault(int(info[n]["depth"] or 0), []).append(n)
    rows = []
    for depth in sorted(by_depth):
        gates = by_depth[depth]
        series = []
        for r in steps:
            vals = [(r.get("rates") or {}).get(g, {}).get("kept_fraction") for g in gates]
            vals = [v for v in vals if v is not None]
            series.append(sum(vals) / len(vals) if vals else float("nan"))
        planned = [info[g].get("survival") for g in gates if info[g].get("survival") is not None]
        rows.append(
            {
                "label": f"{depth}  {_owner(gates[0]) or 'root'}",
                "planned": sum(planned) / len(planned) if planned else None,
                "series": series,
            }
        )
    return rows


def _dropblock_rows(steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """keep_prob over training per DropBlock layer, or one row when they all move together."""
    names = list(dict.fromkeys(n for r in steps for n, v in (r.get("rates") or {}).items()
                               if "keep_prob" in v))  # fmt: skip
    series = {
        n: [(r.get("rates") or {}).get(n, {}).get("keep_prob", float("nan")) for r in steps]
        for n in names
    }
    if not series:
        return []
    first = next(iter(series.values()))
    if all(s == first for s in series.values()):
        return [{"label": f"DropBlock ×{len(series)}", "planned": None, "series": first}]
    return [{"label": f"DropBlock {n}", "planned": None, "series": s} for n, s in series.items()]


# --- curves.png -------------------------------------------------------------------------------


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path | None:
    """Loss, accuracy and lr against optimizer steps; below them, when the run has regularizer
    layers, their kept fraction per block and log window (a heatmap, block l = 1 on top) and the
    planned p_l against the fraction each block actually kept over the run → ``path``."""
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not steps and not epochs:
        return None
    sd, db = _sd_rows(steps, layers), _dropblock_rows(steps)
    plt = _pyplot()
    rows = sd + db
    # A run shorter than a few log windows has no step records (or one): the lr is then read
    # from the epoch records, and a panel with nothing to show is left out, not drawn empty.
    lr_points = _lr_points(steps, epochs)
    # A heatmap needs two log windows to be a picture over training; with fewer, the plan vs
    # run panel (the fraction kept over the run) says all there is, across the full width.
    heat_rows = rows if len(steps) >= 2 else []
    height = 3.3 + (min(0.85 + 0.22 * len(rows), 4.2) if rows else 0.0)
    fig = plt.figure(figsize=(WIDTH_IN, height), dpi=DPI)
    top = 3 if lr_points else 2
    grid = fig.add_gridspec(
        2 if rows else 1, 3 * top, height_ratios=[3.3, height - 3.3] if rows else None
    )
    width = 3  # grid columns per top panel
    _loss_panel(fig.add_subplot(grid[0, :width]), steps, epochs)
    _accuracy_panel(fig.add_subplot(grid[0, width : 2 * width]), epochs)
    if lr_points:
        _lr_panel(fig.add_subplot(grid[0, 2 * width :]), lr_points)
    if heat_rows:
        heat = fig.add_subplot(grid[1, : 2 * top])
        _heatmap(fig, heat, [r["step"] for r in steps], heat_rows)
        if sd:
            _planned_panel(fig.add_subplot(grid[1, 2 * top :], sharey=heat), rows)
    elif sd:
        ax = fig.add_subplot(grid[1, :])
        _planned_panel(ax, rows)
        _block_ticks(ax, rows)
        ax.tick_params(axis="y", labelleft=True)
        ax.set_ylim(len(rows) - 0.5, -0.5)
    fig.tight_layout()
    return _save(plt, fig, path)


def _lr_points(steps: Sequence[Mapping], epochs: Sequence[Mapping]) -> list[tuple[int, float]]:
    pts = [(r["step"], r["lr"]) for r in steps if r.get("lr") is not None]
    if len(pts) < 2:
        pts = sorted(
            {r["step"]: r["lr"] for r in [*steps, *epochs] if r.get("lr") is not None}.items()
        )
    return pts


def _loss_panel(ax: Any, steps: Sequence[Mapping], epochs: Sequence[Mapping]) -> None:
    ax.plot(
        [r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train (log window)"
    )
    if epochs:
        xs = [r["step"] for r in epochs]
        ax.plot(xs, [r.get("train_loss") for r in epochs], "o-", label="train (epoch)")
        val = [
            (x, r["val_loss"])
            for x, r in zip(xs, epochs, strict=True)
            if r.get("val_loss") is not None
        ]
        if val:  # detectors compute no loss in eval mode
            ax.plot(*zip(*val, strict=True), "s-", label="val")
    ax.set(
        title="loss",
        xlabel="optimizer step",
        ylabel="training loss" if _detection(epochs) else "cross-entropy",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _accuracy_panel(ax: Any, epochs: Sequence[Mapping]) -> None:
    title, ylabel = "validation accuracy", "accuracy (%)"
    if _detection(epochs):
        title, ylabel = "validation mAP (COCO)", "mAP (%)"
    elif any(r.get("val_miou") is not None for r in epochs):
        title, ylabel = "validation mIoU", "mIoU / pixel accuracy (%)"
    for key, label in (
        ("val_top1", "top-1"),
        ("val_top5", "top-5"),
        ("ema_val_top1", "EMA top-1"),
        ("val_map", "mAP@[.5:.95]"),
        ("val_map_50", "AP50"),
        ("ema_val_map", "EMA mAP"),
        ("val_miou", "mIoU"),
        ("val_pixel_acc", "pixel accuracy"),
        ("ema_val_miou", "EMA mIoU"),
    ):
        pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=label)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    if epochs:
        ax.set_xticks(sorted({int(r["epoch"]) for r in epochs}))
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _detection(epochs: Sequence[Mapping]) -> bool:
    return any(r.get("val_map") is not None for r in epochs)


def _lr_panel(ax: Any, points: Sequence[tuple[int, float]]) -> None:
    ax.plot(*zip(*points, strict=True), "o-" if len(points) < 8 else "-", ms=3)
    ax.set(title="learning rate", xlabel="optimizer step", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)


def _heatmap(fig: Any, ax: Any, xs: list[int], rows: list[dict[str, Any]]) -> None:
    import numpy as np

    data = np.array([r["series"] for r in rows], dtype=float)
    low = float(np.nanmin(data)) if np.isfinite(data).any() else 0.0
    # The interesting range is near 1 (p_l and keep_prob are mostly ≥ 0.5): start the colour
    # scale a little under the lowest value instead of at 0.
    vmin = max(0.0, np.floor((low - 0.05) * 10) / 10)
    step = xs[1] - xs[0] if len(xs) > 1 else 1
    extent = (xs[0] - step / 2, xs[-1] + step / 2, len(rows) - 0.5, -0.5) if xs else None
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin,
                   vmax=1.0, extent=extent)  # fmt: skip
    _block_ticks(ax, rows)
    ax.set(
        title="regularizers over training: fraction kept per log window",
        xlabel="optimizer step",
        ylabel="block l  (module)",
    )
    bar = fig.colorbar(im, ax=ax, pad=0.01)
    bar.set_label("kept fraction / keep_prob")


def _planned_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Planned p_l (a bar mark) and the fraction kept over the run (a dot) per block, on an axis
    that starts just under the lowest value, so a gate that keeps too much or too little shows."""
    import numpy as np

    ys = np.arange(len(rows))
    planned = np.array([r["planned"] if r["planned"] is not None else np.nan for r in rows])
    # DropBlock rows have no plan to compare with (their keep_prob is the schedule itself).
    measured = np.array(
        [float(np.nanmean(r["series"])) if r["planned"] is not None else np.nan for r in rows]
    )
    ax.plot(planned, ys, "|", color="#6baed6", ms=14, mew=3, label="planned p_l")
    ax.plot(measured, ys, "o", color="#08306b", ms=4, label="kept over the run")
    both = np.concatenate([planned, measured])
    low = float(np.nanmin(both)) if np.isfinite(both).any() else 0.0
    ax.set(
        title="stochastic depth: plan vs run",
        xlabel="planned p_l (|), kept over the run (•)",
        xlim=(max(0.0, np.floor((low - 0.05) * 10) / 10), 1.005),
    )
    ax.tick_params(axis="y", labelleft=False)
    ax.grid(alpha=0.3)


def _block_ticks(ax: Any, rows: list[dict[str, Any]]) -> None:
    # At most ~24 labels stay legible at 9 pt in the panel's height; label every k-th row.
    every = max(1, -(-len(rows) // 24))
    ticks = list(range(0, len(rows), every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([rows[i]["label"] for i in ticks], fontsize=8)


# --- survival.png -----------------------------------------------------------------------------


def plot_survival(
    plan: Mapping[str, Any] | None,
    path: str | Path,
    *,
    records: Sequence[Mapping[str, Any]] | None = None,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path | None:
    """Survival probability p_l of each block (Huang et al. 2016: p_l = 1 − (l/L)(1 − p_L)),
    as horizontal bars with block l = 1 on top; with ``records``, the fraction each block kept
    over the run as dots beside it."""
    # The techniques whose layers report per block depth (stochastic depth's gates).
    per_depth = {name for name, t in TECHNIQUES.items() if t.figures.per_depth}
    edits = [
        e
        for e in (plan or {}).get("edits", [])
        if e.get("kind") in per_depth and e.get("survival") is not None
    ]
    if not edits:
        return None
    by_depth: dict[int, dict[str, Any]] = {}
    for i, e in enumerate(sorted(edits, key=lambda e: e.get("depth") or 0)):
        depth = int(e.get("depth") or i + 1)
        by_depth.setdefault(depth, {"block": e.get("block") or e.get("module") or "root",
                                    "survival": e["survival"]})  # fmt: skip
    measured = {}
    steps = [r for r in records or () if r.get("kind") == "step"]
    for row in _sd_rows(steps, layers):
        depth = int(row["label"].split()[0])
        vals = [v for v in row["series"] if v == v]  # drop NaN
        if vals:
            measured[depth] = sum(vals) / len(vals)
    depths = sorted(by_depth)
    plt = _pyplot()
    height = min(max(2.6, 0.9 + 0.24 * len(depths)), 7.5)
    fig, ax = plt.subplots(figsize=(7.0, height), dpi=DPI)
    ax.barh(range(len(depths)), [by_depth[d]["survival"] for d in depths], color="#6baed6")
    title = f"stochastic depth (Huang et al. 2016): planned p_l of {len(depths)} blocks (bars)"
    if measured:
        pts = [(measured[d], i) for i, d in enumerate(depths) if d in measured]
        ax.plot(*zip(*pts, strict=True), "o", color="#08306b", ms=4)
        title += ",\nfraction kept over the run (dots)"
    rows = [{"label": f"{d}  {by_depth[d]['block']}"} for d in depths]
    _block_ticks(ax, rows)
    ax.invert_yaxis()
    ax.set(
        title=title,
        xlabel="survival probability p_l",
        ylabel="block l  (module)",
        xlim=(0, 1.02),
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Render into memory, then write atomically: a full disk never leaves half a PNG."""
    from retrofit.train.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())
