"""Tiny detection and segmentation models of torchvision's own classes (FasterRCNN, FCN) for
tests that run many processes (torchrun) or many steps: a residual backbone of a few channels,
so stochastic depth finds sites and a step takes milliseconds. ``--model tests.task_models:NAME``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Backbone(nn.Module):
    """Stride 4, ``out_channels`` maps, two residual blocks; returns ``{"0": maps}`` like an FPN
    backbone (FasterRCNN) and ``{"out": maps}`` for FCN through ``key``."""

    def __init__(self, width: int = 8, key: str = "0") -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.layer1 = Block(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.layer2 = Block(2 * width)
        self.out_channels = 2 * width
        self.key = key

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return OrderedDict([(self.key, self.layer2(self.down(self.layer1(self.stem(x)))))])


def tiny_fasterrcnn(num_classes: int = 11, **kwargs) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = Backbone()
    c = backbone.out_channels
    settings = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=100,
                    rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
                    box_detections_per_img=20)  # fmt: skip
    settings.update(kwargs)
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=AnchorGenerator(
            sizes=((8, 16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)
        ),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(c * 49, 32),
        box_predictor=FastRCNNPredictor(32, num_classes),
        **settings,
    )


def tiny_fcn(num_classes: int = 11) -> nn.Module:
    from torchvision.models.segmentation import FCN
    from torchvision.models.segmentation.fcn import FCNHead

    backbone = Backbone(key="out")
    return FCN(backbone, FCNHead(backbone.out_channels, num_classes))


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )  # fmt: skip


class TinyUNet(nn.Module):
    """A U-Net written by hand (Ronneberger et al. 2015, "U-Net: Convolutional Networks for
    Biomedical Image Segmentation"), three poolings deep: encoder ``enc1``-``enc3`` and
    ``bottleneck`` at reductions 1, 2, 4, 8, a decoder that upsamples (transposed convs) and
    concatenates each encoder map (the skips), per-pixel logits of the input size."""

    def __init__(self, num_classes: int = 11, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2 = _double_conv(3, w), _double_conv(w, 2 * w)
        self.enc3, self.bottleneck = _double_conv(2 * w, 4 * w), _double_conv(4 * w, 8 * w)
        self.up3, self.dec3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, 2), _double_conv(8 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), _double_conv(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, 2), _double_conv(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottleneck(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], dim=1)))
