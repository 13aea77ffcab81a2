"""Residual recall on libraries outside the zoos (issue 22): MONAI and segmentation_models_pytorch.

Recall = sites ``retrofit.plan`` finds inside residual blocks ÷ residual blocks by construction.
"By construction" is counted from each library's own block classes, read from its code
(``RESIDUALS``: class name → residual adds per instance, with the condition under which the
block adds its input); the sites outside those blocks are reported as extra (a decoder's skip
sums, an FPN's top-down sums). Neither library is a dependency: install them where you like
(``pip install --no-deps --target DIR monai segmentation-models-pytorch``) and put DIR on
PYTHONPATH.

    python tools/sweep_new.py [--json out.jsonl] [--docs docs/coverage.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import retrofit


def _skip_mbconv(m: nn.Module) -> int:
    # MONAI's and smp's EfficientNet MBConv: ``x + inputs`` when id_skip, stride 1, in == out
    if hasattr(m, "_has_drop_connect"):  # smp's port: the same condition, precomputed
        return int(m._has_drop_connect)
    stride = m.stride[0] if isinstance(m.stride, list | tuple) else m.stride
    return int(bool(m.id_skip) and stride == 1 and m.in_channels == m.out_channels)


RESIDUALS: dict[str, Callable[[nn.Module], int]] = {
    # MONAI
    "ResidualUnit": lambda m: 1,  # cx + res (res an Identity when shapes agree)
    "UnetResBlock": lambda m: 1,
    "ResBlock": lambda m: 1,  # SegResNet
    "TransformerBlock": lambda m: 2 + int(bool(getattr(m, "with_cross_attention", False))),
    "SwinTransformerBlock": lambda m: 2,
    "ResNetBlock": lambda m: 1,
    "ResNetBottleneck": lambda m: 1,
    "SEResNetBottleneck": lambda m: 1,
    "SEResNeXtBottleneck": lambda m: 1,
    "SEBottleneck": lambda m: 1,
    "HighResBlock": lambda m: 1,
    "InputTransition": lambda m: 1,  # VNet: bn(conv(x)) + x repeated to 16 channels
    "DownTransition": lambda m: 1,
    "UpTransition": lambda m: 1,
    "MedNeXtBlock": lambda m: int(m.do_res),
    "MedNeXtDownBlock": lambda m: int(m.do_res),
    "MedNeXtUpBlock": lambda m: int(m.do_res),
    "MBConvBlock": _skip_mbconv,
    # smp encoders
    "BasicBlock": lambda m: 1,
    "Bottleneck": lambda m: 1,
    "SEResNetBlock": lambda m: 1,
    "InvertedResidual": lambda m: int(m.use_res_connect),
    "MobileOneBlock": lambda m: int(getattr(m, "rbr_skip", None) is not None),
    "DualPathBlock": lambda m: 1,
    "Block": lambda m: 2 if hasattr(m, "attn") else 1,  # mit Block (attn + MLP), xception Block
}


def by_construction(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Residual adds per block module, of the blocks one forward on ``x`` runs (PSPNet builds
    an encoder of five stages and runs three)."""
    ran: set[str] = set()
    handles = [
        m.register_forward_hook(lambda *_, n=name: ran.add(n))
        for name, m in model.named_modules()
        if type(m).__name__ in RESIDUALS
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in model.named_modules():
        count = RESIDUALS.get(type(m).__name__)
        if count is not None and name in ran and count(m):
            out[name] = count(m)
    return out


def _monai() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    from monai.networks import nets

    d2 = (1, 1, 32, 32)
    d3 = (1, 1, 32, 32, 32)
    return [
        ("monai.ResNet-10 3D", lambda: nets.resnet10(spatial_dims=3, n_input_channels=1), d3),
        ("monai.ResNet-18 2D", lambda: nets.resnet18(spatial_dims=2, n_input_channels=1), d2),
        ("monai.ResNet-50 3D", lambda: nets.resnet50(spatial_dims=3, n_input_channels=1), d3),
        (
            "monai.UNet res_units=2",
            lambda: nets.UNet(2, 1, 2, (8, 16, 32, 64), (2, 2, 2), num_res_units=2),
            d2,
        ),
        (
            "monai.UNet res_units=1 3D",
            lambda: nets.UNet(3, 1, 2, (8, 16, 32), (2, 2), num_res_units=1),
            d3,
        ),
        ("monai.SegResNet", lambda: nets.SegResNet(2, 8, 1, 2), d2),
        ("monai.SegResNet 3D", lambda: nets.SegResNet(3, 8, 1, 2), d3),
        (
            "monai.DynUNet res",
            lambda: nets.DynUNet(2, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], res_block=True),
            d2,
        ),
        (
            "monai.UNETR",
            lambda: nets.UNETR(
                1,
                2,
                (32, 32),
                feature_size=8,
                hidden_size=48,
                mlp_dim=96,
                num_heads=4,
                spatial_dims=2,
            ),
            d2,
        ),
        (
            "monai.SwinUNETR",
            lambda: nets.SwinUNETR(1, 2, feature_size=12, spatial_dims=2),
            (1, 1, 64, 64),  # five 2× reductions
        ),
        (
            "monai.ViT",
            lambda: nets.ViT(
                1,
                (32, 32),
                (8, 8),
                hidden_size=48,
                mlp_dim=96,
                num_layers=4,
                num_heads=4,
                spatial_dims=2,
                classification=True,
            ),
            d2,
        ),
        ("monai.HighResNet", lambda: nets.HighResNet(2, 1, 2), d2),
        ("monai.VNet", lambda: nets.VNet(2, 1, 2), d2),
        (
            "monai.SEResNet50",
            lambda: nets.SEResNet50(spatial_dims=2, in_channels=1, num_classes=2),
            (1, 1, 64, 64),
        ),
        (
            "monai.EfficientNetBN-b0",
            lambda: nets.EfficientNetBN(
                "efficientnet-b0", spatial_dims=2, in_channels=1, num_classes=2, pretrained=False
            ),
            d2,
        ),
        (
            "monai.MedNeXt-S",
            lambda: nets.MedNeXt(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8),
            d2,
        ),
        ("monai.DenseNet121 (no residual)", lambda: nets.DenseNet121(2, 1, 2), (1, 1, 64, 64)),
        ("monai.BasicUNet (no residual)", lambda: nets.BasicUNet(2, 1, 2), d2),
    ]


def _smp() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    import segmentation_models_pytorch as smp

    x = (1, 3, 64, 64)
    out = []
    for enc in (
        "resnet18",
        "resnet50",
        "resnext50_32x4d",
        "se_resnet50",
        "efficientnet-b0",
        "mobilenet_v2",
        "mit_b0",
        "dpn68",
        "mobileone_s0",
        "xception",
    ):
        out.append((f"smp.Unet({enc})", lambda e=enc: smp.Unet(e, encoder_weights=None), x))
    for arch in ("FPN", "Linknet", "DeepLabV3Plus", "PAN", "MAnet", "UPerNet", "PSPNet"):
        out.append(
            (
                f"smp.{arch}(resnet18)",
                lambda a=arch: getattr(smp, a)("resnet18", encoder_weights=None),
                (1, 3, 128, 128) if arch == "PAN" else x,  # PAN pools its 1/32 map by 8
            )
        )
    return out


def sweep_one(label: str, build: Callable[[], nn.Module], shape: tuple[int, ...]) -> dict:
    rec: dict[str, Any] = {"model": label}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(*shape)
        expected = by_construction(model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = retrofit.plan(model, {"stochastic_depth": {}}, example_input=x)
        owners: dict[str, int] = {}
        for e in plan.by_kind("stochastic_depth"):
            owners[e.module] = owners.get(e.module, 0) + 1
        found = sum(min(n, owners.get(b, 0)) for b, n in expected.items())
        rec.update(
            blocks=sum(expected.values()),
            found=found,
            sites=sum(owners.values()),
            missed=sorted(b for b, n in expected.items() if owners.get(b, 0) < n),
            extra=sorted(o for o in owners if o not in expected),
            skipped=[s.module for s in plan.skipped],
            status="ok",
        )
    except Exception as exc:  # a refusal or a crash: reported, the sweep goes on
        rec.update(status=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rec["trace"] = traceback.format_exc(limit=3)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


START, END = "<!-- sweep_new:start -->", "<!-- sweep_new:end -->"

# Per-model notes (a substring of the label → why its recall is what it is); none open now.
# smp's MobileOne port (identity BN added first, then each parallel conv-BN) was one until the
# residual analysis read such sums as a whole (retrofit/analysis/sums.py).
NOTES: dict[str, str] = {}


def _versions() -> str:
    out = [f"torch {torch.__version__}"]
    for name in ("monai", "segmentation_models_pytorch"):
        with contextlib.suppress(ImportError):  # a library not installed is not swept
            out.append(f"{name} {__import__(name).__version__}")
    return ", ".join(out)


def write_docs(records: list[dict], path: str) -> None:
    """The per-library recall section of ``docs/coverage.md`` (between the sweep_new markers)."""
    by_lib: dict[str, list[dict]] = {}
    for r in records:
        by_lib.setdefault(r["model"].split(".")[0], []).append(r)
    lines = [
        START,
        "## Libraries outside the zoos (`tools/sweep_new.py`)",
        "",
        "Recall = sites found inside residual blocks ÷ residual blocks by construction, counted "
        "from each library's own block classes (`RESIDUALS` in the tool) over the blocks one "
        "forward runs; random weights, `retrofit.plan` at the listed input. `extra`: sites "
        "outside those blocks: the decoders' skip sums (`up(x) + lateral(skip)`: the 1×1 "
        "lateral reads as a projection shortcut around the upsampled deeper path, as "
        "`tests/wild_models.py`'s NestedBranchNet pins for `up(h) + skip`).",
        "",
        f"Versions: {_versions()}.",
        "",
        "| library | models | blocks | found | recall | zero-site models with blocks | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for lib, rs in sorted(by_lib.items()):
        ok = [r for r in rs if r.get("status") == "ok"]
        blocks = sum(r["blocks"] for r in ok)
        found = sum(r["found"] for r in ok)
        zero = sum(1 for r in ok if r["blocks"] and not r["found"])
        rate = f"{100 * found / blocks:.1f}%" if blocks else "n/a"
        lines.append(
            f"| {lib} | {len(rs)} | {blocks} | {found} | {rate} | {zero} | {len(rs) - len(ok)} |"
        )
    lines += [
        "",
        "| model | blocks | found | sites | extra owners | note |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in records:
        note = next((n for k, n in NOTES.items() if k in r["model"]), "")
        if r.get("status") != "ok":
            lines.append(f"| `{r['model']}` | | | | | {r['status']} |")
            continue
        extra = ", ".join(f"`{o or '<root>'}`" for o in r["extra"])
        lines.append(
            f"| `{r['model']}` | {r['blocks']} | {r['found']} | {r['sites']} | {extra} | {note} |"
        )
    lines.append(END)
    with open(path) as f:
        text = f.read()
    section = "\n".join(lines)
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="append one JSON line per model here")
    ap.add_argument("--only", choices=("monai", "smp"), default=None)
    ap.add_argument("--docs", default=None, help="write the recall section into this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = []
    if args.only in (None, "monai"):
        cases += _monai()
    if args.only in (None, "smp"):
        cases += _smp()
    records = []
    for label, build, shape in cases:
        rec = sweep_one(label, build, shape)
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if args.docs:
        write_docs(records, args.docs)


if __name__ == "__main__":
    main()
