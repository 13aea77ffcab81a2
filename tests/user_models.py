"""User model factories for the ``package.module:factory`` name form (tests.user_models:NAME)."""

from __future__ import annotations

from torch import nn


class TinyBlock(nn.Module):
    """A residual block written the way users write them: ``out = relu(x + f(x))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(x + out)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8, depth: int = 2):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[TinyBlock(width) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def tiny_resnet(num_classes: int = 10, in_chans: int = 3, width: int = 8, depth: int = 2):
    """A two-block ResNet small enough to build and run in milliseconds."""
    return TinyResNet(num_classes=num_classes, in_chans=in_chans, width=width, depth=depth)


def dropout_before_bn(num_classes: int = 10):
    """The bug Li et al. 2019 describe: Dropout whose output reaches a BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def not_a_module():
    """A factory that returns something that is not an nn.Module."""
    return "not a model"


NOT_CALLABLE = 42
