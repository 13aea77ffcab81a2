"""The behaviours users of retrofit's peers rely on, checked on retrofit.

Each test names the peer behaviour it ports — from the test suites and documented contracts of
torchvision (``ops.StochasticDepth``, ``ops.DropBlock2d/3d``), timm (``drop_path``,
``DropBlock2d``, ``drop_path_rate`` and ``calculate_drop_path_rates``) and MosaicML Composer
(``StochasticDepth``, ``CutOut``) — and asserts it with retrofit's API and retrofit's numbers.
Written from the behaviours, not from the peers' code. Where retrofit deliberately differs
(survival 0 is refused; DropBlock's fraction is the paper's, not timm's), the test says so.
The options table (docs/peers.md) lists every peer option and where it lives here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from scipy import stats
from torch import nn

import retrofit
from retrofit.layers import (
    BatchCutout,
    DropBlock,
    StochasticDepthGate,
    cutout,
    drop_block,
    expected_drop_fraction,
    stochastic_depth,
)
from retrofit.recipe import RecipeError, load_recipe
from retrofit.schedule import block_survivals, survival


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigma_bound(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1.0 - p) / n)


# ================================================================== stochastic depth


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("drop", [0.2, 0.5, 0.8])
def test_torchvision_stochastic_depth_binomial_drop_rate(mode, drop):
    """torchvision ops.StochasticDepth: the number of dropped rows (row) or dropped calls (batch)
    over 250 calls passes a binomial test at the drop probability (p-value > 0.01)."""
    x = torch.ones(5, 3, 4, 4)
    dropped = trials = 0
    for _ in range(250):
        out = stochastic_depth(x, 1.0 - drop, mode=mode)
        zero_rows = int((out.sum(dim=(1, 2, 3)) == 0).sum())
        if mode == "batch":
            dropped, trials = dropped + (zero_rows == 5), trials + 1
        else:
            dropped, trials = dropped + zero_rows, trials + 5
    assert stats.binomtest(dropped, trials, p=drop).pvalue > 0.01


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_torchvision_drop_probability_zero_is_the_identity(mode):
    """torchvision: p = 0 returns the input unchanged; timm's drop_path(drop_prob=0) returns x.
    retrofit's survival = 1 is that case, in every mode, for the functional and the gate."""
    x = torch.randn(5, 3, 4, 4)
    assert stochastic_depth(x, 1.0, mode=mode) is x
    gate = StochasticDepthGate(1.0, mode=mode).train()
    assert torch.equal(gate(x), x)


def test_torchvision_drop_probability_one_is_refused_not_zeroed():
    """torchvision: p = 1 zeroes the branch. retrofit refuses survival 0 (a block that never
    runs is a block to delete, and the inverted scale 1/p_l is undefined), with the range."""
    with pytest.raises(ValueError, match=r"survival probability has to be in \(0, 1\], but got 0"):
        stochastic_depth(torch.ones(2, 3), 0.0)
    with pytest.raises(RecipeError, match="p_L"):
        load_recipe({"stochastic_depth": {"p_L": 0.0}})


def test_timm_drop_path_scales_kept_rows_by_one_over_keep_prob():
    """timm drop_path(scale_by_keep=True): a kept row is x / keep_prob, a dropped row is 0."""
    x = torch.ones(4000, 3)
    out = stochastic_depth(x, 0.8, mode="row")
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1.25)
    kept = int((out[:, 0] != 0).sum())
    assert abs(kept / 4000 - 0.8) < sigma_bound(0.8, 4000)


def test_composer_linear_and_uniform_drop_distributions():
    """Composer StochasticDepth(drop_distribution=...): ``linear`` gives block i (0-based) of N
    the drop rate drop_rate·(i + 1)/N, ``uniform`` gives every block drop_rate. retrofit's
    ``linear`` and ``uniform`` schedules with p_L = 1 − drop_rate are the same numbers."""
    drop_rate, n = 0.2, 16
    for i in range(n):
        linear = 1.0 - survival(i + 1, n, 1.0 - drop_rate, "linear")
        assert linear == pytest.approx(drop_rate * (i + 1) / n, abs=1e-12)
        assert 1.0 - survival(i + 1, n, 1.0 - drop_rate, "uniform") == pytest.approx(drop_rate)


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny"])
def test_timm_drop_path_rate_placement_is_reproduced_by_schedule_timm(name):
    """timm models built with ``drop_path_rate`` hold a DropPath per block (block 1: none, rate
    0) at rate drop_path_rate·idx/(N − 1). Read those rates off timm's own modules and compare
    with retrofit's plan of the same architecture built without a rate, ``drop_path_rate``
    given in the recipe (timm's name; schedule timm implied). convnext_tiny's rates come from
    torch.linspace in float32, hence the tolerance."""
    import timm
    from timm.layers import DropPath

    rate = 0.2
    with torch.device("meta"):
        reference = timm.create_model(name, drop_path_rate=rate)
        model = timm.create_model(name)
    timm_rates = {
        qual.rpartition(".")[0]: m.drop_prob
        for qual, m in reference.named_modules()
        if isinstance(m, DropPath)
    }
    plan = retrofit.plan(model, {"stochastic_depth": {"drop_path_rate": rate}})
    edits = plan.by_kind("stochastic_depth")
    blocks = [e.block for e in edits]
    assert len(blocks) == len(set(blocks)) == len(timm_rates) + 1  # + block 1, never dropped
    assert blocks[0] not in timm_rates and edits[0].survival == 1.0
    for e in edits[1:]:
        assert e.survival == pytest.approx(1.0 - timm_rates[e.block], abs=1e-6), e.block
    # And it is not the paper's rule: the two differ by up to rate/L.
    paper = retrofit.plan(model, {"stochastic_depth": {"p_L": 1.0 - rate}})
    gap = max(abs(a.survival - b.survival) for a, b in zip(edits, paper.edits, strict=True))
    assert 0.5 * rate / len(blocks) < gap <= rate / len(blocks) + 1e-9


def test_timm_calculate_drop_path_rates_and_stagewise():
    """timm.layers.calculate_drop_path_rates: per block linspace(0, rate, N); with
    stagewise=True timm (1.0.x) returns the same per-block values grouped by stage. retrofit's
    ``schedule: timm`` gives those values; ``stagewise: true`` gives timm's *documented*
    stage-wise pattern — linear across stages, one rate within each stage — with a block's stage
    the container holding it."""
    from timm.layers import calculate_drop_path_rates

    depths, rate = [3, 4, 6, 3], 0.3
    names = [f"layer{s + 1}.{b}" for s, d in enumerate(depths) for b in range(d)]
    ours = block_survivals(names, 1.0 - rate, "timm")
    flat = calculate_drop_path_rates(rate, sum(depths))
    grouped = calculate_drop_path_rates(rate, depths, stagewise=True)
    assert [1.0 - ours[n] for n in names] == pytest.approx(flat, abs=1e-6)
    assert [r for stage in grouped for r in stage] == pytest.approx(flat, abs=1e-6)
    staged = block_survivals(names, 1.0 - rate, "timm", stagewise=True)
    per_stage = [1.0 - rate * s / 3 for s in range(4)]
    assert [staged[n] for n in names] == pytest.approx(
        [per_stage[s] for s, d in enumerate(depths) for _ in range(d)]
    )


def test_drop_path_rate_alias_and_its_refusals():
    """timm users write ``drop_path_rate``: accepted as 1 − p_L, implying schedule timm; never
    both names, never with another schedule."""
    r = load_recipe({"stochastic_depth": {"drop_path_rate": 0.1}}).stochastic_depth
    assert (r.p_L, r.schedule) == (pytest.approx(0.9), "timm")
    with pytest.raises(RecipeError, match="either p_L or drop_path_rate"):
        load_recipe({"stochastic_depth": {"drop_path_rate": 0.1, "p_L": 0.9}})
    with pytest.raises(RecipeError, match="schedule: timm"):
        load_recipe({"stochastic_depth": {"drop_path_rate": 0.1, "schedule": "linear"}})
    with pytest.raises(RecipeError, match="stagewise"):
        load_recipe({"stochastic_depth": {"schedule": "uniform", "stagewise": True}})


def test_composer_drop_warmup_values_through_a_retrofitted_model():
    """Composer StochasticDepth(drop_warmup=w): the drop rate grows linearly from 0 over the
    first w of training, then holds. retrofit: ``stochastic_depth.warmup``, driven by
    ``retrofit.schedule.update``; checked at t = 0, w/2, w and 1 on every gate."""
    w = 0.4
    model = torchvision.models.resnet18()
    retrofit.apply(model, {"stochastic_depth": {"p_L": 0.5, "warmup": w}}, verify=False)
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    assert len(gates) == 8
    targets = [survival(g.depth, 8, 0.5) for g in gates]
    assert [g.target_survival for g in gates] == targets
    for t, fraction in [(0.0, 0.0), (w / 2, 0.5), (w, 1.0), (1.0, 1.0)]:
        retrofit.schedule.update(model, t)
        for g, p in zip(gates, targets, strict=True):
            assert 1.0 - g.survival == pytest.approx(fraction * (1.0 - p), abs=1e-12), (t, g.depth)
    # After the warm-up the gates do drop: the last block keeps about half of 64 rows × 20 steps.
    model.train()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        for _ in range(20):
            model(x)
    last = max(gates, key=lambda g: g.depth)
    assert abs(last.kept_fraction - 0.5) < sigma_bound(0.5, 64 * 20)


def test_warmup_gate_never_scheduled_warns_instead_of_silently_never_dropping():
    import warnings

    gate = StochasticDepthGate(0.5, warmup=0.5).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():  # a check (verify's liveness forward), not training: no warning
            gate(torch.ones(4, 2))
    with pytest.warns(UserWarning, match="never set"):
        gate(torch.ones(4, 2))
    assert gate.survival == 1.0
    retrofit.schedule.update(nn.Sequential(gate), 0.25)
    assert gate.survival == 0.75


def test_composer_module_surgery_counts():
    """Composer's surgery replaces every target block (16 Bottlenecks in ResNet-50) and updates
    the optimizers. retrofit: one gate per residual block, the parameter list untouched (the
    optimizer needs no update), and strip takes every gate out again."""
    model = torchvision.models.resnet50()
    bottlenecks = sum(isinstance(m, torchvision.models.resnet.Bottleneck) for m in model.modules())
    params = list(model.parameters())
    retrofit.apply(model, {"stochastic_depth": {}}, example_input=torch.randn(2, 3, 64, 64))
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    assert len(gates) == bottlenecks == 16
    assert list(model.parameters()) == params and all(
        a is b for a, b in zip(model.parameters(), params, strict=True)
    )
    retrofit.strip(model)
    assert not any(isinstance(m, StochasticDepthGate) for m in model.modules())


# ================================================================== DropBlock


@pytest.mark.parametrize("dim", [2, 3])
def test_torchvision_dropblock_zero_drop_is_the_identity(dim):
    """torchvision DropBlock2d/3d(p=0): output equals input. retrofit: keep_prob = 1."""
    x = torch.randn((5, 3) + (11,) * dim)
    assert drop_block(x, 1.0, 5) is x


@pytest.mark.parametrize("dim", [2, 3])
def test_torchvision_dropblock_block_as_large_as_the_map_drops_all_or_nothing(dim):
    """torchvision: with block_size equal to the map side, every (sample, channel) map is kept
    whole or dropped whole (its masks are per channel: per_channel=True here)."""
    x = torch.ones((50, 3) + (11,) * dim)
    out = drop_block(x, 0.5, 11, per_channel=True)
    per_map = (out != 0).flatten(2).sum(-1)
    assert set(per_map.unique().tolist()) <= {0, 11**dim}
    assert 0 < int((per_map == 0).sum()) < per_map.numel(), "both outcomes occur"


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("drop", [0.1, 0.2])
def test_torchvision_dropblock_dropped_fraction_within_15_percent(dim, drop):
    """torchvision's random test: over 250 draws on ones(5, 3, 11, 11[, 11]) with block 3 the
    dropped fraction is within 15% (relative) of p. retrofit meets it with its exact
    expectation (expected_drop_fraction) inside the same band."""
    x = torch.ones((5, 3) + (11,) * dim)
    zeros = total = 0
    with torch.no_grad():
        for _ in range(250):
            out = drop_block(x, 1.0 - drop, 3)
            zeros += int((out == 0).sum())
            total += out.numel()
    measured = zeros / total
    assert abs(drop - measured) / drop < 0.15
    exact = expected_drop_fraction(1.0 - drop, 3, 11, 11, depth=11 if dim == 3 else None)
    assert abs(measured - exact) < 0.01


@pytest.mark.parametrize("block_size", [2, 4, 6])
def test_timm_dropblock_even_block_sizes_drop_whole_squares(block_size):
    """timm drop_block_2d handles even block sizes (its max-pool fix); torchvision rejects them.
    retrofit: an even block is a whole bs × bs square, output shape unchanged."""
    x = torch.ones(256, 1, 12, 12)
    out = drop_block(x, 0.97, block_size, training=True)
    assert out.shape == x.shape
    lone = 0
    for sample in out[:, 0] == 0:
        if int(sample.sum()) != block_size**2:
            continue  # no block, or overlapping blocks
        rows = sample.any(1).nonzero().flatten()
        cols = sample.any(0).nonzero().flatten()
        if rows.numel() * cols.numel() == block_size**2:  # one block: its bounding box is full
            lone += 1
            assert rows.numel() == cols.numel() == block_size
            assert int(rows[-1] - rows[0]) == int(cols[-1] - cols[0]) == block_size - 1
    assert lone >= 5, "enough single blocks were drawn to check their shape"


def test_timm_gamma_scale_scales_the_seed_rate():
    """timm DropBlock2d(gamma_scale=g): γ multiplied by g (0.25 on ResNet stage 3). The measured
    fraction matches retrofit's exact expectation for that γ, about g·(1 − keep_prob)."""
    x = torch.ones(400, 1, 14, 14)
    with torch.no_grad():
        measured = float((drop_block(x, 0.9, 5, gamma_scale=0.25) == 0).float().mean())
    exact = expected_drop_fraction(0.9, 5, 14, 14, gamma_scale=0.25)
    assert abs(measured - exact) < 0.005
    assert 0.02 < exact < 0.025
    with pytest.raises(ValueError, match="gamma"):
        drop_block(x, 0.5, 14, gamma_scale=3.0)  # γ = 1.5 > 1 on a map the block covers


def test_timm_scale_by_keep_false_leaves_kept_activations_unscaled():
    """timm DropBlock2d(scale_by_keep=False): kept activations keep their value."""
    x = torch.full((8, 2, 14, 14), 3.0)
    out = drop_block(x, 0.8, 3, scale=False)
    assert set(out.unique().tolist()) == {0.0, 3.0}
    scaled = drop_block(x, 0.8, 3)
    assert scaled.max() > 3.0


def test_per_stage_block_size_and_gamma_scale_like_timm_resnet():
    """timm's ResNet with drop_block_rate puts DropBlock2d(block 5, gamma_scale 0.25) on stage 3
    and (block 3, gamma_scale 1.0) on stage 4. retrofit: lists matching ``stages``."""
    model = torchvision.models.resnet50()
    recipe = {
        "dropblock": {"stages": [3, 4], "block_size": [5, 3], "gamma_scale": [0.25, 1.0]},
    }
    edits = retrofit.plan(model, recipe).by_kind("dropblock")
    assert [
        (e.target, e.params["block_size"], e.params.get("gamma_scale", 1.0)) for e in edits
    ] == [
        ("layer3", 5, 0.25),
        ("layer4", 3, 1.0),
    ]
    retrofit.apply(model, recipe, example_input=torch.randn(1, 3, 64, 64))
    layers = [m for m in model.modules() if isinstance(m, DropBlock)]
    assert [(d.block_size, d.gamma_scale) for d in layers] == [(5, 0.25), (3, 1.0)]
    with pytest.raises(RecipeError, match=r"dropblock\.block_size.*list of 2"):
        load_recipe({"dropblock": {"stages": [3, 4], "block_size": [5]}})


# ------------------------------------------------------------------ 3-D DropBlock, video CNNs


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_video_cnn_stages_are_found_on_t_h_w_maps(name):
    model = getattr(torchvision.models.video, name)()
    found = retrofit.stages(model)
    assert [(s.module, s.reduction) for s in found] == [
        ("layer1", 2),
        ("layer2", 4),
        ("layer3", 8),
        ("layer4", 16),
    ]
    assert all(len(s.shape) == 5 for s in found)
    assert [s.spatial for s in found] == [(56, 56), (28, 28), (14, 14), (7, 7)]


def test_torchvision_dropblock3d_fraction_on_r3d_18_stages_and_eval_equivalence():
    """torchvision.ops.DropBlock3d's use case: video CNNs. On each of r3d_18's stage maps (T×H×W
    from retrofit.stages) retrofit's DropBlock drops 1 − keep_prob ± 0.02 with block 7; placed
    after the chosen stages of the real model it leaves the eval output unchanged and runs on
    5-D maps in training."""
    model = torchvision.models.video.r3d_18()
    found = retrofit.stages(model)
    for stage in found:
        _, _, t, h, w = stage.shape
        n = max(32, 400_000 // (t * h * w))
        x = torch.ones(n, 1, t, h, w)
        with torch.no_grad():
            dropped = float((drop_block(x, 0.9, 7) == 0).float().mean())
        assert abs(dropped - 0.1) <= 0.02, (stage.module, stage.shape, dropped)

    clip = torch.randn(2, 3, 8, 56, 56)
    reference = model.eval()(clip)
    retrofit.apply(model, {"dropblock": {"stages": [3, 4], "keep_prob": 0.9}}, example_input=clip)
    layers = [m for m in model.modules() if isinstance(m, DropBlock)]
    assert len(layers) == 2
    assert torch.equal(model.eval()(clip), reference)
    seen = []
    for layer in layers:
        layer.register_forward_hook(lambda m, i, o: seen.append((i[0].ndim, bool((o == 0).any()))))
    retrofit.schedule.update(model, 1.0)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(clip)
    assert [ndim for ndim, _ in seen] == [5] * 10
    assert any(dropped for _, dropped in seen)


# ================================================================== Cutout


def mask_frequency(n: int, size: int, length: int | float, **kw) -> torch.Tensor:
    ones = torch.ones(n, 1, size, size)
    return (cutout(ones, 1, length, **kw) == 0).float().mean(0)[0]


def test_composer_uniform_sampling_masks_every_pixel_equally_often():
    """Composer CutOut(uniform_sampling=True): every pixel has the same probability of being
    masked. With a 16-px image and a length of 8 that probability is (8/24)² = 1/9 for every
    pixel (centres range over [−4, 20)); the paper's sampling (centres on the pixels) masks a
    corner, covered by 5 of 16 centre rows and columns, with (5/16)² ≈ 0.098, the middle with
    (8/16)² = 0.25."""
    n = 20_000
    freq = mask_frequency(n, 16, 8, uniform_sampling=True)
    expected = (8 / 24) ** 2
    assert (freq - expected).abs().max() < sigma_bound(expected, n)
    paper = mask_frequency(n, 16, 8)
    corner = (5 / 16) ** 2
    assert float(paper[0, 0]) == pytest.approx(corner, abs=sigma_bound(corner, n))
    assert float(paper[8, 8]) == pytest.approx(1 / 4, abs=sigma_bound(1 / 4, n))


def test_composer_length_as_a_fraction_of_the_shorter_side():
    """Composer CutOut(length=0.5): a square of side int(0.5 · min(H, W)). A centre well inside
    a 20 × 32 image masks a 10 × 10 square; the recipe keeps the float, ints stay pixels."""
    images = torch.ones(1, 3, 20, 32)
    out = cutout(images, 1, 0.5, centres=torch.tensor([[[10, 16]]]))
    assert int((out[0, 0] == 0).sum()) == 100
    assert load_recipe({"cutout": {"length": 0.5}}).cutout.length == 0.5
    assert load_recipe({"cutout": {"length": 16}}).cutout.length == 16
    with pytest.raises(RecipeError, match="write 16 for 16 pixels"):
        load_recipe({"cutout": {"length": 16.0}})
    with pytest.raises(ValueError, match="mask nothing"):
        cutout(torch.ones(1, 1, 8, 8), 1, 0.1)


def test_composer_one_hole_position_per_batch():
    """Composer cuts the same square from every image of a batch: ``per_batch: true``. The
    default, as in the paper, draws a position per image."""
    x = torch.ones(32, 3, 24, 24)
    shared = cutout(x, 1, 8, per_batch=True)
    assert all(torch.equal(shared[0], shared[i]) for i in range(32))
    assert (shared == 0).any()
    own = cutout(x, 1, 8)
    assert not all(torch.equal(own[0], own[i]) for i in range(32))
    module = BatchCutout(1, 0.25, uniform_sampling=True, per_batch=True).train()
    out = module(x)
    assert all(torch.equal(out[0], out[i]) for i in range(32))
    assert module.extra_repr() == "n_holes=1, length=0.25, uniform_sampling=True, per_batch=True"


def test_cutout_options_reach_the_trainer_recipe():
    r = load_recipe({"cutout": {"length": 0.5, "uniform_sampling": True, "per_batch": True}})
    assert r.cutout.to_dict() == {
        "n_holes": 1,
        "length": 0.5,
        "uniform_sampling": True,
        "per_batch": True,
    }
    assert load_recipe(r.to_dict()) == r


# ================================================================== graph tools


def test_torchvision_ops_are_single_fx_nodes():
    """torchvision: StochasticDepth and DropBlock are one leaf node each in a traced graph.
    retrofit's layers record one call_function node each (torch.fx.wrap)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = StochasticDepthGate(0.8)
            self.block = DropBlock(0.9, 3)

        def forward(self, x):
            return self.block(x) + self.gate(x)

    gm = torch.fx.symbolic_trace(Net())
    calls = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count("stochastic_depth") == 1 and calls.count("drop_block") == 1
