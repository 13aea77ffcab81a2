"""Every model in the zoos: retrofit's coverage, measured against the libraries' own drop path.

For every torchvision classification model and every timm architecture, built on the meta device
(CPU then moved to meta for constructors that need real tensors, see
``retrofit.models.create_model(meta=True)``), this runs:

* the trace (symbolic, else specialised on the module's recorded call; hierarchical fallback:
  modules that cannot be read either way are reported),
* ``retrofit.plan`` with ``stochastic_depth`` (sites, blocks),
* the stage analysis and a ``dropblock`` plan on the last two conv stages (``n/a`` for models
  without conv stages: ``NoConvStagesError``),
* ``retrofit.lint`` (Dropout → BatchNorm findings),
* the oracle: ``tools/oracle.py: library_drop_path_owners`` on the model built with
  ``drop_path_rate=0.1`` (timm) / ``stochastic_depth_prob=0.1`` (torchvision, where the builder
  accepts it), compared with the owners of retrofit's sites on the model built without: the
  library's count, the blocks retrofit misses, and the extra ones it finds.

Each result is one JSON line appended to the results file (resumable: finished architectures are
skipped on restart). Then ``--docs`` writes ``docs/coverage.csv`` and ``docs/coverage.md`` from
the results files (nothing in them is typed by hand)::

    python tools/zoo.py --jobs 2                 # the sweep (resumable), then the docs
    python tools/zoo.py --filter '^timm:resnet' --limit 20
    python tools/zoo.py --equivalence            # eval equivalence on a stratified sample (real CPU)
    python tools/zoo.py --docs                   # regenerate docs from the results files only

Extra sites (retrofit finds a residual block where the library applies no drop path) are
justified by ``JUSTIFICATIONS``: a small table of (architecture regex, owner regex) → reason,
each written from reading the model's code; anything unmatched is listed as "unjustified".
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "runs" / "zoo" / "sweep.jsonl"
DEFAULT_EQUIV = ROOT / "runs" / "zoo" / "equivalence.jsonl"
DOCS = ROOT / "docs"

SD_RECIPE = {"stochastic_depth": {}}

# (architecture regex, owner regex, reason): why retrofit's extra site is a real residual block
# that the library leaves without drop path. Read from each model's code (timm 1.0.x /
# torchvision 0.2x); matched with re.search on "zoo:arch" and on the owner module name.
JUSTIFICATIONS: list[tuple[str, str, str]] = [
    (
        r"^timm:",
        r"^layer1\.0$",
        "timm ResNet family (resnet.py): the drop-path rate is linear in the block index, block "
        "0 gets rate 0 and timm builds no DropPath module for it (`DropPath(db_r) if db_r > 0. "
        "else None`); the block is a bottleneck residual like every other",
    ),
    (
        r"^timm:(regnet|byobnet|gernet|repvgg|.*resnet.*ts|.*_ts$)",
        r"^(s1\.b1|stages\.0\.0)$",
        "timm RegNet/ByobNet: block 0 gets rate 0 from the linear schedule and timm builds no "
        "DropPath for it (`DropPath(r) if r > 0. else nn.Identity()` and the slot is an "
        "Identity in every block of that pattern); a residual like the others",
    ),
    (
        r"^timm:(cpubone|lowformer)",
        r"^stem\.\d+$",
        "CPUBone's / LowFormer's stem ResidualBlock (cpubone.py `_build_stem`, lowformer.py "
        "`stem_blocks`): first entries of the linear drop-path schedule, rate 0, so the slot is "
        "an Identity; a residual MBConv block",
    ),
    (
        r"^timm:bat_",
        r"\.attn$",
        "BAT non-local attention (layers/non_local_attn.py `BatNonLocalAttn`): its own residual "
        "`conv2(ba(conv1(x))) + x` nested inside the bottleneck's branch; timm applies drop "
        "path only at the bottleneck level",
    ),
    (
        r"^timm:gc",
        r"\.attn$",
        "GCNet global-context block (`attn_layer='gca'`: layers/global_context.py with `fuse_add=True`): `x + "
        "mlp_add(context(x))`, the GC paper's residual fusion: a branch of two 1×1 convs over "
        "an identity (its output is a per-channel vector broadcast over the map); timm applies "
        "drop path only at the bottleneck level",
    ),
    (
        r"^timm:cait",
        r"^blocks_token_only\.\d+$",
        "CaiT class-attention blocks (cait.py `blocks_token_only`): residual attention + MLP "
        "over the class token, built without a drop-path rate (default 0)",
    ),
    (
        r"^timm:xcit",
        r"^cls_attn_blocks\.\d+$",
        "XCiT class-attention blocks (xcit.py `cls_attn_blocks`): residual attention + MLP over "
        "the class token, built without a drop-path rate (default 0)",
    ),
    (
        r"^timm:volo",
        r"^post_network\.\d+$",
        "VOLO post network (volo.py: class-attention blocks built with `drop_path=0.`)",
    ),
    (
        r"^timm:csatv2",
        r"^stages\.\d+\.\d+$",
        "CSATv2 transformer blocks: drop-path rate 0 unless `transformer_drop_path=True` "
        "(csatv2.py `dp_rates`), so their slot is an Identity in every block",
    ),
    (
        r"^timm:csatv2",
        r"\.attn\.attn$",
        "CSATv2 SpatialAttention's inner one-channel transformer: `x + attn(x)`, `x + mlp(x)` "
        "residuals inside the attention gate; timm applies drop path on the outer blocks only",
    ),
    (
        r"^timm:swiftformer",
        r"\.local_representation$",
        "SwiftFormer LocalRepresentation (swiftformer.py): `skip + drop_path(layer_scale("
        "pw2(act(pw1(norm(dw(x))))))`, a residual built without a drop-path rate (default 0), "
        "so its slot is an Identity in every block",
    ),
    (
        r"^timm:efficientformerv2",
        r"\.downsample$",
        "EfficientFormerV2 attention downsampler (efficientformer_v2.py `Downsample`): "
        "`attn(x) + conv(x)`, a strided conv projection (light shortcut) plus an attention "
        "branch, the shape of a ResNet downsampling block; built without drop path",
    ),
    (
        r"^timm:fastvit",
        r"\.token_mixer$",
        "FastViT RepMixer token mixer (fastvit.py `RepMixer`): `x + layer_scale(mixer(x) - "
        "norm(x))`, a residual over depthwise convs; timm applies drop path only around the "
        "ConvMLP",
    ),
    (
        r"^timm:fastvit",
        r"^(stem\.\d+|stages\.\d+\.downsample\.proj\.\d+)$",
        "FastViT's MobileOneBlock with an identity (BN) branch (fastvit.py): "
        "`conv_scale(x) + identity(x) + Σ conv_kxk(x)` — the same block timm's own "
        "`mobileone_*` (byobnet.py `MobileOneBlock`) applies drop path to when it has the "
        "identity branch; FastViT builds it without drop path in its stem and downsamplers",
    ),
    (
        r"^timm:fastvit",
        r"\.token_mixer\.mixer$",
        "FastViT RepMixer's mixer (fastvit.py `RepMixer`: `self.mixer = MobileOneBlock(dim, dim, "
        "kernel_size, group_size=1, use_act=False)`): a MobileOneBlock with its identity (BN) "
        "branch, summed identity-first (`conv_scale(x) + identity(x) + conv_kxk(x)`), nested "
        "inside the RepMixer residual; timm applies drop path only around the ConvMLP",
    ),
    (
        r"^timm:ghostnetv3",
        r"\.ghost[12]$",
        "GhostNetV3's ghost module (ghostnet.py `GhostModuleV3`): its cheap operation is a "
        "re-parameterisable sum `cheap_rpr_scale(x1) + cheap_rpr_skip(x1) + Σ cheap_rpr_conv(x1)` "
        "with an identity (BN) branch, MobileOne-style (Liu et al. 2024), nested inside the "
        "GhostBottleneck's branch; timm applies drop path only at the bottleneck level",
    ),
    (
        r"^timm:",
        r"(^|\.)attn_pool$",
        "attention-pooling head (timm `AttentionPoolLatent`): `x = x + mlp(norm(x))` is a "
        "residual, but the pooling head takes no drop-path rate",
    ),
    (
        r"^timm:gcvit",
        r"(\.downsample\.conv_block|stem\.down\.conv_block|\.global_block\.blocks\.conv\d)$",
        "GCViT MbConvBlock (gcvit.py) in the stem/downsamplers and the global-query "
        "FeatureBlock: inverted residuals `x + conv(x)` that timm builds without drop path",
    ),
    (
        r"^timm:vit_.*(resnet|r\d+_)",
        r"^patch_embed\.backbone",
        "hybrid ViT: a ResNet/ResNetV2 stem inside the patch embedding, built without drop path "
        "(the ViT's drop_path_rate applies to the transformer blocks only)",
    ),
    (
        r"^timm:vitamin",
        r"^patch_embed\.backbone\.stages\.\d+\.\d+$",
        "ViTamin's convolutional stem (vitamin.py `MbConvStages`): MbConvLNBlocks "
        "`drop_path(conv(x)) + shortcut(x)` built without a drop-path rate (default 0), so the "
        "slot is an Identity; the ViT's rate applies to its transformer blocks only",
    ),
    (
        r"^timm:xception\d+",
        r"^blocks\.0$",
        "timm aligned Xception (xception_aligned.py): linear drop-path rate, block 0 gets 0 and "
        "timm builds no module (`DropPath(block_dpr) if block_dpr > 0. else None`); a residual "
        "like the others",
    ),
]

# Known core issues behind an architecture's numbers (arch regex → note), shown with its entry.
NOTES: list[tuple[str, str]] = []


def note_for(arch: str) -> str:
    found = [text for pattern, text in NOTES if re.search(pattern, arch)]
    return f" — {found[0]}" if found else ""


# Extra sites that are not residual blocks: retrofit's false positives, listed as such.
FALSE_POSITIVES: list[tuple[str, str, str]] = [
    (
        r"^timm:csatv2",
        r"\.pos_embed$",
        "CSATv2 PosConv, a convolutional position encoding `proj(x) + x`: its depthwise 3×3 "
        "conv runs on a one-channel map, so `groups == in_channels == 1` and it passes "
        "retrofit's dense-conv rule (analysis/residual.py rule 3). A false positive",
    ),
]


# --- building ---------------------------------------------------------------------------------


def all_architectures() -> list[str]:
    """``tv:NAME`` for torchvision's classification models, ``timm:NAME`` for timm's archs."""
    import timm
    import torchvision

    tv = sorted(torchvision.models.list_models(module=torchvision.models))
    archs = sorted({n.split(".")[0] for n in timm.list_models()})
    return [f"tv:{n}" for n in tv] + [f"timm:{n}" for n in archs]


def family(spec: str) -> str:
    """timm's module name (``timm.resnet``) or torchvision's (``tv.resnet``)."""
    zoo, _, name = spec.partition(":")
    if zoo == "tv":
        import torchvision

        return "tv." + torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    from timm.models import _registry

    return "timm." + _registry._model_to_module.get(name, "?")


def rate_kwargs(spec: str) -> dict[str, Any]:
    return {"drop_path_rate": 0.1} if spec.startswith("timm:") else {"stochastic_depth_prob": 0.1}


def build(spec: str, kwargs: dict[str, Any] | None = None, meta: bool = True):
    from retrofit.models import create_model

    model, _ = create_model(spec, kwargs=kwargs or {}, meta=meta)
    return model


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:240]}"


class Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise Timeout("task exceeded its time limit")


# --- one architecture -------------------------------------------------------------------------


def _dropblock_stages(n: int) -> list[int]:
    return [3, 4] if n >= 4 else list(range(max(1, n - 1), n + 1))


def analyse_arch(spec: str) -> dict[str, Any]:
    """Everything the sweep records for one architecture (meta device; never raises).

    ``status`` is ``error`` when the model cannot be built, traced or planned (stochastic depth);
    a later step that fails (stages, DropBlock plan, lint, oracle) is recorded in ``step_errors``
    and the remaining steps still run.
    """
    from oracle import library_drop_path_owners

    import retrofit
    from retrofit.analysis.context import Analysis
    from retrofit.analysis.stages import NoConvStagesError
    from retrofit.plan import plan

    rec: dict[str, Any] = {"arch": spec, "family": None, "status": "error", "error": None}
    rec["step_errors"] = {}
    t0 = time.perf_counter()
    step = "family"

    def attempt(name: str, fn) -> Any:
        try:
            return fn()
        except Timeout:
            raise
        except Exception as e:  # recorded; the other steps still run
            rec["step_errors"][name] = _short(e)
            return None

    try:
        rec["family"] = family(spec)
        step = "build"
        model = build(spec)
        rec["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
        step = "trace"
        analysis = Analysis(model)
        traced = analysis.traced
        step = "plan"
        the_plan = plan(model, SD_RECIPE, analysis=analysis)
        sd = the_plan.by_kind("stochastic_depth")
        rec["sites"] = len(sd)
        rec["blocks"] = len({e.block for e in sd})
        rec["reused"] = sum(1 for e in sd if e.action in ("set_rate", "replace_module"))
        rec["skipped"] = [s.to_dict() for s in the_plan.skipped]
        ours = {e.module for e in sd}
        rec["owners"] = len(ours)
        rec["status"] = "partial" if rec["skipped"] else "ok"

        def stages() -> None:
            try:
                rec["stages"] = len(analysis.stages.stages)
            except NoConvStagesError:
                rec["stages"] = rec["dropblock"] = "n/a"

        def dropblock() -> None:
            wanted = _dropblock_stages(rec["stages"])
            db = plan(model, {"dropblock": {"stages": wanted}}, analysis=analysis)
            rec["dropblock"] = len(db.by_kind("dropblock"))

        step = "stages"
        attempt("stages", stages)
        if isinstance(rec.get("stages"), int):
            step = "dropblock"
            attempt("dropblock", dropblock)
        step = "lint"
        rec["lint"] = attempt("lint", lambda: len(retrofit.lint(model)))

        def oracle() -> None:
            try:
                with_rate = build(spec, rate_kwargs(spec))
            except Exception as e:  # the builder does not take the rate
                rec["oracle_note"] = _short(e)
                with_rate = model  # torchvision's maxvit_t fixes its own rate: use the default
            rate_traced = traced if with_rate is model else Analysis(with_rate).traced
            library = library_drop_path_owners(with_rate, rate_traced)
            rec["library"] = len(library)
            # drop-path modules the library built with a non-zero rate that no graph shows:
            # inside a module fx keeps as a leaf (timm's no-trace registry: NFNet's
            # NormFreeBlock) or under no traced part (a gap in the fallback) the oracle is blind
            # ("hidden"); others are built but never called (timm builds DropPath even in
            # blocks without a skip: LCNet, VoVNet-19 slim)
            leaves = {
                f"{part.prefix}.{n.target}" if part.prefix else str(n.target)
                for part in rate_traced.parts
                for n in part.graph_module.graph.nodes
                if n.op == "call_module"
            }
            real = [
                name
                for name, m in with_rate.named_modules()
                if type(m).__name__ in ("DropPath", "StochasticDepth")
                and float(getattr(m, "drop_prob", getattr(m, "p", 0.0)) or 0.0) > 0
            ]
            parts = [part.prefix for part in rate_traced.parts]

            def blind(name: str) -> bool:
                # under a leaf call, or under no traced part at all (a trace gap)
                if any(name.startswith(leaf + ".") for leaf in leaves):
                    return True
                return not any(p == "" or name.startswith(p + ".") for p in parts)

            covered = [name for name in real if name not in leaves and blind(name)]
            rec["library_modules"] = len(real)
            rec["hidden_modules"] = len(covered)
            if not library:
                if covered:
                    rec["oracle"] = "hidden"
                else:
                    rec["oracle"] = "n/a" if with_rate is model else "none"
            else:
                rec["missing"] = sorted(library - ours)
                rec["extra"] = sorted(ours - library)
                rec["oracle"] = "missing" if rec["missing"] else "full"

        step = "oracle"
        attempt("oracle", oracle)
    except Timeout as e:
        if rec["status"] == "error":
            rec["error"] = f"{step}: {_short(e)}"
        else:
            rec["step_errors"][step] = _short(e)
    except Exception as e:  # recorded, not raised: a sweep reports every model
        rec["status"], rec["error"] = "error", f"{step}: {_short(e)}"
        rec["trace"] = traceback.format_exc(limit=-3)[-1200:]
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# --- equivalence on real tensors --------------------------------------------------------------


def _input_for(model, spec: str):
    """A small real input where the model accepts one, else its native size."""
    import torch

    from retrofit.capture.probe import fixed_image_size, probe_input_size

    c, h, w = probe_input_size(model)
    sizes = [(h, w)] if fixed_image_size(model) else [(64, 64), (96, 96), (128, 128), (h, w)]
    # probe_input_size takes channels from the first Conv2d, which is wrong behind a
    # SpaceToDepth or DCT stem (TResNet: 48, CSATv2: 64): try the config's channels too
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = list(dict.fromkeys([c, *cfg.get("input_size", (c,))[:1]]))
    gen = torch.Generator().manual_seed(0)
    last: Exception | None = None
    for hw, c in ((hw, c) for c in channels for hw in sizes):
        x = torch.randn(2, c, *hw, generator=gen)
        try:
            with torch.no_grad():
                model.eval()
                out = model(x)
            return x, out
        except Exception as e:  # a size the model refuses: try the next one
            last = e
    raise RuntimeError(f"no input size accepted: {_short(last)}")  # type: ignore[arg-type]


def equivalence_arch(spec: str) -> dict[str, Any]:
    """Eval output of the original vs ``retrofit.apply`` (stochastic depth), real CPU tensors."""
    import torch
    from torch.utils._pytree import tree_flatten

    import retrofit

    rec: dict[str, Any] = {"arch": spec, "family": None, "status": "error"}
    t0 = time.perf_counter()
    step = "build"
    try:
        rec["family"] = family(spec)
        torch.manual_seed(0)
        model = build(spec, meta=False)
        step = "input"
        x, ref = _input_for(model, spec)
        rec["input"] = list(x.shape)
        step = "apply"
        retrofit.apply(model, SD_RECIPE, example_input=x)  # verifies; raises VerifyError
        rec["gates"] = len(retrofit.applied_plan(model).by_kind("stochastic_depth"))
        with torch.no_grad():
            model.eval()
            out = model(x)
        a, _ = tree_flatten(ref)
        b, _ = tree_flatten(out)
        diffs = [
            (u.float() - v.float()).abs().max().item()
            for u, v in zip(a, b, strict=True)
            if isinstance(u, torch.Tensor)
        ]
        rec["max_abs_diff"] = max(diffs) if diffs else 0.0
        rec["status"] = "ok"
    except Exception as e:
        rec["error"] = f"{step}: {_short(e)}"
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# --- the pool ---------------------------------------------------------------------------------

_STARTED: Any = None
_TIMEOUT = 300


def _init(started, timeout: int) -> None:
    global _STARTED, _TIMEOUT
    import torch

    torch.set_num_threads(1)
    _STARTED = started
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGALRM, _alarm)
    _TIMEOUT = timeout


def _run(task: tuple[str, str]) -> dict[str, Any]:
    mode, spec = task
    _STARTED.put((spec, os.getpid(), time.time()))
    signal.alarm(_TIMEOUT)
    try:
        return analyse_arch(spec) if mode == "sweep" else equivalence_arch(spec)
    finally:
        signal.alarm(0)


def done_archs(path: Path) -> set[str]:
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        try:
            done.add(json.loads(line)["arch"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a kill: that arch runs again
    return done


def read_results(path: Path, key: str = "arch") -> list[dict[str, Any]]:
    """The records of a JSON-lines results file, the last one per ``key`` (a rerun replaces an
    earlier record; a line cut short by a kill is skipped). Shared with ``hf_zoo.py``."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec[key]] = rec
    return list(out.values())


def run_pool(mode: str, specs: list[str], path: Path, jobs: int, timeout: int) -> None:
    """Run ``specs`` over ``jobs`` processes, appending each result to ``path`` as it arrives.

    A worker that dies or hangs in C code (SIGALRM cannot interrupt it) is found by its start
    record: past ``timeout + 60`` s the arch is recorded as an error and the pool restarted.
    """
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    todo = list(specs)
    bar = tqdm(total=len(todo), desc=mode, unit="arch", dynamic_ncols=True)
    ctx = mp.get_context("fork")
    while todo:
        started = ctx.Queue()
        pool = ctx.Pool(jobs, initializer=_init, initargs=(started, timeout), maxtasksperchild=20)
        pending = {spec: pool.apply_async(_run, ((mode, spec),)) for spec in todo}
        running: dict[str, float] = {}
        hung = None
        with path.open("a") as f:
            while pending:
                try:
                    while True:
                        spec, _, t = started.get_nowait()
                        running[spec] = t
                except queue.Empty:
                    pass
                for spec, res in list(pending.items()):
                    if res.ready():
                        rec = res.get()
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                        del pending[spec]
                        running.pop(spec, None)
                        bar.update(1)
                        bar.set_postfix_str(f"{spec} {rec['status']}", refresh=False)
                now = time.time()
                stale = [s for s, t in running.items() if now - t > timeout + 60]
                if stale:
                    hung = stale[0]
                    rec = {
                        "arch": hung,
                        "family": family(hung),
                        "status": "error",
                        "error": f"worker: hung or died (no result after {timeout + 60} s)",
                    }
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    bar.update(1)
                    break
                time.sleep(0.2)
        pool.terminate()
        pool.join()
        todo = list(pending) if hung is None else [s for s in pending if s != hung]
        if hung is None:
            break
    bar.close()


# --- docs -------------------------------------------------------------------------------------


def pattern_of(owner: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", owner)


def justify(arch: str, owner: str, table: list | None = None) -> str | None:
    for arch_re, owner_re, reason in JUSTIFICATIONS if table is None else table:
        if re.search(arch_re, arch) and re.search(owner_re, owner):
            return reason
    return None


def _n(x: Any) -> int:
    return x if isinstance(x, int) else 0


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "—"


ORACLE = ("full", "missing", "hidden")


def _lib(r: dict[str, Any]) -> int:
    return (
        r.get("hidden_modules", r.get("library_modules", 0))
        if r["oracle"] == "hidden"
        else r["library"]
    )


def _found(r: dict[str, Any]) -> int:
    return 0 if r["oracle"] == "hidden" else r["library"] - len(r["missing"])


def write_docs(results: Path, equiv: Path, docs: Path = DOCS, all_specs: list[str] | None = None):
    recs = sorted(read_results(results), key=lambda r: r["arch"])
    docs.mkdir(parents=True, exist_ok=True)
    cols = [
        "arch", "family", "status", "params_m", "sites", "blocks", "owners", "reused", "stages",
        "dropblock", "lint", "oracle", "library", "missing", "extra", "skipped", "seconds", "error",
    ]  # fmt: skip
    with (docs / "coverage.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in recs:
            row = []
            for c in cols:
                v = r.get(c, "")
                if c in ("missing", "extra"):
                    v = " ".join(v) if v else ""
                elif c == "skipped":
                    v = " | ".join(f"{s['module']}: {s['reason']}" for s in v) if v else ""
                row.append("" if v is None else v)
            w.writerow(row)

    total = len(recs)
    status = Counter(r["status"] for r in recs)
    oracle = [r for r in recs if r.get("oracle") in ORACLE]
    full = [r for r in oracle if r["oracle"] == "full"]
    lines = [
        "# Coverage: every model in the zoos",
        "",
        "Generated by `python tools/zoo.py --docs` from the sweep's results "
        f"(`{results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}`); "
        "do not edit by hand. Per-architecture rows: [coverage.csv](coverage.csv).",
        "",
        "Each architecture is built on the meta device (random structure, no weights) and run "
        "through the trace, `retrofit.plan` with `stochastic_depth`, the stage analysis + a "
        "`dropblock` plan on its last two conv stages, and `retrofit.lint`. The **oracle** is the "
        "library's own drop-path placement: the model built with `drop_path_rate=0.1` (timm) / "
        "`stochastic_depth_prob=0.1` (torchvision), traced, every drop-path module feeding an "
        "add (`tools/oracle.py: library_drop_path_owners`); its owning modules are compared "
        "with the owners of retrofit's sites on the model built without a rate.",
        "",
        "## Totals",
        "",
    ]
    if all_specs is not None and len(all_specs) != total:
        lines += [
            f"**Swept {total} of {len(all_specs)} architectures** "
            f"({len(all_specs) - total} not run).",
            "",
        ]
    tv = sum(r["arch"].startswith("tv:") for r in recs)
    lines += [
        "| | count |",
        "|---|---:|",
        f"| architectures swept | {total} (torchvision {tv}, timm {total - tv}) |",
        f"| ok (whole model traced) | {status['ok']} |",
        f"| partial (hierarchical fallback; skipped modules reported) | {status['partial']} |",
        f"| error | {status['error']} |",
        f"| ok/partial, but a later step failed (stages, DropBlock plan, lint or oracle; "
        f"listed below) | {sum(bool(r.get('step_errors')) for r in recs)} |",
        f"| with residual sites | {sum(_n(r.get('sites')) > 0 for r in recs)} |",
        f"| residual sites in all | {sum(_n(r.get('sites')) for r in recs)} |",
        f"| with conv stages (DropBlock planned) | "
        f"{sum(isinstance(r.get('stages'), int) for r in recs)} |",
        f"| with lint findings | {sum(_n(r.get('lint')) > 0 for r in recs)} |",
        f"| oracle available (library applies drop path on adds) | {len(oracle)} |",
        f"| oracle: rate not accepted by the builder | "
        f"{sum(r.get('oracle') == 'n/a' for r in recs)} |",
        f"| oracle: built with a rate, no drop path on an add | "
        f"{sum(r.get('oracle') == 'none' for r in recs)} |",
        f"| **oracle coverage: every library block found** | **{len(full)} / {len(oracle)} = "
        f"{_pct(len(full), len(oracle))}** |",
        f"| library blocks found / all | {sum(_found(r) for r in oracle)} / "
        f"{sum(_lib(r) for r in oracle)} |",
        f"| oracle hidden: library drop path inside a module fx does not trace | "
        f"{sum(r['oracle'] == 'hidden' for r in oracle)} |",
        f"| architectures with extra sites (justified below) | "
        f"{sum(bool(r.get('extra')) for r in oracle)} |",
        f"| sweep time (sum of per-arch seconds) | "
        f"{sum(r.get('seconds', 0) or 0 for r in recs) / 60:.1f} min |",
        "",
        "## Per family",
        "",
        "| family | archs | ok | partial | error | sites | stages | lint | oracle | full | "
        "missing | extra |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        fams[r.get("family") or "?"].append(r)
    for fam in sorted(fams):
        rs = fams[fam]
        c = Counter(r["status"] for r in rs)
        orc = [r for r in rs if r.get("oracle") in ORACLE]
        lines.append(
            f"| {fam} | {len(rs)} | {c['ok']} | {c['partial']} | {c['error']} | "
            f"{sum(_n(r.get('sites')) for r in rs)} | "
            f"{sum(isinstance(r.get('stages'), int) for r in rs)} | "
            f"{sum(_n(r.get('lint')) > 0 for r in rs)} | {len(orc)} | "
            f"{sum(r['oracle'] == 'full' for r in orc)} | "
            f"{sum(r['oracle'] != 'full' for r in orc)} | "
            f"{sum(bool(r.get('extra')) for r in orc)} |"
        )

    lines += ["", "## Exceptions", "", "### Errors", ""]
    errs = [r for r in recs if r["status"] == "error"]
    lines += [f"- `{r['arch']}` — {r['error']}" for r in errs] or ["None."]
    lines += [
        "",
        "### Analysis steps that failed (the model's stochastic-depth plan stands)",
        "",
        "Each line gives the step and its error: the stage analysis reads the model's forward "
        "as one graph, or part by part when it cannot be one (then DropBlock goes on stage "
        "outputs only), DropBlock needs the stage's caller to re-trace on its own, and some "
        "models need a specific input size (torchvision's Inception-v3 aux head at the 224² "
        "probe).",
        "",
    ]
    steps = [r for r in recs if r.get("step_errors")]
    lines += [
        f"- `{r['arch']}` — " + "; ".join(f"{k}: {v}" for k, v in sorted(r["step_errors"].items()))
        for r in steps
    ] or ["None."]
    lines += [
        "",
        "### Partial: modules that could not be read, symbolically or on their recorded call "
        "(their children were instrumented)",
        "",
    ]
    part = [r for r in recs if r["status"] == "partial"]
    for r in part:
        sk = r["skipped"]
        first = f"`{sk[0]['module']}`: {sk[0]['reason']}"
        more = f" (+{len(sk) - 1} more)" if len(sk) > 1 else ""
        lines.append(f"- `{r['arch']}` ({r['sites']} sites) — {first}{more}{note_for(r['arch'])}")
    if not part:
        lines.append("None.")
    lines += ["", "### Architectures where a library drop-path block is not found", ""]
    miss = [r for r in oracle if r["oracle"] == "missing"]
    lines += [
        f"- `{r['arch']}`: {len(r['missing'])} of {r['library']} missing: "
        + ", ".join(f"`{m}`" for m in r["missing"][:8])
        + (" …" if len(r["missing"]) > 8 else "")
        + note_for(r["arch"])
        for r in miss
    ] or ["None."]
    hidden = [r for r in oracle if r["oracle"] == "hidden"]
    if hidden:
        lines += [
            "",
            "The library builds drop path with a non-zero rate in blocks that no traced graph "
            "shows: inside a module fx keeps as a leaf (timm's no-trace registry, e.g. NFNet's "
            "`NormFreeBlock`, registered because its in-place `mul_` breaks fx), or under no "
            "traced part at all (a gap in the hierarchical fallback: Gemma-4's `nn.ModuleList` "
            "of blocks, see the partial list above). Neither the oracle nor retrofit sees an add "
            "there, and retrofit finds none of these blocks. "
            "Counted as not covered above.",
            "",
        ]
        lines += [
            f"- `{r['arch']}`: {r.get('hidden_modules')} drop-path modules inside fx leaves, "
            f"{r.get('sites', 0)} sites found"
            for r in hidden
        ]

    # extra sites grouped by (family, owner pattern, reason): each arch's owner judged on its own
    groups: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    for r in oracle:
        for owner in r.get("extra") or []:
            wrong = justify(r["arch"], owner, FALSE_POSITIVES)
            reason = justify(r["arch"], owner)
            kind = "false" if wrong else ("ok" if reason else "none")
            groups[(r["family"], pattern_of(owner), kind, wrong or reason or "")].append(r["arch"])
    justified, false_pos, unjustified = [], [], []
    for (fam, pat, kind, reason), archs in sorted(groups.items()):
        row = (fam, pat, sorted(set(archs)), reason or None)
        {"ok": justified, "false": false_pos, "none": unjustified}[kind].append(row)

    def _fmt(rows):
        out = []
        for fam, pat, archs, reason in rows:
            names = ", ".join(f"`{a}`" for a in archs[:6]) + (" …" if len(archs) > 6 else "")
            out.append(f"- **{fam}** `{pat}` — {len(archs)} archs ({names})")
            if reason:
                out.append(f"  - {reason}")
        return out

    lines += [
        "",
        "### Extra sites, justified",
        "",
        "Residual blocks retrofit finds where the library applies no drop path (owner pattern, "
        "indices as `*`). The reasons are `tools/zoo.py`'s `JUSTIFICATIONS` table, written from "
        "the models' code.",
        "",
    ]
    lines += _fmt(justified) or ["None."]
    lines += [
        "",
        "### Extra sites that are not residual blocks (retrofit false positives)",
        "",
        "Matched by `tools/zoo.py`'s `FALSE_POSITIVES` table: known wrong sites, reported to "
        "the residual analysis, listed here rather than hidden.",
        "",
    ]
    lines += _fmt(false_pos) or ["None."]
    lines += ["", "### Extra sites, unjustified", ""]
    lines += _fmt(unjustified) or ["None."]

    lines += ["", "## Equivalence on real tensors", ""]
    eq = sorted(read_results(equiv), key=lambda r: r["arch"])
    if not eq:
        lines.append("Not run (`python tools/zoo.py --equivalence`).")
    else:
        ok = [r for r in eq if r["status"] == "ok"]
        worst = max((r["max_abs_diff"] for r in ok), default=0.0)
        lines += [
            "A stratified sample (the smallest one or two architectures of each family with "
            "residual sites), built on the CPU with random weights, eval mode, batch of 2 at a "
            "small input size where the model accepts one: output of the original vs the model "
            "after `retrofit.apply(model, {'stochastic_depth': {}})` (which verifies itself).",
            "",
            f"**{len(ok)} / {len(eq)} match** across {len({r['family'] for r in eq})} families; "
            f"largest max |diff| = {worst:.3g}.",
            "",
        ]
        with_sites = {
            r["family"] for r in recs if r["status"] in ("ok", "partial") and _n(r.get("sites")) > 0
        }
        unsampled = sorted(with_sites - {r["family"] for r in eq})
        if unsampled:
            lines += [
                "Families with sites but not in the sample (every architecture with sites is "
                f"above the {EQUIV_MAX_PARAMS_M:.0f} M-parameter cap): "
                + ", ".join(f"`{f}`" for f in unsampled)
                + ".",
                "",
            ]
        lines += [
            "| arch | family | input | gates | max abs diff | status | s |",
            "|---|---|---|---:|---:|---|---:|",
        ]
        for r in eq:
            diff = f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else ""
            st = r["status"] if r["status"] == "ok" else f"error: {r.get('error', '')}"
            shape = "×".join(map(str, r.get("input", []))) or ""
            lines.append(
                f"| `{r['arch']}` | {r['family']} | {shape} | {r.get('gates', '')} | {diff} | "
                f"{st} | {r['seconds']} |"
            )
    # tools/task_zoo.py owns the detection/segmentation section, tools/sweep_new.py the
    # libraries outside the zoos: kept as they were.
    previous = (docs / "coverage.md").read_text() if (docs / "coverage.md").exists() else ""
    for owner in ("task_zoo", "sweep_new"):
        start, end = f"<!-- {owner}:start -->", f"<!-- {owner}:end -->"
        if start in previous and end in previous:
            kept = previous[previous.index(start) : previous.index(end) + len(end)]
            lines += ["", kept]
    (docs / "coverage.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {docs / 'coverage.md'} and {docs / 'coverage.csv'} ({total} archs)")


EQUIV_MAX_PARAMS_M = 100.0


def equivalence_sample(
    results: Path, per_family: int = 2, max_params_m: float = EQUIV_MAX_PARAMS_M
) -> list[str]:
    """The smallest ``per_family`` architectures of each family that have sites."""
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in read_results(results):
        usable = r["status"] in ("ok", "partial") and _n(r.get("sites")) > 0
        if usable and (r.get("params_m") or 0) <= max_params_m:
            fams[r["family"]].append(r)
    out = []
    for fam in sorted(fams):
        rs = sorted(fams[fam], key=lambda r: (r.get("params_m") or 0, r["arch"]))
        out += [r["arch"] for r in rs[:per_family]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--limit", type=int, default=None, help="run at most this many archs")
    ap.add_argument("--filter", default=None, help="regex on 'tv:NAME' / 'timm:NAME'")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per architecture")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--equiv-results", type=Path, default=DEFAULT_EQUIV)
    ap.add_argument("--equivalence", action="store_true", help="the real-tensor equivalence run")
    ap.add_argument("--per-family", type=int, default=2)
    ap.add_argument("--docs", action="store_true", help="only regenerate docs/coverage.*")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs after running")
    args = ap.parse_args(argv)

    specs = all_architectures()
    if args.docs:
        write_docs(args.results, args.equiv_results, all_specs=specs)
        return 0
    if args.equivalence:
        todo = equivalence_sample(args.results, args.per_family)
        path = args.equiv_results
        mode = "equivalence"
    else:
        todo, path, mode = specs, args.results, "sweep"
    if args.filter:
        todo = [s for s in todo if re.search(args.filter, s)]
    done = done_archs(path)
    todo = [s for s in todo if s not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    print(f"{mode}: {len(todo)} to run, {len(done)} already in {path}", file=sys.stderr)
    if todo:
        run_pool(mode, todo, path, args.jobs, args.timeout)
    if not args.no_docs:
        write_docs(args.results, args.equiv_results, all_specs=specs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
