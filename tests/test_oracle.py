"""The execution oracle (``tools/oracle.py: drop_path_placement``) against models whose drop
path is known: timm's (cross-checked with the graph oracle), hand-written ones, and the cases it
must report rather than count."""

from __future__ import annotations

import timm
import torch
from torch import nn

from tests.wild_models import MlpBlock, OwnDropPathMixer, TinyDropPath, image
from tools.oracle import drop_path_placement, library_drop_path_owners


def test_agrees_with_the_graph_oracle_on_timm():
    for name, kwargs in (
        ("resnet18", {}),
        ("convnext_atto", {}),
        ("vit_tiny_patch16_224", {"img_size": 32, "depth": 3}),
    ):
        torch.manual_seed(0)
        model = timm.create_model(name, drop_path_rate=0.1, num_classes=4, **kwargs)
        placement = drop_path_placement(model, image(0, size=(3, 32, 32)))
        assert placement.owners == library_drop_path_owners(model), name
        assert not placement.not_called and not placement.not_on_add, name


def test_identity_slot_of_block_zero_counts_and_the_model_is_left_as_it_was():
    model = OwnDropPathMixer().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    placement = drop_path_placement(model, image(0))
    assert placement.owners == {"blocks.0", "blocks.1", "blocks.2"}
    assert placement.modules == ["blocks.1.drop_path", "blocks.2.drop_path"]
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _InlineResidual(nn.Module):
    """HF LeViT's ``LevitResidualLayer``: drop path written inline with a random mask."""

    def __init__(self, module: nn.Module, drop_rate: float):
        super().__init__()
        self.module = module
        self.drop_rate = drop_rate

    def forward(self, x):
        if self.training and self.drop_rate > 0:
            rnd = torch.rand(x.size(0), 1, 1, device=x.device)
            rnd = rnd.ge_(self.drop_rate).div(1 - self.drop_rate).detach()
            return x + self.module(x) * rnd
        return x + self.module(x)


class _DropAfterAdd(nn.Module):
    """CvT's quirk: drop path applied to the block's output after its own add."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_path = TinyDropPath(0.1)
        self.unused = TinyDropPath(0.1)

    def forward(self, x):
        return self.drop_path(x + self.fc(x))


def test_inline_masks_drops_after_the_add_and_unused_modules():
    model = nn.Sequential(
        _InlineResidual(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)), 0.1),
        _DropAfterAdd(),
        MlpBlock(8, 0.1),
    )
    placement = drop_path_placement(model, torch.randn(2, 4, 8))
    assert placement.inline == {"0"}
    assert placement.owners == {"0", "2"}
    assert placement.not_on_add == ["1.drop_path"]
    assert placement.not_called == ["1.unused"]
