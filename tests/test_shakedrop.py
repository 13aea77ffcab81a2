"""ShakeDrop (Yamada et al. 2018) shipped through the technique record: the layer's forward
factor against α ∈ [−1, 1], its backward's β against autograd on a toy branch, eval identity,
and the technique applied to the CIFAR ResNet-110 example and a timm ResNet (verified: eval
output unchanged, every layer live)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import retrofit
from retrofit.layers import ShakeDrop, shake_drop
from retrofit.layers.shakedrop import ShakeDraws, shake_draws

ROOT = Path(__file__).resolve().parents[1]


def test_forward_factor_is_b_plus_alpha_minus_b_alpha_over_p_per_sample():
    torch.manual_seed(0)
    n, p = 4096, 0.25
    d = shake_draws(n, p, mode="row")
    x = torch.ones(n, 3, 2, 2)
    y = shake_drop(x, p, draws=d)
    factor = y[:, 0, 0, 0]
    # one factor per sample, the same over its elements
    assert torch.equal(y, factor.view(n, 1, 1, 1).expand_as(y))
    expected = (d.keep + d.alpha - d.keep * d.alpha) / p
    torch.testing.assert_close(factor, expected)
    kept, dropped = d.keep == 1, d.keep == 0
    # b = 1: the branch unshaken (×1/p); b = 0: ×α/p with α ∈ [−1, 1], negative ones included
    torch.testing.assert_close(factor[kept], torch.full_like(factor[kept], 1 / p))
    scaled = factor[dropped] * p
    assert scaled.min() >= -1.0 and scaled.max() <= 1.0
    assert scaled.min() < -0.95 and scaled.max() > 0.95  # the whole range is drawn
    assert abs(kept.float().mean().item() - p) < 0.03
    # inverted: E[(b + α − bα)/p] = 1, so the training expectation is the eval output
    assert abs(factor.mean().item() - 1.0) < 0.1


def test_batch_mode_draws_one_b_per_call_and_alpha_per_sample():
    torch.manual_seed(1)
    d = shake_draws(64, 0.5, mode="batch")
    assert d.keep.unique().numel() == 1 and d.alpha.unique().numel() == 64


def test_backward_uses_beta_not_alpha():
    # toy branch F(x) = w·x; G = x + ShakeDrop(F(x)); dL/dw for L = ΣG is Σ_n c_n Σ x_n with
    # c_n = (b + β − bβ)/p: the β-scaled factor, not the forward's α one.
    torch.manual_seed(2)
    n, p = 8, 0.5
    x = torch.randn(n, 5)
    w = torch.tensor(1.5, requires_grad=True)
    keep = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0])
    draws = ShakeDraws(keep, torch.rand(n) * 2 - 1, torch.rand(n))
    out = x + shake_drop(w * x, p, draws=draws)
    (grad,) = torch.autograd.grad(out.sum(), w)
    beta_factor = (keep + draws.beta - keep * draws.beta) / p
    alpha_factor = (keep + draws.alpha - keep * draws.alpha) / p
    expected = (beta_factor * x.sum(1)).sum()
    torch.testing.assert_close(grad, expected)
    assert not torch.allclose(grad, (alpha_factor * x.sum(1)).sum())
    # and the forward did use α
    torch.testing.assert_close(out, x + alpha_factor[:, None] * 1.5 * x)


def test_the_layer_is_the_identity_in_eval_and_counts_in_training():
    layer = ShakeDrop(0.5, depth=3)
    x = torch.randn(6, 4)
    assert layer.eval()(x) is x
    layer.train()
    torch.manual_seed(3)
    layer(x)
    layer(x)
    r = layer.rates()
    assert r["calls"] == 12 and r["kept"] in (0, 6, 12) and r["depth"] == 3
    layer.reset_stats()
    assert layer.rates()["calls"] == 0 and layer.rates()["kept_fraction"] is None
    assert not list(layer.parameters()) and not list(layer.buffers())
    with pytest.raises(ValueError, match="alpha_range"):
        ShakeDrop(0.5, alpha_range=(-1.0, 0.5))


def test_recipe_section_and_its_errors():
    recipe = retrofit.load_recipe(ROOT / "recipes" / "shakedrop.yaml")
    assert recipe.shakedrop.p_L == 0.5 and recipe.shakedrop.alpha_range == (-1.0, 1.0)
    assert recipe.shakedrop.beta_range == (0.0, 1.0) and recipe.shakedrop.mode == "batch"
    with pytest.raises(retrofit.RecipeError, match=r"shakedrop\.beta_range"):
        retrofit.load_recipe({"shakedrop": {"beta_range": [1, 0]}})
    with pytest.raises(retrofit.RecipeError, match=r"shakedrop\.alpha_range.*E\[α\] = 0"):
        retrofit.load_recipe({"shakedrop": {"alpha_range": [-1, 0.5]}})
    with pytest.raises(retrofit.RecipeError, match="shakedrop or stochastic_depth, not both"):
        retrofit.load_recipe({"shakedrop": {}, "stochastic_depth": {}})


def _check_applied(model: nn.Module, x: torch.Tensor, blocks: int) -> list[ShakeDrop]:
    original = copy.deepcopy(model).eval()
    retrofit.apply(model, {"shakedrop": {}}, example_input=x)  # verified: equivalence, liveness
    layers = [m for m in model.modules() if isinstance(m, ShakeDrop)]
    assert [m.depth for m in layers] == list(range(1, blocks + 1))
    assert layers[-1].survival == pytest.approx(0.5)
    assert layers[0].survival == pytest.approx(1 - 0.5 / blocks)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    model.train()
    model(x).sum().backward()
    assert all(m.rates()["calls"] == x.shape[0] for m in layers)
    return layers


def test_applied_to_the_cifar_resnet110_example():
    from examples.cifar_resnet import resnet110

    torch.manual_seed(4)
    _check_applied(resnet110(), torch.randn(2, 3, 32, 32), 54)


def test_applied_to_a_timm_resnet():
    import timm

    torch.manual_seed(5)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    _check_applied(model, torch.randn(2, 3, 64, 64), 8)
    table = retrofit.plan(timm.create_model("resnet18", pretrained=False), {"shakedrop": {}})
    assert table.by_kind("shakedrop")[0].params == {
        "alpha_range": [-1.0, 1.0],
        "beta_range": [0.0, 1.0],
        "mode": "batch",
    }
    assert "ShakeDrop (Yamada et al. 2018): 8 residual branch(es)" in table.table()
    retrofit.strip(model)
    assert not any(isinstance(m, ShakeDrop) for m in model.modules())
