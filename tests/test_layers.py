"""Numerical tests of the regularizer layers: rates, scaling, shapes, layouts, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from retrofit.layers import (
    BatchCutout,
    Cutout,
    DropBlock,
    StochasticDepthGate,
    Uout,
    cutout,
    drop_block,
    dropblock_gamma,
    expected_drop_fraction,
    is_gate,
    stochastic_depth,
    uout,
)
from retrofit.layers.dropblock import _blocks_from_seeds


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------- stochastic depth


class TestStochasticDepth:
    def test_inverted_eval_is_identity_object(self):
        x = torch.randn(4, 3, 5, 5)
        assert stochastic_depth(x, 0.5, training=False) is x
        gate = StochasticDepthGate(0.5).eval()
        assert gate(x) is x

    def test_paper_scaling_eval_and_train_exact(self):
        x = torch.randn(64, 3, 4, 4)
        out = stochastic_depth(x, 0.7, scaling="paper", training=False)
        assert torch.equal(out, x * 0.7)
        out = stochastic_depth(x, 0.7, scaling="paper", generator=gen())
        for row_out, row_x in zip(out, x, strict=True):
            assert torch.equal(row_out, row_x) or torch.equal(row_out, torch.zeros_like(row_x))

    def test_survival_one_is_identity_in_every_mode(self):
        x = torch.randn(8, 3)
        for mode in ("row", "batch", "subset"):
            for scaling in ("inverted", "paper"):
                assert stochastic_depth(x, 1.0, mode, True, scaling) is x
                assert stochastic_depth(x, 1.0, mode, False, scaling) is x

    def test_row_keep_rate_and_exact_inverse_scaling(self):
        n, p = 200_000, 0.8
        x = torch.rand(n, 2) + 0.5
        out = stochastic_depth(x, p, "row", generator=gen(1))
        kept = (out != 0).all(dim=1)
        dropped = (out == 0).all(dim=1)
        assert torch.all(kept | dropped), "a row is either kept whole or dropped whole"
        assert abs(kept.float().mean().item() - p) < binomial_tol(p, n)
        scale = torch.ones(1) / p  # the float32 value the mask holds after div_
        assert torch.equal(out[kept], x[kept] * scale)
        torch.testing.assert_close(out[kept] / x[kept], torch.full_like(x[kept], 1 / p))

    def test_batch_mode_all_or_nothing(self):
        x = torch.rand(16, 3, 2, 2) + 0.5
        g = gen(2)
        kept_calls, calls, p = 0, 400, 0.6
        for _ in range(calls):
            out = stochastic_depth(x, p, "batch", generator=g)
            if torch.all(out == 0):
                continue
            assert torch.equal(out, x * (torch.ones(1) / p))
            kept_calls += 1
        assert abs(kept_calls / calls - p) < binomial_tol(p, calls)

    def test_subset_mode_keeps_exact_count(self):
        x = torch.ones(10, 3)
        out = stochastic_depth(x, 0.7, "subset", generator=gen(3))
        kept = (out != 0).all(dim=1)
        assert int(kept.sum()) == 7
        assert torch.allclose(out[kept], torch.full((7, 3), 10 / 7))

    def test_generator_reproducible(self):
        x = torch.randn(32, 4)
        a = stochastic_depth(x, 0.5, generator=gen(7))
        b = stochastic_depth(x, 0.5, generator=gen(7))
        assert torch.equal(a, b)

    def test_dtype_and_channels_last_preserved(self):
        x = torch.randn(8, 4, 5, 5).to(torch.bfloat16).to(memory_format=torch.channels_last)
        for mode in ("row", "batch", "subset"):
            out = StochasticDepthGate(0.5, mode=mode).train()(x)
            assert out.dtype == torch.bfloat16
            assert out.is_contiguous(memory_format=torch.channels_last)

    def test_gate_owns_no_state(self):
        gate = StochasticDepthGate(0.5, depth=2)
        gate(torch.randn(4, 3))
        assert gate.state_dict() == {}
        assert list(gate.parameters()) == [] and list(gate.buffers()) == []

    def test_gate_counters(self):
        torch.manual_seed(0)
        gate = StochasticDepthGate(0.75).train()
        kept = 0
        for _ in range(20):
            out = gate(torch.ones(50, 2))
            kept += int((out[:, 0] != 0).sum())
        assert gate.calls == 1000
        assert gate.kept == kept
        assert gate.kept_fraction == pytest.approx(kept / 1000)
        assert 0.0 <= gate.kept_fraction <= 1.0
        gate.eval()(torch.ones(50, 2))
        assert gate.calls == 1000, "inference does not count"
        gate.reset_stats()
        assert (gate.calls, gate.kept, gate.kept_fraction) == (0, 0, 0.0)
        gate.mode = "batch"
        gate.train()(torch.ones(8, 2))
        assert gate.calls == 8 and gate.kept in (0, 8)

    def test_gate_counts_across_folds_and_mode_changes(self):
        torch.manual_seed(1)
        gate = StochasticDepthGate(0.5).train()
        gate.FOLD_EVERY = 3  # fold often, so the device-side accumulation is exercised
        kept = 0
        for step in range(10):
            gate.mode = ("row", "batch", "subset")[step % 3]
            out = gate(torch.ones(6, 2))
            kept += int((out[:, 0] != 0).sum())
        assert gate.calls == 60 and gate.kept == kept
        gate.train()(torch.ones(4, 2))  # reading kept does not lose later counts
        assert gate.calls == 64 and gate.kept >= kept
        gate.kept = 5  # the trainer restores counters from a checkpoint this way
        assert (gate.calls, gate.kept) == (64, 5)

    def test_gate_attributes_mutable_and_repr(self):
        gate = StochasticDepthGate(0.90625, depth=3)
        assert gate.extra_repr() == "depth=3, survival=0.9062, mode=row, scaling=inverted"
        gate.survival = 0.5
        gate.scaling = "paper"
        x = torch.randn(4, 3)
        assert torch.equal(gate.eval()(x), x * 0.5)
        assert is_gate(gate) and not is_gate(nn.Identity())

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"survival": 0.0}, r"\(0, 1\].*0\.0"),
            ({"survival": 1.5}, r"\(0, 1\].*1\.5"),
            ({"mode": "layer"}, "row, batch, subset.*'layer'"),
            ({"scaling": "none"}, "inverted, paper.*'none'"),
        ],
    )
    def test_validation(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            StochasticDepthGate(**kwargs)
        args = {"survival": 0.5, "mode": "row", "scaling": "inverted", **kwargs}
        with pytest.raises(ValueError, match=match):
            stochastic_depth(torch.ones(2, 2), **args)

    def test_functional_is_one_fx_node(self):
        class Block(nn.Module):
            def forward(self, x):
                return x + stochastic_depth(x.relu(), 0.5, "row", self.training)

        gm = torch.fx.symbolic_trace(Block())
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert stochastic_depth in targets
        # Tracing through a gate (not registered as a leaf) also yields the one wrapped node.
        gm = torch.fx.symbolic_trace(nn.Sequential(StochasticDepthGate(0.5)))
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [stochastic_depth]


# --------------------------------------------------------------------------- DropBlock


def dropped_fraction(keep_prob: float, block_size: int, shape, calls: int, seed: int = 0):
    g = gen(seed)
    x = torch.ones(shape)
    dropped = [
        (drop_block(x, keep_prob, block_size, generator=g) == 0).float().mean()
        for _ in range(calls)
    ]
    return torch.stack(dropped).mean().item()


class TestDropBlock:
    def test_gamma_formula(self):
        assert dropblock_gamma(0.9, 7, 64, 64) == pytest.approx(0.1 / 49 * 4096 / 58**2, rel=1e-12)
        assert dropblock_gamma(0.9, 3, 10, 20) == pytest.approx(0.1 / 9 * 200 / (8 * 18), rel=1e-12)
        # block_size is clamped to min(H, W): one seed position, gamma = 1 - keep_prob.
        assert dropblock_gamma(0.8, 7, 5, 5) == pytest.approx(0.2)

    def test_dropped_fraction_close_to_target(self):
        frac = dropped_fraction(0.9, 7, (32, 1, 64, 64), calls=4)
        assert abs(frac - 0.1) <= 0.02
        # ... and close to the exact expectation (overlapping blocks, border coverage).
        assert abs(frac - expected_drop_fraction(0.9, 7, 64, 64)) <= 0.01

    def test_dropped_fraction_matches_exact_expectation_low_keep(self):
        frac = dropped_fraction(0.75, 5, (32, 1, 40, 48), calls=4, seed=1)
        assert abs(frac - expected_drop_fraction(0.75, 5, 40, 48)) <= 0.01

    @pytest.mark.parametrize("bs", [1, 2, 3, 4, 7])
    def test_one_seed_gives_one_full_square(self, bs):
        h, w = 12, 11
        seeds = torch.zeros(1, 1, h - bs + 1, w - bs + 1)
        seeds[0, 0, 2, 3] = 1
        blocks = _blocks_from_seeds(seeds, bs)
        expected = torch.zeros(1, 1, h, w)
        expected[0, 0, 2 : 2 + bs, 3 : 3 + bs] = 1
        assert blocks.shape == (1, 1, h, w)
        assert torch.equal(blocks, expected)
        # The extreme seed positions still give whole squares inside the map.
        seeds.zero_()
        seeds[0, 0, -1, -1] = 1
        blocks = _blocks_from_seeds(seeds, bs)
        assert blocks.sum() == bs * bs and torch.all(blocks[0, 0, h - bs :, w - bs :] == 1)

    @pytest.mark.parametrize("bs", [3, 4, 7])
    def test_dropped_regions_are_unions_of_full_squares(self, bs):
        # Erode the dropped set with a bs x bs window (anchors of fully dropped squares), dilate
        # it back: that reproduces the dropped set only if every dropped pixel lies in a whole
        # bs x bs square inside the map (a border-clipped block would not).
        out = drop_block(torch.ones(16, 1, 24, 24), 0.85, bs, generator=gen(bs))
        dropped = (out == 0).float()
        anchors = -F.max_pool2d(-dropped, bs, stride=1)
        assert dropped.sum() > 0
        assert torch.equal(_blocks_from_seeds(anchors, bs), dropped)

    def test_rescaling_exact(self):
        x = torch.randn(8, 3, 20, 20)
        out = drop_block(x, 0.8, 5, generator=gen(4))
        keep = (out != 0).any(dim=1, keepdim=True).float()  # shared mask: same for all channels
        scale = keep.numel() / keep.sum()
        assert 0 < keep.sum() < keep.numel()
        torch.testing.assert_close(out, x * keep * scale, rtol=1e-6, atol=0)

    def test_identity_in_eval_and_at_keep_one(self):
        x = torch.randn(2, 3, 9, 9)
        assert drop_block(x, 0.9, 3, training=False) is x
        assert drop_block(x, 1.0, 3) is x
        layer = DropBlock(0.9, 3)
        layer.set_progress(1.0)
        assert layer.eval()(x) is x

    def test_all_dropped_gives_zeros_not_nan(self):
        # block_size clamps to the 4x4 map: one seed position drawn with gamma = 1 - keep_prob.
        out = drop_block(torch.ones(4, 2, 4, 4), 1e-9, 7, generator=gen())
        assert torch.equal(out, torch.zeros_like(out))

    def test_clamped_block_drops_whole_maps(self):
        out = drop_block(torch.ones(400, 1, 5, 5), 0.7, 9, generator=gen(5))
        per_sample = (out == 0).flatten(1).float().mean(1)
        assert set(per_sample.unique().tolist()) <= {0.0, 1.0}
        assert abs(per_sample.mean().item() - 0.3) < binomial_tol(0.3, 400)

    @pytest.mark.parametrize("per_channel", [False, True])
    def test_dtype_and_channels_last_preserved(self, per_channel):
        x = torch.randn(4, 8, 14, 14, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        out = drop_block(x, 0.8, 3, per_channel=per_channel, generator=gen())
        assert out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert (out == 0).any()

    def test_shared_vs_per_channel_masks(self):
        x = torch.ones(4, 6, 16, 16)
        shared = drop_block(x, 0.8, 3, generator=gen(6)) == 0
        assert torch.equal(shared, shared[:, :1].expand_as(shared))
        own = drop_block(x, 0.8, 3, per_channel=True, generator=gen(6)) == 0
        assert not torch.equal(own, own[:, :1].expand_as(own))

    def test_module_schedule_repr_and_state(self):
        layer = DropBlock(keep_prob=0.9, block_size=5, ramp=0.5)
        assert (layer.keep_prob, layer.target_keep_prob) == (1.0, 0.9)
        layer.set_progress(0.25)
        assert layer.keep_prob == pytest.approx(0.95, abs=1e-12)
        layer.set_progress(0.75)
        assert layer.keep_prob == 0.9
        assert layer.extra_repr() == (
            "keep_prob=0.9000, target_keep_prob=0.9, block_size=5, per_channel=False, ramp=0.5"
        )
        assert layer.state_dict() == {}

    def test_unscheduled_module_warns_once(self):
        layer = DropBlock(0.9, 3).train()
        x = torch.randn(2, 1, 8, 8)
        with pytest.warns(UserWarning, match="schedule.update"):
            assert torch.equal(layer(x), x)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer(x)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"keep_prob": 0.0}, r"keep_prob.*\(0, 1\].*0\.0"),
            ({"keep_prob": 1.2}, r"keep_prob.*1\.2"),
            ({"block_size": 0}, "block_size.*>= 1.*0"),
            ({"ramp": 0.0}, r"ramp.*\(0, 1\].*0\.0"),
        ],
    )
    def test_validation(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            DropBlock(**kwargs)

    def test_rejects_non_4d(self):
        with pytest.raises(ValueError, match="4-D"):
            drop_block(torch.ones(2, 3, 4), 0.9, 3)


# --------------------------------------------------------------------------- Uout


class TestUout:
    def test_eval_identity(self):
        x = torch.randn(3, 4)
        assert uout(x, 0.3, training=False) is x
        assert Uout(0.3).eval()(x) is x

    def test_noise_bounds_mean_and_variance_ratio(self):
        beta, n = 0.4, 400_000
        x = torch.randn(n, dtype=torch.float64)
        y = uout(x, beta, generator=gen(8))
        assert torch.all((y - x).abs() <= beta * x.abs() * (1 + 1e-12))
        r = (y - x) / x
        sd_r = beta / math.sqrt(3)
        assert abs(r.mean().item()) < 5 * sd_r / math.sqrt(n)
        assert r.min() >= -beta and r.max() <= beta
        assert r.var().item() == pytest.approx(beta**2 / 3, rel=0.02)
        # Var(x(1 + r)) / Var(x) = 1 + beta^2/3 for zero-mean x independent of r.
        assert (y.var() / x.var()).item() == pytest.approx(1 + beta**2 / 3, rel=0.01)

    def test_layout_and_dtype(self):
        x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        y = Uout(0.2).train()(x)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)

    @pytest.mark.parametrize("beta", [0.0, -0.1, 1.5])
    def test_validation(self, beta):
        with pytest.raises(ValueError, match=rf"beta.*\(0, 1\].*{beta}"):
            Uout(beta)

    def test_repr(self):
        assert repr(Uout(0.25)) == "Uout(beta=0.25)"


# --------------------------------------------------------------------------- Cutout


def seed_cutout(img: np.ndarray, centres, length: int) -> np.ndarray:
    """The reference snippet's loop (numpy mask, clipped slices), with given centres."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    for y, x in centres:
        y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
        x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
        mask[y1:y2, x1:x2] = 0.0
    return img * mask[None]


class TestCutout:
    def test_exact_holes_away_from_border(self):
        images = torch.rand(2, 3, 32, 32) + 1
        centres = torch.tensor([[[8, 8], [20, 22]], [[16, 16], [16, 5]]])
        out = cutout(images, 2, 8, centres=centres)
        expected = torch.ones(2, 32, 32, dtype=torch.bool)
        expected[0, 4:12, 4:12] = False
        expected[0, 16:24, 18:26] = False
        expected[1, 12:20, 12:20] = False
        expected[1, 12:20, 1:9] = False
        assert torch.equal(out != 0, expected[:, None].expand(-1, 3, -1, -1))
        assert int((out[0] == 0).sum()) == 3 * 2 * 64
        assert torch.equal(out[out != 0], images[out != 0])

    def test_clipping_at_border_and_odd_length(self):
        images = torch.ones(1, 1, 10, 10)
        out = cutout(images, 1, 8, centres=torch.tensor([[[0, 9]]]))
        zeros = (out[0, 0] == 0).nonzero()
        assert zeros[:, 0].tolist() == sorted([r for r in range(4) for _ in range(5)])
        assert set(zeros[:, 1].tolist()) == {5, 6, 7, 8, 9}
        # Odd length 5: the reference spans 5//2 = 2 on each side, a 4 x 4 hole.
        out = cutout(images, 1, 5, centres=torch.tensor([[[5, 5]]]))
        assert int((out == 0).sum()) == 16

    def test_matches_reference_snippet(self):
        g = gen(9)
        images = torch.rand(16, 3, 20, 24)
        centres = torch.stack(
            [
                torch.randint(0, 20, (16, 3), generator=g),
                torch.randint(0, 24, (16, 3), generator=g),
            ],
            -1,
        )
        out = cutout(images, 3, 9, centres=centres)
        for i in range(16):
            ref = seed_cutout(images[i].numpy(), centres[i].tolist(), 9)
            np.testing.assert_array_equal(out[i].numpy(), ref)

    def test_batched_equals_per_image(self):
        g = gen(10)
        images = torch.rand(5, 3, 16, 16)
        centres = torch.randint(0, 16, (5, 2, 2), generator=g)
        batched = cutout(images, 2, 6, centres=centres)
        transform = Cutout(n_holes=2, length=6)
        for i in range(5):
            assert torch.equal(transform(images[i], centres=centres[i]), batched[i])

    def test_random_centres_and_layout(self):
        images = torch.rand(64, 3, 32, 32).to(memory_format=torch.channels_last) + 1
        out = cutout(images, 1, 16, generator=gen(11))
        holes = (out == 0).sum(dim=(1, 2, 3))
        assert torch.all(holes > 0) and torch.all(holes <= 3 * 16 * 16)
        assert out.is_contiguous(memory_format=torch.channels_last)
        u8 = cutout(torch.full((2, 3, 8, 8), 7, dtype=torch.uint8), 1, 4, generator=gen())
        assert u8.dtype == torch.uint8

    def test_no_holes_is_noop(self):
        images = torch.rand(2, 3, 8, 8)
        assert cutout(images, 0, 8) is images
        assert torch.equal(Cutout(0, 8)(images[0]), images[0])

    def test_batch_module_only_in_training(self):
        images = torch.rand(4, 3, 8, 8) + 1
        module = BatchCutout(1, 4)
        assert (module.train()(images) == 0).any()
        assert module.eval()(images) is images
        assert repr(Cutout(2, 8)) == "Cutout(n_holes=2, length=8)"
        assert module.state_dict() == {}

    @pytest.mark.parametrize(
        "n_holes, length, match", [(-1, 8, "n_holes.*>= 0.*-1"), (1, 0, "length.*>= 1.*0")]
    )
    def test_validation(self, n_holes, length, match):
        with pytest.raises(ValueError, match=match):
            cutout(torch.ones(1, 1, 4, 4), n_holes, length)
        with pytest.raises(ValueError, match=match):
            Cutout(n_holes, length)

    def test_bad_centres_and_inputs(self):
        with pytest.raises(ValueError, match="centres"):
            cutout(torch.ones(2, 1, 4, 4), 1, 2, centres=torch.zeros(2, 2, 2, dtype=torch.long))
        with pytest.raises(TypeError, match="ToTensor"):
            Cutout(1, 2)(np.ones((4, 4, 3)))


# --------------------------------------------------------------------------- torch.fx


@pytest.mark.parametrize(
    "fn, args",
    [
        (stochastic_depth, (0.5, "row")),
        (drop_block, (0.9, 3)),
        (uout, (0.1,)),
        (cutout, (1, 4)),
    ],
)
def test_each_functional_is_one_fx_node_and_runs(fn, args):
    class Net(nn.Module):
        def forward(self, x):
            return fn(x * 2, *args, training=True) if fn is not cutout else fn(x * 2, *args)

    gm = torch.fx.symbolic_trace(Net())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(fn) == 1 and len(calls) == 2, calls
    x = torch.rand(4, 3, 8, 8) + 1
    assert gm(x).shape == x.shape
    gm.recompile()  # the generated code imports the functional by its qualified name
    assert "retrofit" in gm.code


# --------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_gate_counts_without_per_step_sync():
    gate = StochasticDepthGate(0.8).train()
    x = torch.ones(512, 4, device="cuda", dtype=torch.bfloat16)
    kept = 0
    for _ in range(100):  # folds once at FOLD_EVERY = 64, leaves 36 masks pending
        out = gate(x)
        kept += int((out[:, 0] != 0).sum())
    assert out.dtype == torch.bfloat16 and gate.state_dict() == {}
    assert gate._count_on_device is not None, "the count stays on the device until read"
    assert gate.kept == kept and gate._count_on_device is None and not gate._masks
    assert abs(gate.kept_fraction - 0.8) < binomial_tol(0.8, 512 * 100)


@cuda
def test_cuda_dropblock_under_autocast_channels_last():
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.ones(32, 8, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(x, torch.eye(8, device="cuda")[:, :, None, None])
        out = drop_block(y, 0.9, 7, generator=g)
        per_channel = drop_block(y, 0.9, 7, per_channel=True, generator=g)
    assert out.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert per_channel.is_contiguous(memory_format=torch.channels_last)
    frac = (out == 0).float().mean().item()
    assert abs(frac - expected_drop_fraction(0.9, 7, 64, 64)) <= 0.02
    dropped = (out[:, :1] == 0).float()
    assert torch.equal(_blocks_from_seeds(-F.max_pool2d(-dropped, 7, stride=1), 7), dropped)


@cuda
def test_cuda_cutout_and_uout_match_cpu():
    g = torch.Generator("cuda").manual_seed(0)
    images = torch.rand(8, 3, 32, 32)
    centres = torch.randint(0, 32, (8, 2, 2))
    on_gpu = cutout(images.cuda(), 2, 16, centres=centres.cuda()).cpu()
    assert torch.equal(on_gpu, cutout(images, 2, 16, centres=centres))
    assert cutout(images.cuda(), 2, 16, generator=g).device.type == "cuda"
    y = uout(images.cuda(), 0.2, generator=g)
    assert torch.all((y.cpu() - images).abs() <= 0.2 * images.abs() + 1e-6)
