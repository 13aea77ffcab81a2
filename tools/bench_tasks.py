"""Detection and segmentation in the trainer against a minimal hand-written torchvision step,
and the evaluation pass against an epoch, on the embedded digits canvases, in one run.

    python tools/bench_tasks.py                          # CPU, default sizes below
    python tools/bench_tasks.py --device cuda --side 256 --batch-size 16
    python tools/bench_tasks.py --json
    python tools/bench_tasks.py --recipe recipes/dropblock.yaml   # both sides retrofitted alike

Throughput: the peer is the loop torchvision's references boil down to — detection:
``loss = sum(model(images, targets).values())``; segmentation: cross-entropy on ``out`` plus 0.5 ×
on ``aux`` (ignore 255) — then backward, timm's AdamW step and the trainer's lr schedule (timm's,
per update), zero_grad, over the same batches cut from the same tensors (the trainer's own
in-memory batches) with the same model architecture and initial weights. Like with like:
without ``--recipe`` neither side is retrofitted (the trainer's ``apply`` with no recipe edits
nothing); with it the peer gets the same edits from the public API
(``retrofit.apply`` with the trainer's probe size, ``retrofit.schedule.update`` before each step,
as a hand-written loop using retrofit would), so the ratio is the trainer's own cost in both cases.
Both sides are clocked alike: at each epoch's start and at each step's end (the trainer's through
its ``Console``, at the log record ``log_every: 1`` makes after every step, so its per-step
logging is in its figure). Epoch figures are over every epoch after the first (a warm-up).
Trainer and peer alternate ``--rounds`` times, each going first in every other round, and the
medians are compared: of the epochs' images/s, and of the steps' seconds (hundreds of samples a
side: a neighbour's burst of load lands on a few steps, where it moves a whole epoch's figure).

On a CPU each figure is also given by CPU time (``time.process_time``): with one thread this is
the work each side does, which a neighbour's load on a shared machine changes far less than it
changes wall-clock time (minutes-long blocks of a busy machine move the wall ratio by ±20%; the
operator profile of the two steps is identical).

Evaluation: the trainer's ``eval_time`` (the whole pass: forward over the validation canvases,
then COCO mAP through torchmetrics / faster-coco-eval, or mIoU) ÷ its ``epoch_time``, with the
embedded data's split ratio (``--train`` / ``--val`` canvases; 480 / 60 by default, the
``--data digits`` default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import retrofit  # noqa: E402
from retrofit.finetune_config import TrainConfig  # noqa: E402
from retrofit.train import fit  # noqa: E402
from retrofit.train.console import Console  # noqa: E402
from retrofit.train.prepare import example_input  # noqa: E402
from retrofit.train.tasks import get_task  # noqa: E402

MODELS = {"detection": "fasterrcnn_resnet50_fpn", "segmentation": "lraspp_mobilenet_v3_large"}


def build(task: str, name: str, side: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    kw = {"weights_backbone": None, "num_classes": 11}
    if task == "detection":
        kw |= {"min_size": side, "max_size": side}
    return torchvision.models.get_model(name, weights=None, **kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock(Console):
    """The trainer's console, quiet, noting both clocks when an epoch's training starts (its bar
    is asked for) and at each step's log record (``log_every`` 1): per-step times, read the
    same way as the peer's."""

    def __init__(self) -> None:
        super().__init__("log", progress=False)
        self.epochs: list[list[tuple[float, float]]] = []

    def epoch_bar(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        self.epochs.append([(time.perf_counter(), time.process_time())])

    def step(self, rec, bar, *, epochs: int, total_steps: int) -> None:
        self.epochs[-1].append((time.perf_counter(), time.process_time()))


class Timing(NamedTuple):
    """One side's figures over the epochs after the first: images/s and CPU s/image of each
    epoch, and each step's wall and CPU seconds."""

    rates: list[float]
    cpu: list[float]
    step_wall: list[float]
    step_cpu: list[float]


def _timing(epochs: list[list[tuple[float, float]]], images: int) -> Timing:
    """From each epoch's clock marks (its start, then one per step): skip the first epoch."""
    t = Timing([], [], [], [])
    for marks in epochs[1:]:
        (w0, c0), (w1, c1) = marks[0], marks[-1]
        t.rates.append(images / (w1 - w0))
        t.cpu.append((c1 - c0) / images)
        t.step_wall.extend(b[0] - a[0] for a, b in itertools.pairwise(marks))
        t.step_cpu.extend(b[1] - a[1] for a, b in itertools.pairwise(marks))
    return t


def trainer(
    task: str, name: str, args, cfg: TrainConfig, device: torch.device
) -> tuple[Timing, list[float]]:
    """The trainer's timing, and eval_time / epoch_time of every epoch."""
    data = f"digits:side={args.side}:train={args.train}:val={args.val}"
    clock = _Clock()
    res = fit(build(task, name, args.side), args.recipe, data, out=None, device=device,
              config=cfg, task=task, report=clock)  # fmt: skip
    epochs = [r for r in res.history if r["kind"] == "epoch"]
    images = res.step // cfg.epochs * cfg.batch_size
    return _timing(clock.epochs, images), [r["eval_time"] / r["epoch_time"] for r in epochs]


def _peer_step(task: str, model: torch.nn.Module, x, y, device: torch.device) -> torch.Tensor:
    if task == "detection":
        x = x.to(device)
        y = [{k: v.to(device) for k, v in d.items()} for d in y]
        return sum(model(x, y).values())
    x, y = x.to(device), y.to(device)
    out = model(x)
    loss = F.cross_entropy(out["out"], y, ignore_index=255)
    if "aux" in out:
        loss = loss + 0.5 * F.cross_entropy(out["aux"], y, ignore_index=255)
    return loss


def peer(task: str, name: str, args, cfg: TrainConfig, device: torch.device) -> Timing:
    """The hand-written loop's timing, clocked where the trainer's is: each epoch's start and
    each step's end (after its loss is read, as the trainer's log record reads it)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    t = get_task(task)
    model = build(task, name, args.side).to(device)
    data = f"digits:side={args.side}:train={args.train}:val={args.val}"
    bundle = t.build_data(data, model, cfg, device=device)
    bundle.train.place(device, 2 << 30)
    if args.recipe is not None:
        retrofit.apply(model, args.recipe, example_input=example_input(bundle.input_size, device))
    model.train()
    progressive = retrofit.schedule.progressive_modules(model)
    opt = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = args.train // cfg.batch_size
    total = cfg.epochs * per_epoch
    # The trainer's lr schedule too (timm's, per update): a detector's step costs what its
    # weights make it cost (the RPN's proposals, NMS), so both sides' weights must move alike.
    sched, _ = create_scheduler_v2(opt, sched=cfg.sched, num_epochs=cfg.epochs,
                                   warmup_epochs=cfg.resolved_warmup_epochs, warmup_lr=cfg.warmup_lr,
                                   min_lr=cfg.min_lr, step_on_epochs=False,
                                   updates_per_epoch=per_epoch)  # fmt: skip
    epochs, step, images = [], 0, 0
    for epoch in range(cfg.epochs):
        sync(device)
        marks, images = [(time.perf_counter(), time.process_time())], 0
        for x, y in bundle.train.iter_epoch(epoch):
            retrofit.schedule.update_modules(progressive, step / total)
            step += 1
            loss = _peer_step(task, model, x, y, device)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step_update(num_updates=step)
            images += len(x)
            loss.item()
            marks.append((time.perf_counter(), time.process_time()))
        epochs.append(marks)
    return _timing(epochs, images)


def _compare(task: str, name: str, args, cfg: TrainConfig, device: torch.device) -> dict:
    ours: list[Timing] = []
    theirs: list[Timing] = []
    eval_frac: list[float] = []
    for i in range(args.rounds):
        # Each side goes first in every other round: a drift in the machine's load (or a
        # warmer allocator) favours neither.
        for side in ("trainer", "peer") if i % 2 == 0 else ("peer", "trainer"):
            if side == "trainer":
                timing, frac = trainer(task, name, args, cfg, device)
                ours.append(timing)
                eval_frac += frac
            else:
                theirs.append(peer(task, name, args, cfg, device))

    def median(timings: list[Timing], field: str) -> float:
        return statistics.median(v for t in timings for v in getattr(t, field))

    return {
        "trainer_img_s": median(ours, "rates"),
        "peer_img_s": median(theirs, "rates"),
        "ratio": median(ours, "rates") / median(theirs, "rates"),
        "trainer_cpu_s_per_img": median(ours, "cpu"),
        "peer_cpu_s_per_img": median(theirs, "cpu"),
        # Throughput ratio by CPU work: peer's CPU seconds per image / the trainer's.
        "cpu_ratio": median(theirs, "cpu") / median(ours, "cpu"),
        # The same by the median step (hundreds of samples a side): a neighbour's burst of load
        # lands on a few steps, where it moves a whole epoch's figure.
        "trainer_step_ms": 1e3 * median(ours, "step_wall"),
        "peer_step_ms": 1e3 * median(theirs, "step_wall"),
        "step_ratio": median(theirs, "step_wall") / median(ours, "step_wall"),
        "step_cpu_ratio": median(theirs, "step_cpu") / median(ours, "step_cpu"),
        "eval_over_epoch": statistics.median(eval_frac),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--train", type=int, default=480, help="training canvases")
    p.add_argument("--val", type=int, default=60, help="validation canvases")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3, help="per round (the first is a warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--recipe", default=None, help="a recipe both sides apply (model edits only)")
    p.add_argument(
        "--train-detection",
        type=int,
        default=None,
        help="detection's training canvases (default: --train); a Faster R-CNN step "
        "costs ~60 segmentation steps on a CPU, and short epochs let fixed costs weigh",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.recipe is not None and retrofit.load_recipe(args.recipe).cutout is not None:
        p.error("--recipe: Cutout acts on the batch, which the hand-written peer does not mirror")
    device = torch.device(args.device)
    results = {}
    for task in args.tasks:
        name = MODELS[task]
        train = args.train_detection if task == "detection" and args.train_detection else args.train
        task_args = argparse.Namespace(**{**vars(args), "train": train})
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-4,
                          log_every=1, workers=0, warmup_epochs=0)  # fmt: skip
        results[task] = {"model": name, "train_canvases": train,
                         **_compare(task, name, task_args, cfg, device)}  # fmt: skip
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "argv": sys.argv[1:], **vars(args)}  # fmt: skip
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print(f"# {device}, {torch.get_num_threads()} thread(s), {args.side}px canvases, batch "
          f"{args.batch_size}, {args.val} val canvases, {args.rounds} round(s), "
          f"recipe {args.recipe or 'none'}")  # fmt: skip
    for task, r in results.items():
        cpu = f", by CPU time {r['cpu_ratio']:.3f}x" if device.type == "cpu" else ""
        step_cpu = f", by CPU time {r['step_cpu_ratio']:.3f}x" if device.type == "cpu" else ""
        print(f"{task:12s} {r['model']:28s} trainer {r['trainer_img_s']:8.1f} img/s, hand-written "
              f"{r['peer_img_s']:8.1f} img/s: epochs {r['ratio']:.3f}x{cpu}; median step "
              f"{r['trainer_step_ms']:.1f} vs {r['peer_step_ms']:.1f} ms: {r['step_ratio']:.3f}x"
              f"{step_cpu}; {r['train_canvases']} train canvases, eval / epoch "
              f"{100 * r['eval_over_epoch']:.1f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
