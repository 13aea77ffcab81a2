"""The CIFAR ResNets of He et al. 2016 and Huang et al. 2016, written as a user would write them.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Section 4.2:
a 3×3 convolution with 16 filters, then three stages of ``n`` BasicBlocks with 16, 32 and 64
filters on 32×32, 16×16 and 8×8 maps (the first block of stages 2 and 3 subsamples with a
stride-2 convolution), global average pooling and a fully connected classifier: 6n + 2 layers,
so ResNet-20/32/44/56/110 for n = 3/5/7/9/18. A BasicBlock is
``ReLU(BN(conv3×3(ReLU(BN(conv3×3(x))))) + shortcut(x))`` (their Figure 2, left).

Huang, Sun, Liu, Sedra & Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016, train
this ResNet-110 (54 residual blocks) with the survival rule p_l = 1 − (l/L)(1 − p_L), p_L = 0.5,
and report 6.41% → 5.25% test error on CIFAR-10.

Shortcuts. ``shortcut="A"`` (default) is He et al.'s option A, the one both papers use on
CIFAR: where a block changes the shape, the shortcut subsamples (every second pixel) and pads the
new channels with zeros. It has no parameters, so a block's shortcut is the identity up to shape
and the whole learned map of the block is its branch — what stochastic depth drops: a dropped
transition block leaves the subsampled, zero-padded input. ``shortcut="B"`` is option B (a
strided 1×1 convolution + BN where the shape changes: torchvision's ResNets); both are residual
sites for ``retrofit`` (a projection shortcut is one learned map).

Nothing here knows about retrofit: no drop-path slots, no hooks. The models are retrofitted from
outside, e.g. ``retrofit-cli --model examples.cifar_resnet:resnet110 --recipe recipes/sd.yaml``
(run from the repository root; the ``package.module:factory`` name form).

``drop_rate`` puts a plain ``nn.Dropout`` before the classifier: the regularizer a user reaches
for without retrofit (the "plain dropout" baseline of ``docs/results.md``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

Shortcut = Literal["A", "B"]

# CIFAR-10 per-channel statistics of the training set: the normalisation the trainer applies to
# data for this model (read from ``pretrained_cfg`` like a timm model's).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PadShortcut(nn.Module):
    """Option A: ``x`` subsampled by ``stride`` with ``extra`` zero channels appended."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # (W, H, C) pads: zeros after the channels

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra={self.extra}"


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a shortcut (He et al. 2016, Figure 2 left)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(stride, planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 images: stem, three stages of ``n`` BasicBlocks, pool, classifier."""

    def __init__(
        self,
        n: int,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: Shortcut = "A",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (blocks per stage) must be an integer >= 1, got {n!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(
                f"shortcut must be 'A' (zero padding) or 'B' (projection), got {shortcut!r}"
            )
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(64, num_classes)
        # He et al.'s initialisation ("Delving deep into rectifiers", 2015) for the convolutions.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        three = in_chans == 3
        # Read by the trainer (timm's data config): input size and the normalisation to apply.
        self.pretrained_cfg = {
            "input_size": (in_chans, 32, 32),
            "mean": CIFAR10_MEAN if three else (0.5,) * in_chans,
            "std": CIFAR10_STD if three else (0.25,) * in_chans,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.dropout(x))


def _factory(n: int):
    def build(
        num_classes: int = 10, in_chans: int = 3, shortcut: Shortcut = "A", drop_rate: float = 0.0
    ) -> CifarResNet:
        return CifarResNet(n, num_classes, in_chans, shortcut, drop_rate)

    build.__name__ = f"resnet{6 * n + 2}"
    build.__doc__ = f"ResNet-{6 * n + 2}: {n} BasicBlocks per stage, {3 * n} residual blocks."
    return build


resnet20 = _factory(3)
resnet32 = _factory(5)
resnet44 = _factory(7)
resnet56 = _factory(9)
resnet110 = _factory(18)
