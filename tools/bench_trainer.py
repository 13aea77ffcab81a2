"""Trainer throughput against a minimal hand-written loop, same model, same in-memory data.

    python tools/bench_trainer.py                      # CPU: resnet18 at 64 px, fp32
    python tools/bench_trainer.py --device cuda        # GPU: resnet50 at 224 px, AMP + channels_last
    python tools/bench_trainer.py --json               # machine-readable

The peer is the loop everyone writes first: forward, label-smoothed cross-entropy, backward, timm's
AdamW step, zero_grad; on CUDA under the same autocast dtype and memory format the trainer picks.
Both cut batches from the same tensors (``build_data("synthetic:N")``, on the GPU when the device
is CUDA) and use the same optimizer, so what differs is what the trainer does per step: the
regularizer schedule update, the lr schedule, loss bookkeeping kept on the device, logging,
stop-signal checks. Evaluation, lint and checkpoints happen between timed windows and are not
counted: the trainer's figure is its own ``images_per_s`` over log windows after a warm-up epoch
(one window per epoch, ending after a device sync); the peer times the same epochs the same way,
with the same untimed evaluation pass between them.

Trainer and peer alternate ``--rounds`` times and the median of each is reported, so a neighbour's
load on a shared machine affects both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from retrofit.train import TrainConfig, build_data, fit  # noqa: E402
from retrofit.train.classifier import resize_classifier  # noqa: E402
from retrofit.train.precision import resolve_precision  # noqa: E402


def make_model(name: str) -> nn.Module:
    """torchvision's builder if it has one by that name, else timm's (random weights)."""
    import torchvision

    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)()
    import timm

    return timm.create_model(name, pretrained=False)


def trainer_images_per_s(args, bundle, cfg: TrainConfig, device: torch.device, recipe) -> float:
    torch.manual_seed(0)
    res = fit(
        make_model(args.model), recipe, bundle, out=None, device=device, progress=False, config=cfg
    )
    windows = [r for r in res.history if r["kind"] == "step" and r["step"] > args.steps_per_epoch]
    images = sum(cfg.log_every * cfg.batch_size for _ in windows)
    seconds = sum(cfg.log_every * cfg.batch_size / r["images_per_s"] for r in windows)
    return images / seconds


def peer_images_per_s(args, bundle, cfg: TrainConfig, device: torch.device, recipe) -> float:
    """The minimal loop: forward, loss, backward, step, zero_grad; an eval pass after each epoch."""
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = make_model(args.model)
    resize_classifier(model, bundle.num_classes)
    model.to(device)
    if recipe is not None:
        import retrofit

        x = torch.randn(2, *bundle.input_size, device=device)
        retrofit.apply(model, recipe, example_input=x)
    precision = resolve_precision(cfg, device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = precision.make_scaler()
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    images, labels = bundle.train.images, bundle.train.labels
    model.train()

    def step(idx: torch.Tensor) -> None:
        x = images.index_select(0, idx).to(device, non_blocking=True)
        y = labels.index_select(0, idx).to(device, non_blocking=True)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            loss = crit(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    # Like the trainer: epoch 1 is warm-up; every epoch ends with an untimed evaluation pass, so
    # both loops pay the same for the first training step after eval (caches, kernel choice).
    b = cfg.batch_size
    seconds, steps = 0.0, 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch)).to(
            images.device
        )
        sync(device)
        t0 = time.perf_counter()
        for i in range(args.steps_per_epoch):
            step(perm[i * b : (i + 1) * b])
        sync(device)
        if epoch > 0:
            seconds += time.perf_counter() - t0
            steps += args.steps_per_epoch
        model.eval()
        with torch.no_grad(), precision.autocast():
            for x, _ in bundle.val.iter_epoch():
                x = x.to(device, non_blocking=True)
                model(
                    x.contiguous(memory_format=torch.channels_last)
                    if precision.channels_last
                    else x
                )
        model.train()
    return steps * b / seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--model", default=None, help="torchvision or timm name (cpu: resnet18, cuda: resnet50)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input side (cpu: 64, cuda: 224)")
    p.add_argument("--batch-size", type=int, default=None, help="cpu: 32, cuda: 256")
    p.add_argument(
        "--steps-per-epoch", type=int, default=None, help="steps per epoch (cpu: 8, cuda: 20)"
    )
    p.add_argument(
        "--epochs", type=int, default=3, help="epochs per run; the first is warm-up (default 3)"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating trainer/peer repetitions (default 3)"
    )
    p.add_argument("--recipe", default=None, help="a recipe applied to both (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.model = args.model or ("resnet50" if cuda else "resnet18")
    args.img_size = args.img_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 32)
    # cuda: 10 × 256 images at 224 px = 1.5 GB, small enough to stay on the GPU (DEVICE_RESIDENT_BYTES)
    args.steps_per_epoch = args.steps_per_epoch or (10 if cuda else 8)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        img_size=args.img_size,
        log_every=args.steps_per_epoch,  # one window per epoch: eval falls between windows
        warmup_epochs=0,
        workers=0,
    )
    recipe = None
    if args.recipe:
        import retrofit

        recipe = retrofit.load_recipe(args.recipe)
    # The same tensors for both: synthetic images at the model's side, on the GPU under CUDA.
    n = args.batch_size * args.steps_per_epoch
    bundle = build_data(f"synthetic:{n}", make_model(args.model), cfg, device=device)
    precision = resolve_precision(cfg, device)

    trainer, peer = [], []
    for _ in range(args.rounds):
        trainer.append(trainer_images_per_s(args, bundle, cfg, device, recipe))
        peer.append(peer_images_per_s(args, bundle, cfg, device, recipe))
    t, b = statistics.median(trainer), statistics.median(peer)
    # Each round's pair ran back to back, so its ratio shares the machine's load of the moment.
    ratios = [a / c for a, c in zip(trainer, peer, strict=True)]
    result = {
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "model": args.model,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "precision": precision.name,
        "channels_last": precision.channels_last,
        "recipe": args.recipe,
        "measured_steps": (args.epochs - 1) * args.steps_per_epoch,
        "rounds": args.rounds,
        "trainer_images_per_s": t,
        "peer_images_per_s": b,
        "ratio": t / b,
        "ratio_per_round": ratios,
        "ratio_median_of_rounds": statistics.median(ratios),
        "trainer_all": trainer,
        "peer_all": peer,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"device     {result['device']}  (1-min load average {result['load_avg_1m']})")
    print(f"model      {args.model} at {args.img_size}px, batch {args.batch_size}, {precision.name}, "
          f"channels_last={precision.channels_last}, recipe={args.recipe}")  # fmt: skip
    print(f"{'loop':<22}{'images/s (median)':>18}{'all rounds':>34}")
    print(
        f"{'retrofit.train.fit':<22}{t:>18.1f}{'  ' + ', '.join(f'{v:.1f}' for v in trainer):>34}"
    )
    print(f"{'hand-written loop':<22}{b:>18.1f}{'  ' + ', '.join(f'{v:.1f}' for v in peer):>34}")
    print(f"ratio trainer / hand-written: {t / b:.3f} of the medians, {statistics.median(ratios):.3f} median of "
          f"the rounds' ratios ({', '.join(f'{r:.3f}' for r in ratios)}); target >= 0.95")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
