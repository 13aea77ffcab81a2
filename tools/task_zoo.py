"""Every torchvision detection and segmentation model: applied, verified and live, or refused.

For each name in ``torchvision.models.list_models(module=torchvision.models.detection)`` and
``.segmentation`` (random weights: ``weights=None, weights_backbone=None``; detectors at
``min_size=max_size=64``, SSD at its fixed 300/320 input; segmenters on a 2×3×64×64 batch),
``retrofit.apply`` with ``verify=True`` and no example input or training call (detectors get
the built-in targets), once per recipe (``recipes/sd.yaml``, ``recipes/dropblock.yaml``, and for
detectors that recipe with ``fpn: true``: DropBlock on the feature pyramid's levels too). A row
is ``ok`` (applied: eval output unchanged, every inserted layer called in a training forward —
both checked by apply itself), ``no site`` (the recipe found nothing to do: SSD300's VGG has no
residual block), ``n/a`` (the recipe does not apply: a stage it names is not there), or
``refused`` with apply's reason, which must never be a missing-target
error. Then the table goes between the ``task_zoo`` markers of ``docs/coverage.md``::

    python tools/task_zoo.py                      # the sweep (~16 min on 2 busy cores) + docs
    python tools/task_zoo.py --filter retinanet   # some models, no docs

Rows are appended to ``--results`` (JSON lines); a rerun skips the pairs already there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import retrofit  # noqa: E402
from retrofit.layers import DropBlock, StochasticDepthGate  # noqa: E402

RECIPES: dict[str, Any] = {
    "sd": ROOT / "recipes" / "sd.yaml",
    "dropblock": ROOT / "recipes" / "dropblock.yaml",
    # The recipe's option of a DropBlock on every output level of the feature pyramid too
    # (Ghiasi et al. 2018 on RetinaNet): detectors only, segmenters have no pyramid.
    "dropblock+fpn": ("detection", ROOT / "recipes" / "dropblock.yaml", {"fpn": True}),
}


def recipe_for(task: str, recipe: str) -> Any:
    """The recipe to apply, or None when it is not one for ``task``."""
    entry = RECIPES[recipe]
    if not isinstance(entry, tuple):
        return entry
    only, path, overrides = entry
    if task != only:
        return None
    loaded = yaml.safe_load(path.read_text())
    loaded["dropblock"] |= overrides
    return loaded


START, END = "<!-- task_zoo:start -->", "<!-- task_zoo:end -->"
MISSING_TARGET = re.compile(r"targets? should not be none|targets should not be None", re.I)


def names() -> list[tuple[str, str]]:
    from torchvision.models import detection, segmentation

    return [("detection", n) for n in torchvision.models.list_models(module=detection)] + [
        ("segmentation", n) for n in torchvision.models.list_models(module=segmentation)
    ]


def build(task: str, name: str) -> tuple[torch.nn.Module, Any]:
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if task == "detection" and not name.startswith("ssd"):
        kwargs.update(min_size=64, max_size=64)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **kwargs)
    example = torch.randn(2, 3, 64, 64) if task == "segmentation" else None
    return model, example


def sweep_one(task: str, name: str, recipe: str) -> dict[str, Any]:
    """One model × one recipe: status, the inserted layers, seconds, apply's reason."""
    model, example = build(task, name)
    t = time.perf_counter()
    row: dict[str, Any] = {"task": task, "model": name, "recipe": recipe}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            retrofit.apply(model, recipe_for(task, recipe), example_input=example)
    except retrofit.RefusedError as e:
        row.update(status="refused", reason=str(e).splitlines()[0][:160])
    except (retrofit.RecipeError, retrofit.ModelError) as e:
        # The recipe asks for a stage the model does not have, or DropBlock finds no conv stage.
        row.update(status="n/a", reason=str(e).splitlines()[0][:160])
    else:
        layers = [
            n for n, m in model.named_modules() if isinstance(m, StochasticDepthGate | DropBlock)
        ]
        plan = retrofit.applied_plan(model)
        row.update(status="ok" if layers else "no site", layers=len(layers))
        row["known"] = sum(1 for s in plan.skipped if s.known) if plan else 0
        row["unread"] = sum(1 for s in plan.skipped if not s.known) if plan else 0
    row["seconds"] = round(time.perf_counter() - t, 1)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        START,
        "## Detection and segmentation (torchvision, `tools/task_zoo.py`)",
        "",
        "Random weights, detectors at 64 px (SSD at its own size), segmenters on 2×3×64×64; "
        "`retrofit.apply(model, recipe)` with verification (eval output unchanged — for "
        "detectors on the backbone/head outputs and the detections at score_thresh 0 — and "
        "every inserted layer called in a training forward, detectors with built-in targets). "
        "`known`: forwards not traced that are the detection API's bookkeeping (no site of "
        "their own); `unread`: forwards not traced otherwise. Open: the segmenters' dilated "
        "backbones keep layer2–4 at one reduction (8 or 16), so stages (read by reduction) "
        "are too few for `stages: [3, 4]` (`n/a`), and SSD300's VGG stage `extra.0` cannot "
        "be re-traced alone.",
        "",
        "| task | model | recipe | status | layers | known | unread | s | reason |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | `{r['model']}` | {r['recipe']} | {r['status']} | "
            f"{r.get('layers', '')} | {r.get('known', '')} | {r.get('unread', '')} | "
            f"{r['seconds']} | {r.get('reason', '')} |"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    targets = sum(bool(MISSING_TARGET.search(r.get("reason", ""))) for r in rows)
    lines += [
        "",
        f"{len(rows)} model × recipe pairs: {summary}; {targets} refused for a missing target.",
        END,
    ]
    return "\n".join(lines)


def write_docs(rows: list[dict[str, Any]]) -> None:
    path = ROOT / "docs" / "coverage.md"
    text = path.read_text()
    block = table(rows)
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", help="regex over model names; no docs written")
    parser.add_argument(
        "--results", default=str(ROOT / "docs" / "task_zoo.jsonl"), help="JSON lines, resumable"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = Path(args.results)
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[(row["model"], row["recipe"])] = row
    rows = []
    for task, name in names():
        if args.filter and not re.search(args.filter, name):
            continue
        for recipe in RECIPES:
            if recipe_for(task, recipe) is None:
                continue
            row = done.get((name, recipe))
            if row is None:
                row = sweep_one(task, name, recipe)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(row, flush=True)
            if MISSING_TARGET.search(row.get("reason", "")):
                print(f"{name}: refused for a missing target", file=sys.stderr)
            rows.append(row)
    if not args.filter:
        write_docs(rows)
    return 1 if any(MISSING_TARGET.search(r.get("reason", "")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
