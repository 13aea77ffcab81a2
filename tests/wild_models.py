"""Small models written the way real model code is written, one per failure class of issue 10.

Each reproduces a pattern that defeats symbolic tracing with arguments frozen at their defaults,
as found in public model code (EfficientNet ports, HF transformers, Swin, ConvNeXt, dual-path
networks, segmentation encoders, early-exit networks). They are tiny (a few channels, 16×16
inputs) so the whole set runs in milliseconds, and each knows its residual sites by
construction: ``CASES`` lists, per model, the number of sites, their owners and what a user
would want from ``retrofit.apply`` (instrumented and live, or either that or a clean refusal).

Residual sites here are the adds ``shortcut + branch`` where the branch holds learned maps, the
definition in ``retrofit/analysis/residual.py``; every model's docstring says where they are.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IMAGE = (3, 16, 16)


def image(seed: int, batch: int = 2, size: tuple[int, int, int] = IMAGE) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


# --- 1. a block called with a non-default argument: EfficientNet's drop_connect_rate ---------


def drop_connect(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """EfficientNet's per-sample drop connect (Tan & Le 2019; the stochastic depth of Huang et
    al. 2016 under another name)."""
    if not training:
        return x
    keep = 1.0 - p
    mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) + keep
    return x / keep * torch.floor(mask)


class MBConv(nn.Module):
    """Inverted residual with squeeze-excite; ``x + project(...)`` when stride 1 and in == out."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2):
        super().__init__()
        mid = cin * expand
        self.has_skip = stride == 1 and cin == cout
        self.expand = conv_bn(cin, mid, 1)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid)
        self.se_reduce = nn.Conv2d(mid, max(1, cin // 2), 1)
        self.se_expand = nn.Conv2d(max(1, cin // 2), mid, 1)
        self.project = conv_bn(mid, cout, 1)

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None):
        x = F.silu(self.expand(inputs))
        x = F.silu(self.dw(x))
        s = F.adaptive_avg_pool2d(x, 1)
        x = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(s)))) * x
        x = self.project(x)
        if self.has_skip:
            if drop_connect_rate:
                x = drop_connect(x, p=drop_connect_rate, training=self.training)
            x = x + inputs
        return x


class DropConnectEfficientNet(nn.Module):
    """EfficientNet-B0-style: the root passes each block its own rate, ``block(x,
    drop_connect_rate=r)`` with r = rate·idx/n (here built with rate 0.0, drop connect off, so
    the blocks are called with 0.0, not their default None). Sites: the skip adds of blocks 0, 2,
    3 (stride 1, in == out)."""

    def __init__(self, num_classes: int = 10, drop_connect_rate: float = 0.0):
        super().__init__()
        self.drop_connect_rate = drop_connect_rate
        self.stem = conv_bn(3, 4, 3, 2)
        spec = [(4, 4, 1), (4, 8, 2), (8, 8, 1), (8, 8, 1), (8, 16, 2)]
        self.blocks = nn.ModuleList(MBConv(i, o, s) for i, o, s in spec)
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.stem(inputs))
        for idx, block in enumerate(self.blocks):
            rate = self.drop_connect_rate
            rate *= float(idx) / len(self.blocks)
            x = block(x, drop_connect_rate=rate)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --- 2. a state threaded through the blocks: None for the first, a tensor afterwards -----------


class ContextBlock(nn.Module):
    """A basic residual block whose branch is gated by a channel context computed by the block
    before it (None for the first block). Returns ``(out, context)``; site: ``x + h``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        self.context = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        h = self.conv2(F.relu(self.conv1(x)))
        if state is not None:
            h = h * state
        out = F.relu(x + h)
        return out, torch.sigmoid(self.context(F.adaptive_avg_pool2d(out, 1)))


class StateResNet(nn.Module):
    """``x, state = block(x, state)`` over four blocks: four sites, one per block."""

    def __init__(self, num_classes: int = 10, width: int = 6, depth: int = 4):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.blocks = nn.ModuleList(ContextBlock(width) for _ in range(depth))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        state = None
        for block in self.blocks:
            x, state = block(x, state)
        return self.fc(x.mean((2, 3)))


# --- 3. a leaf module's tuple output unpacked: nn.MultiheadAttention ---------------------------


class AttentionBlock(nn.Module):
    """Pre-norm transformer block on ``nn.MultiheadAttention``, whose forward returns
    ``(output, weights)``; sites: ``x + h`` and ``x + mlp(...)``."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        h, _ = self.attn(y, y, y, need_weights=False)
        x = x + h
        return x + self.mlp(self.norm2(x))


class TupleAttentionViT(nn.Module):
    """A two-block ViT: four sites, two per block."""

    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*(AttentionBlock(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class SelfAttention(nn.Module):
    """Multi-head self-attention as HF transformers 5 writes it: the head shape is built with
    ``(*input_shape, -1, head_dim)`` from ``hidden_states.shape[:-1]``; returns
    ``(output, weights)``."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = weights.softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.dense(out), weights


class HFStyleLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim)
        self.layernorm_after = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, 2 * dim)
        self.output = nn.Linear(2 * dim, dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        attention_output, _ = self.attention(self.layernorm_before(hidden_states), attention_mask)
        hidden_states = attention_output + hidden_states
        layer_output = self.output(F.gelu(self.intermediate(self.layernorm_after(hidden_states))))
        return layer_output + hidden_states


class StarShapeViT(nn.Module):
    """Two HF-style layers (``attention_output, _ = self.attention(...)``). Sites: two per
    layer."""

    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embeddings = nn.Conv2d(3, dim, 4, 4)
        self.layer = nn.ModuleList(HFStyleLayer(dim) for _ in range(depth))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embeddings(pixel_values).flatten(2).transpose(1, 2)
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states)
        return self.classifier(hidden_states.mean(1))


# --- 4. None-default tensor arguments at the root (HF's pixel_values=None) ---------------------


class MixerLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, 1),
            nn.BatchNorm2d(dim),
        )
        self.norm = nn.BatchNorm2d(dim)


class OptionalInputMixer(nn.Module):
    """A ConvMixer-like network (Trockman & Kolter 2022) with an HF-style signature:
    ``forward(pixel_values=None, mask=None)``, called with a tensor. The residual
    ``x + layer.spatial(x)`` (a depthwise then a pointwise conv) is written in the root's loop.
    Sites: two, owned by the root."""

    def __init__(self, num_classes: int = 10, dim: int = 8, depth: int = 2):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, dim, 2, 2), nn.GELU(), nn.BatchNorm2d(dim))
        self.layers = nn.ModuleList(MixerLayer(dim) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(
        self, pixel_values: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        x = self.embed(pixel_values)
        if mask is not None:
            x = x * mask
        for layer in self.layers:
            x = layer.norm(x + layer.spatial(x))
        return self.head(x.mean((2, 3)))


# --- 5. *args/**kwargs wrappers around forward ------------------------------------------------


def checkpointable(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Activation checkpointing as a decorator, the way many codebases add it to their blocks."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "grad_checkpointing", False) and self.training:
            return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
        return forward(self, *args, **kwargs)

    return wrapper


class DecoratedBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        self.grad_checkpointing = False

    @checkpointable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class DecoratedForwardNet(nn.Module):
    """Blocks whose ``forward`` is wrapped by a ``functools.wraps`` decorator taking
    ``(self, *args, **kwargs)``. Sites: one per block, two blocks."""

    def __init__(self, num_classes: int = 10, width: int = 6):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.blocks = nn.Sequential(DecoratedBlock(width), DecoratedBlock(width))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


class CheckpointingLayer(nn.Module):
    """HF transformers' ``GradientCheckpointingLayer`` pattern: ``__call__(self, *args,
    **kwargs)`` overridden to checkpoint the module's call in training."""

    gradient_checkpointing = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.gradient_checkpointing and self.training:
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


class WrappedForwardLayer(nn.Module):
    """HF transformers 5's ``GradientCheckpointingLayer``: ``__init_subclass__`` replaces each
    subclass's ``forward`` by a ``functools.wraps`` wrapper ``(self, *args, **kwargs)``."""

    gradient_checkpointing = False

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        forward = cls.forward

        @functools.wraps(forward)
        def forward_with_checkpointing(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
            return forward(self, *args, **kwargs)

        cls.forward = forward_with_checkpointing


def _build_encoder_layer(layer: nn.Module, dim: int) -> None:
    layer.layernorm_before = nn.LayerNorm(dim)
    layer.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
    layer.layernorm_after = nn.LayerNorm(dim)
    layer.intermediate = nn.Linear(dim, 2 * dim)
    layer.output = nn.Linear(2 * dim, dim)


class EncoderLayer(CheckpointingLayer):
    """HF-style layer: keyword arguments with None defaults, a tuple output."""

    def __init__(self, dim: int):
        super().__init__()
        _build_encoder_layer(self, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        normed = self.layernorm_before(hidden_states)
        attn, weights = self.attention(
            normed, normed, normed, attn_mask=attention_mask, need_weights=output_attentions
        )
        hidden_states = attn + hidden_states
        layer_output = self.output(F.gelu(self.intermediate(self.layernorm_after(hidden_states))))
        layer_output = layer_output + hidden_states
        return (layer_output, weights) if output_attentions else (layer_output,)


class WrappedEncoderLayer(WrappedForwardLayer):
    def __init__(self, dim: int):
        super().__init__()
        _build_encoder_layer(self, dim)

    forward = EncoderLayer.forward


class CallOverrideEncoder(nn.Module):
    """Two HF-style layers called as ``layer(hidden_states, attention_mask,
    output_attentions=False)[0]``. Sites: two per layer (owners ``layer.0``, ``layer.1``)."""

    layer_class: type[nn.Module] = EncoderLayer

    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embeddings = nn.Conv2d(3, dim, 4, 4)
        self.layer = nn.ModuleList(self.layer_class(dim) for _ in range(depth))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        hidden_states = self.embeddings(pixel_values).flatten(2).transpose(1, 2)
        for layer_module in self.layer:
            layer_outputs = layer_module(hidden_states, None, output_attentions=output_attentions)
            hidden_states = layer_outputs[0]
        return self.classifier(hidden_states.mean(1))


class SubclassWrappedEncoder(CallOverrideEncoder):
    """The same encoder with transformers 5's forward-wrapping layer base."""

    layer_class = WrappedEncoderLayer


# --- 6. shape-dependent control flow -----------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm for channels-first maps and token sequences alike (ConvNeXt/HF style): it
    branches on ``x.ndim``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma * h


class NdimNormConvNeXt(nn.Module):
    """ConvNeXt blocks whose norm branches on ``x.ndim``; the root's norm too. Sites: one per
    block, three blocks."""

    def __init__(self, num_classes: int = 10, dim: int = 8, depth: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim))
        self.stages = nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth)))
        self.norm = LayerNorm2d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class WindowBlock(nn.Module):
    """Swin-style block on a (B, H, W, C) map: the window is ``min(window_size, H, W)``, the map
    is padded to a multiple of it (sizes from ``x.shape``), attention runs per window. Sites:
    ``shortcut + attention`` and ``x + mlp(...)``."""

    def __init__(self, dim: int, window_size: int = 3):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        ws = min(self.window_size, height, width)
        shortcut = x
        x = self.norm1(x)
        pad_b = (ws - height % ws) % ws
        pad_r = (ws - width % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        windows = window_partition(x, ws)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(channels)
        windows = self.proj(attn.softmax(-1) @ v)
        x = window_reverse(windows, ws, hp, wp)[:, :height, :width, :].contiguous()
        x = shortcut + x
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class WindowPadSwin(nn.Module):
    """Two window blocks on a 4×4 map with window 3 (padded to 6×6). Sites: four, two per block."""

    def __init__(self, num_classes: int = 10, dim: int = 8, depth: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(*(WindowBlock(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        return self.head(self.blocks(x).mean((1, 2)))


# --- 7. an assert on an argument ---------------------------------------------------------------


class DualStreamBlock(nn.Module):
    """Two streams mixed, each with its own residual: ``x1 + branch1(h)``, ``x2 + branch2(h)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.mix = conv_bn(2 * channels, channels, 1)
        self.branch1 = conv_bn(channels, channels)
        self.branch2 = conv_bn(channels, channels)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor | None = None):
        assert x2 is not None, "DualStreamBlock needs both streams"
        h = F.relu(self.mix(torch.cat([x1, x2], dim=1)))
        return x1 + self.branch1(h), x2 + self.branch2(h)


class DualStreamNet(nn.Module):
    """Two blocks, two sites each."""

    def __init__(self, num_classes: int = 10, width: int = 4, depth: int = 2):
        super().__init__()
        self.stem1 = conv_bn(3, width)
        self.stem2 = conv_bn(3, width, 5)
        self.blocks = nn.ModuleList(DualStreamBlock(width) for _ in range(depth))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = F.relu(self.stem1(x)), F.relu(self.stem2(x))
        for block in self.blocks:
            x1, x2 = block(x1, x2)
        return self.fc(torch.cat([x1, x2], 1).mean((2, 3)))


# --- 8. an owner that cannot be read in training mode only --------------------------------------


class NoisyBlock(nn.Module):
    """A residual block with multiplicative Gaussian noise on its branch in training, only when
    the batch has more than one sample: ``if self.training and x.size(0) > 1`` reads a shape in
    training mode only (short-circuit in eval)."""

    def __init__(self, channels: int, sigma: float = 0.0):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        if self.training and x.size(0) > 1:
            out = out * torch.empty_like(out).normal_(1.0, self.sigma)
        return F.relu(x + out)


class PlainBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class TrainOnlyFailureNet(nn.Module):
    """Three blocks, the middle one noisy (sigma 0: the noise is off, the code path is not). A
    model applied after ``model.eval()``: the analysis reads the eval graph; a rewrite that
    re-traces the owners in training mode fails on the middle block after the first one is done.
    Sites: three, one per block."""

    def __init__(self, num_classes: int = 10, width: int = 6):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.blocks = nn.Sequential(PlainBlock(width), NoisyBlock(width), PlainBlock(width))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


# --- 9. an encoder returning a list of feature maps ---------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cout // 2
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride)
        self.conv3 = conv_bn(mid, cout, 1)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + identity)


class FeatureListEncoder(nn.Module):
    """A segmentation-style ResNet encoder: ``forward`` returns ``[c1, c2, c3]``, the outputs of
    its three stages at strides 2, 4, 8. Sites: six bottlenecks (two per stage), each its own."""

    def __init__(self, widths: tuple[int, ...] = (8, 12, 16)):
        super().__init__()
        self.stem = conv_bn(3, widths[0], 3, 2)
        cin = widths[0]
        for i, w in enumerate(widths):
            stage = nn.Sequential(Bottleneck(cin, w, 1 if i == 0 else 2), Bottleneck(w, w))
            self.add_module(f"layer{i + 1}", stage)
            cin = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.stem(x))
        features = []
        for name in ("layer1", "layer2", "layer3"):
            x = getattr(self, name)(x)
            features.append(x)
        return features


# --- 10. data-dependent control flow at the root: an early-exit network --------------------------


class EarlyExitNet(nn.Module):
    """BranchyNet-style early exit (Teerapittayanon et al. 2016): in eval, a confident first exit
    returns at once; in training both exits are computed. The root reads a tensor's value; its
    blocks are plain. Sites: one per block, four blocks."""

    def __init__(self, num_classes: int = 10, width: int = 6, threshold: float = 0.99):
        super().__init__()
        self.threshold = threshold
        self.stem = conv_bn(3, width)
        self.early = nn.Sequential(PlainBlock(width), PlainBlock(width))
        self.late = nn.Sequential(PlainBlock(width), PlainBlock(width))
        self.exit1 = nn.Linear(width, num_classes)
        self.exit2 = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.early(F.relu(self.stem(x)))
        logits1 = self.exit1(h.mean((2, 3)))
        if not self.training and logits1.softmax(-1).max() > self.threshold:
            return logits1
        logits2 = self.exit2(self.late(h).mean((2, 3)))
        return (logits1 + logits2) / 2 if self.training else logits2


# --- 11. an HF-style *DropPath module already on the branch -------------------------------------


class TinyDropPath(nn.Module):
    """Per-sample drop path written the way HF writes its ``BeitDropPath``/``SwinDropPath``: a
    ``drop_prob`` attribute, identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        random_tensor = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return hidden_states.div(keep_prob) * torch.floor(random_tensor + keep_prob)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class MlpBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        # HF and timm build an Identity where the linear schedule gives rate 0 (block 0)
        self.drop_path = TinyDropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class OwnDropPathMixer(nn.Module):
    """Three MLP blocks with drop path 0, 0.05, 0.1 (linear schedule). Sites: three, each with
    a drop-path slot that must be reused (set to retrofit's rate or replaced in place), not
    doubled by a second gate."""

    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 3, rate: float = 0.1):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        rates = [rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(MlpBlock(dim, r) for r in rates))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


# --- the cases --------------------------------------------------------------------------------


# --- issue 22, class 1: an in-place activation inside a wrapper module -------------------------


class Activation(nn.Module):
    """A library's activation wrapper (``get_act("relu")``): the in-place op is its child's."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


class WrappedActBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        self.act1 = Activation()
        self.act2 = Activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))) + x)


class WrappedInplaceActNet(nn.Module):
    """Residual blocks ending in ``act(f(x) + x)`` where ``act`` wraps ``nn.ReLU(inplace=True)``:
    a dropped branch must not hand the shortcut itself to the in-place ReLU, which would
    overwrite the block input that the previous ReLU's backward needs. Sites: one per block."""

    def __init__(self, num_classes: int = 10, width: int = 6):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.act = Activation()
        self.blocks = nn.Sequential(*[WrappedActBlock(width) for _ in range(3)])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.act(self.stem(x))).mean((2, 3)))


class InplaceScale(nn.Module):
    """A learned per-channel scale applied in place: it holds a parameter, so nothing about the
    module says that it writes its input (no ``inplace`` attribute, no in-place child)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.scale)


class InplaceScaleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)
        self.scale = InplaceScale(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.scale(self.conv2(F.relu(self.conv1(x))) + x))


class HiddenInplaceNet(nn.Module):
    """``relu(scale(f(x) + x))`` with ``scale`` writing in place: a dropped branch hands the
    shortcut (the previous ReLU's output, saved for its backward) to ``scale``. No static rule
    sees it; only a training step with the branches dropped does. Sites: one per block."""

    def __init__(self, num_classes: int = 10, width: int = 6):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.blocks = nn.Sequential(*[InplaceScaleBlock(width) for _ in range(2)])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


# --- issue 22, classes 3-6: DropBlock planning, lint ------------------------------------------


class AuxOutputBlock(nn.Module):
    """A residual block returning ``(y, aux)``, ``aux`` computed before ``y`` (a deep-supervision
    or feature-pyramid side output): the block's call is a tuple, its map is made inside."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        identity = x if self.down is None else self.down(x)
        h = F.relu(self.conv1(x))
        aux = h.mean((2, 3))
        return F.relu(self.conv2(h) + identity), aux


class AuxOutputNet(nn.Module):
    """Three stages of two tuple-returning blocks: ``x, aux = block(x)`` in the root's loop."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layer1 = nn.ModuleList([AuxOutputBlock(8, 8), AuxOutputBlock(8, 8)])
        self.layer2 = nn.ModuleList([AuxOutputBlock(8, 16, 2), AuxOutputBlock(16, 16)])
        self.layer3 = nn.ModuleList([AuxOutputBlock(16, 32, 2), AuxOutputBlock(32, 32)])
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        side = []
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                x, aux = block(x)
                side.append(aux.mean())
        return self.fc(x.mean((2, 3))) + torch.stack(side).sum()


class CifarFlattenNet(nn.Module):
    """A 32-px CIFAR ResNet whose classifier flattens the last map: it only runs at 32×32, so
    planning must probe at the example input, not at the default 224²."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layer1 = Bottleneck(8, 8)
        self.layer2 = Bottleneck(8, 16, 2)
        self.layer3 = Bottleneck(16, 32, 2)
        self.fc = nn.Linear(32 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.stem(x)))))
        return self.fc(x.flatten(1))


def sequential_resnet() -> nn.Sequential:
    """A ResNet built as nested ``nn.Sequential``s: no module with code of its own calls a stage."""
    return nn.Sequential(
        conv_bn(3, 8),
        nn.ReLU(),
        nn.Sequential(Bottleneck(8, 8), Bottleneck(8, 8)),
        nn.Sequential(Bottleneck(8, 16, 2), Bottleneck(16, 16)),
        nn.Sequential(Bottleneck(16, 32, 2), Bottleneck(32, 32)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class NdimBatchNorm(nn.BatchNorm2d):
    """A BatchNorm that also takes (N, C, L) sequences: a subclass with code, so it is traced
    into, and in training mode its forward bumps ``num_batches_tracked``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return super().forward(x.unsqueeze(-1)).squeeze(-1)
        return super().forward(x)


class DropoutBeforeNdimBN(nn.Module):
    """conv → NdimBatchNorm → Dropout → conv → BatchNorm: one finding for lint."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = NdimBatchNorm(4)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.drop(self.bn1(self.conv1(x)))))


# --- issue 22, class 2: nested residual branches in one owner ----------------------------------


class UpBlock(nn.Module):
    """A decoder step: ``h = x + res(x)`` then ``up(h) + skip``. The second add's branch
    ``up(h)`` holds the first site whole, so outlining it moves the first gate into it."""

    def __init__(self, channels: int):
        super().__init__()
        self.res = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.up = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = x + self.res(x)
        return self.up(h) + skip


class NestedBranchNet(nn.Module):
    """An encoder map decoded with the stem's map as the skip. Sites: two, both in ``dec``."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.enc = conv_bn(width, width)
        self.dec = UpBlock(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return self.fc(self.dec(F.relu(self.enc(x)), x).mean((2, 3)))


# --- issue 22, class 7: torch calls on traced values -------------------------------------------


class CausalAttention(nn.Module):
    """Masked attention filling with ``-torch.finfo(q.dtype).max`` (HF's idiom)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, -torch.finfo(q.dtype).max)
        return self.proj(scores.softmax(-1) @ v)


class CausalBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinfoViT(nn.Module):
    """Sites: two per block (attention, MLP)."""

    def __init__(self, num_classes: int = 10, dim: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(CausalBlock(dim), CausalBlock(dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


class OddPadBlock(nn.Module):
    """Pads odd maps with a size computed by ``torch.as_tensor`` on the map's shape."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        odd = torch.as_tensor([h, w]) % 2
        y = F.pad(x, (1, 1 + int(odd[1]), 1, 1 + int(odd[0])))
        return F.relu(x + self.bn(self.conv(y))[..., :h, :w])


class AsTensorPadNet(nn.Module):
    """Sites: one per block."""

    def __init__(self, num_classes: int = 10, width: int = 6):
        super().__init__()
        self.stem = conv_bn(3, width, 3, 2)
        self.blocks = nn.Sequential(OddPadBlock(width), OddPadBlock(width))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


# --- issue 22, class 8: residuals missed -------------------------------------------------------


class ReducingBlock(nn.Module):
    """A transformer block that ends in a projection to the next stage's width. Every way out of
    its two residual adds goes through ``reduce`` (what an attention-internal add looks like),
    but the author marked both branches with their own ``drop_path1``/``drop_path2`` slots."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop_path2 = nn.Identity()
        self.reduce = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.reduce(x)


class MarkedReducingViT(nn.Module):
    """Sites: two per block, both marked by the author's drop-path slots."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.Sequential(ReducingBlock(8, 12), ReducingBlock(12, 16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


class PoolAttention(nn.Module):
    """MViT-style attention: q, k and v pooled over the token grid, projected to ``dim_out``."""

    def __init__(self, dim: int, dim_out: int, stride: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.pool = nn.MaxPool2d(3, stride, 1) if stride > 1 else nn.Identity()
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, h, w = x.shape[0], *hw

        def pool(t: torch.Tensor) -> torch.Tensor:
            t = t.transpose(1, 2).reshape(b, -1, h, w)
            return self.pool(t).flatten(2).transpose(1, 2)

        q, k, v = (pool(t) for t in self.qkv(x).chunk(3, -1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return self.proj(scores.softmax(-1) @ v)


class PoolBlock(nn.Module):
    """MViTv2's block that changes dimension: the attention's shortcut is the normed input
    pooled like the queries (tokens → map → max-pool → ``flatten(2)`` → tokens) and projected."""

    def __init__(self, dim: int, dim_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PoolAttention(dim, dim_out, stride)
        self.shortcut_pool = nn.MaxPool2d(3, stride, 1) if stride > 1 else None
        self.shortcut_proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.norm2 = nn.LayerNorm(dim_out)
        self.mlp = nn.Sequential(
            nn.Linear(dim_out, 2 * dim_out), nn.GELU(), nn.Linear(2 * dim_out, dim_out)
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        b, c, (h, w) = x.shape[0], x.shape[2], hw
        x_norm = self.norm1(x)
        shortcut = x_norm if self.shortcut_proj is not None else x
        if self.shortcut_pool is not None:
            grid = shortcut.transpose(1, 2).reshape(b, c, h, w)
            shortcut = self.shortcut_pool(grid).flatten(2).transpose(1, 2)
        if self.shortcut_proj is not None:
            shortcut = self.shortcut_proj(shortcut)
        x = shortcut + self.attn(x_norm, hw)
        x = x + self.mlp(self.norm2(x))
        return x, (math.ceil(h / self.stride), math.ceil(w / self.stride))


class PoolViT(nn.Module):
    """Sites: two per block, the attention residual of the block that pools and widens too."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)  # 4×4 tokens on the tests' 16-px images
        self.blocks = nn.ModuleList([PoolBlock(8, 8, 1), PoolBlock(8, 16, 2), PoolBlock(16, 16, 1)])
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        hw = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x, hw = blk(x, hw)
        return self.head(x.mean(1))


class ConvActUnit(nn.Module):
    """A residual unit of one conv-norm-act against a conv-norm projection shortcut (a
    downsampling unit). Where RepVGG sums parallel conv-norm maps (linear, re-parameterisable
    into one conv), this branch applies an activation to its map."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )
        self.shortcut = conv_bn(cin, cout, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.branch(x))


class ConvUnitNet(nn.Module):
    """Sites: one per unit."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.blocks = nn.Sequential(ConvActUnit(8, 16), ConvActUnit(16, 32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


class GhostModule(nn.Module):
    """GhostNet's feature map: a 1×1 primary conv, a cheap depthwise conv of its output, both
    concatenated (Han et al. 2020)."""

    def __init__(self, cin: int, cout: int, act: bool = True):
        super().__init__()
        init = cout // 2
        self.primary_conv = nn.Sequential(
            conv_bn(cin, init, 1), nn.ReLU() if act else nn.Identity()
        )
        self.cheap_operation = nn.Sequential(
            conv_bn(init, init, 3, groups=init), nn.ReLU() if act else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        return torch.cat([x1, self.cheap_operation(x1)], 1)


class GhostBottleneck(nn.Module):
    """timm's GhostBottleneck: ghost → (strided depthwise) → ghost, and a shortcut that is the
    identity, or a depthwise conv-BN followed by a pointwise conv-BN when the block changes
    width or stride: two learned maps in the shortcut, one of them depthwise."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.conv_dw = conv_bn(mid, mid, 3, stride, groups=mid) if stride > 1 else None
        self.ghost2 = GhostModule(mid, cout, act=False)
        if cin == cout and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.conv_dw(x)
        x = self.ghost2(x)
        return x + self.shortcut(shortcut)


class ConvBNConvUnit(nn.Module):
    """A downsampling residual unit whose projection shortcut is conv → BN → conv (two dense
    maps in sequence, no activation) around a three-conv branch."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cout, 3, 2), nn.ReLU(), conv_bn(cout, cout), nn.ReLU(), conv_bn(cout, cout)
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, 2), nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class TwoMapShortcutNet(nn.Module):
    """Sites: every ghost bottleneck (the two that project included) and the conv-BN-conv unit."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.blocks = nn.Sequential(
            GhostBottleneck(8, 16, 8),
            GhostBottleneck(8, 24, 16, 2),
            GhostBottleneck(16, 32, 16),
            GhostBottleneck(16, 32, 24),
        )
        self.unit = ConvBNConvUnit(24, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.unit(self.blocks(F.relu(self.stem(x)))).mean((2, 3)))


class OneChannelUnit(nn.Module):
    """MONAI's ResidualUnit with one subunit: a strided conv-norm-act against a strided conv
    shortcut. The first unit of a network on one-channel scans (CT, MRI, X-ray) reads one
    input channel, so neither conv has channels to mix; the branch's map is a full conv all
    the same."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.PReLU())
        self.residual = nn.Conv2d(cin, cout, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class OneChannelNet(nn.Module):
    """Sites: both units, the one reading the single input channel included (16×16 scans)."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.down1 = OneChannelUnit(1, 8)
        self.down2 = OneChannelUnit(8, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.down2(self.down1(x)).mean((2, 3)))


def scripted_swish(x: torch.Tensor) -> torch.Tensor:
    """Swish as a TorchScript function (EfficientNet ports' memory-efficient activations)."""
    return x * torch.sigmoid(x)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; models use it
    swish = torch.jit.script(scripted_swish)


class ScriptActBlock(nn.Module):
    """``swish(x + f(x))`` with ``swish`` a ``torch.jit.script`` function: fx cannot call it on
    a Proxy, so the whole forward was skipped before."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish(x + self.conv2(swish(self.conv1(x))))


class ScriptActNet(nn.Module):
    """Sites: one per block."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.blocks = nn.Sequential(ScriptActBlock(8), ScriptActBlock(8), ScriptActBlock(8))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(swish(self.stem(x))).mean((2, 3)))


class UninstalledShortcutBlock(nn.Module):
    """A basic block whose projection shortcut is held in a plain list (``self.proj = [m]``), so
    it is not a submodule: not in ``state_dict`` or ``named_modules``, and fx cannot name it."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout)
        self.proj = [conv_bn(cin, cout, 1, stride)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.proj[0](x))


class UninstalledShortcutNet(nn.Module):
    """Sites: both blocks."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.blocks = nn.Sequential(
            UninstalledShortcutBlock(8, 16, 2), UninstalledShortcutBlock(16, 16, 1)
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


class SlicedSequentialEncoder(nn.Module):
    """A DPN-style encoder (smp's): stages run as slices of one ``features`` Sequential,
    ``self.features[1:3](x)``: each slice is a new Sequential, not in the module tree, whose
    members are. Sites: the four blocks (a module outside the tree is otherwise one opaque
    call, which would hide them; smp's DPN encoder read zero sites before either way)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, width),
            PlainBlock(width),
            PlainBlock(width),
            conv_bn(width, width, 3, 2),
            PlainBlock(width),
            PlainBlock(width),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features[0](x))
        f1 = self.features[1:3](x)
        f2 = self.features[4:6](F.relu(self.features[3](f1)))
        return self.fc(torch.cat([f1.mean((2, 3)), f2.mean((2, 3))], 1))


# --- issue 22, class 9: residual sites that are not residuals -----------------------------------


class TokenAttention(nn.Module):
    """Attention with separate query, key and value inputs (SAM's ``Attention(q, k, v)``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return self.out_proj(scores.softmax(-1) @ v)


class TwoWayBlock(nn.Module):
    """SAM's two-way attention block: the positional embeddings ``query_pe``/``key_pe`` (both
    computed from the input) are added to the queries and keys of each attention, while the
    values and the residual stream go on without them."""

    def __init__(self, dim: int):
        super().__init__()
        self.self_attn = TokenAttention(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_t2i = TokenAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.cross_i2t = TokenAttention(dim)
        self.norm4 = nn.LayerNorm(dim)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries + query_pe
        queries = self.norm1(queries + self.self_attn(q, q, queries))
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_t2i(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_i2t(k, q, queries))
        return queries, keys


class TwoWayNet(nn.Module):
    """SAM's loop of two-way blocks, then a last token-to-image attention whose queries and keys
    carry the positional embeddings again, in the model's own forward (which the layer-internal
    filter exempts: its head follows the last block).

    Sites: four per block (self-attention, token-to-image, MLP, image-to-token) and the final
    attention's residual; none of the positional-embedding adds."""

    def __init__(self, num_classes: int = 10, dim: int = 8, tokens: int = 3):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.key_pe = nn.Conv2d(3, dim, 4, 4)  # a dense prompt embedding, read from the image
        self.prompt = nn.Linear(dim, tokens * dim)  # point embeddings, read from the image
        self.layers = nn.ModuleList([TwoWayBlock(dim), TwoWayBlock(dim)])
        self.final_attn = TokenAttention(dim)
        self.norm_final = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.embed(x).flatten(2).transpose(1, 2)
        key_pe = self.key_pe(x).flatten(2).transpose(1, 2)
        query_pe = self.prompt(keys.mean(1)).reshape(x.shape[0], self.tokens, -1)
        queries = query_pe
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe, key_pe)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm_final(queries + self.final_attn(q, k, keys))
        return self.head(queries.mean(1))


class DenseAverageNet(nn.Module):
    """Two basic blocks, then two dense heads on the pooled features averaged: a one-layer head
    and a two-layer head, ``(a + b) / 2`` (an ensemble of heads, a teacher/student pair). One
    operand looks like a projection shortcut and the other a branch, but the sum is a
    prediction: it reaches the output through no learned map, halved.

    Sites: the two blocks; not the average."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.blocks = nn.Sequential(PlainBlock(width), PlainBlock(width))
        self.head_a = nn.Linear(width, num_classes)
        self.head_b = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x))).mean((2, 3))
        return (self.head_a(h) + self.head_b(h)) / 2


class SideOutputNet(nn.Module):
    """Deep supervision (HED, U-Net++): a 1×1 head on each stage's map, upsampled to the input
    size, the side outputs summed into the prediction. The first side output against the rest
    looks like a projection shortcut around the next stage.

    Sites: the stages' residual blocks; none of the side-output sums."""

    def __init__(self, num_classes: int = 2, width: int = 8):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.stage1 = PlainBlock(width)
        self.stage2 = nn.Sequential(conv_bn(width, width, 3, 2), nn.ReLU(), PlainBlock(width))
        self.stage3 = nn.Sequential(conv_bn(width, width, 3, 2), nn.ReLU(), PlainBlock(width))
        self.side1 = nn.Conv2d(width, num_classes, 1)
        self.side2 = nn.Conv2d(width, num_classes, 1)
        self.side3 = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        f1 = self.stage1(F.relu(self.stem(x)))
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        s1 = self.side1(f1)
        s2 = F.interpolate(self.side2(f2), size=size, mode="bilinear", align_corners=False)
        s3 = F.interpolate(self.side3(f3), size=size, mode="bilinear", align_corners=False)
        return s1 + s2 + s3


# --- issue 22, recall: re-parameterisable blocks summed identity-first ---------------------------


class RepBlock(nn.Module):
    """smp's MobileOne block, as its encoder (and timm's fastvit.py) writes it: the identity
    branch (a BatchNorm, only at stride 1 with in == out) added *first*, then the parallel
    conv-BN branches one by one (Vasu et al. 2023). ``groups == cin`` is the depthwise block."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 1
    ):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            [conv_bn(cin, cout, k, stride, groups) for _ in range(branches)]
        )
        self.rbr_scale = conv_bn(cin, cout, 1, stride, groups) if k > 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for conv in self.rbr_conv:
            out += conv(x)
        return self.act(out)


def rep_blocks() -> list[RepBlock]:
    """A MobileOne stage's depthwise/pointwise pairs: blocks 1-4 have the identity branch."""
    return [
        RepBlock(3, 8, 3, branches=2),  # 0: in != out, no identity branch
        RepBlock(8, 8, 3, groups=8),  # 1: depthwise, scale + one conv
        RepBlock(8, 8, 1),  # 2: pointwise, one conv: identity + one dense map
        RepBlock(8, 8, 3, groups=8, branches=3),  # 3: depthwise, scale + three convs
        RepBlock(8, 8, 1, branches=2),  # 4: pointwise, two convs
        RepBlock(8, 8, 3, stride=2, groups=8, branches=2),  # 5: strided: no identity branch
        RepBlock(8, 16, 1, branches=2),  # 6: in != out
    ]


class MobileOneNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*rep_blocks())
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


@dataclass(frozen=True)
class WildCase:
    """One failure class: how to build the model, its sites by construction, what a user wants.

    ``expect``: ``"instrumented"`` (apply must return, verified and live) or ``"either"``
    (instrumented and live, or refused with a retrofit error and the model as it came).
    ``owners``: module → number of sites it owns. ``eval_first``: apply after ``model.eval()``.
    """

    name: str
    build: Callable[[], nn.Module]
    owners: dict[str, int]
    expect: str = "instrumented"
    eval_first: bool = False
    failure: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> int:
        return sum(self.owners.values())


CASES: list[WildCase] = [
    WildCase(
        "drop_connect_arg",
        DropConnectEfficientNet,
        {"blocks.0": 1, "blocks.2": 1, "blocks.3": 1},
        failure="blocks called as block(x, drop_connect_rate=r), a non-default argument",
    ),
    WildCase(
        "state_threaded",
        StateResNet,
        {f"blocks.{i}": 1 for i in range(4)},
        failure="block(x, state): None for the first block, a tensor afterwards",
    ),
    WildCase(
        "tuple_leaf_unpacked",
        TupleAttentionViT,
        {"blocks.0": 2, "blocks.1": 2},
        failure="h, _ = self.attn(...): a leaf module's tuple output unpacked",
    ),
    WildCase(
        "star_shape_attention",
        StarShapeViT,
        {"layer.0": 2, "layer.1": 2},
        failure="HF attention: attention_output, _ = self.attention(...) with a head shape "
        "built as (*input_shape, -1, head_dim)",
    ),
    WildCase(
        "none_default_root",
        OptionalInputMixer,
        {"": 2},
        failure="forward(pixel_values=None, mask=None) called with a tensor",
    ),
    WildCase(
        "decorated_forward",
        DecoratedForwardNet,
        {"blocks.0": 1, "blocks.1": 1},
        failure="a functools.wraps decorator making forward(self, *args, **kwargs)",
    ),
    WildCase(
        "call_override",
        CallOverrideEncoder,
        {"layer.0": 2, "layer.1": 2},
        failure="HF GradientCheckpointingLayer: __call__(self, *args, **kwargs) overridden",
    ),
    WildCase(
        "subclass_wrapped_forward",
        SubclassWrappedEncoder,
        {"layer.0": 2, "layer.1": 2},
        failure="transformers 5 GradientCheckpointingLayer: __init_subclass__ wraps forward "
        "as (self, *args, **kwargs)",
    ),
    WildCase(
        "ndim_branch",
        NdimNormConvNeXt,
        {"stages.0": 1, "stages.1": 1, "stages.2": 1},
        failure="a norm layer branching on x.ndim",
    ),
    WildCase(
        "window_padding",
        WindowPadSwin,
        {"blocks.0": 2, "blocks.1": 2},
        failure="window = min(window_size, H, W), padding computed from x.shape",
    ),
    WildCase(
        "assert_on_argument",
        DualStreamNet,
        {"blocks.0": 2, "blocks.1": 2},
        failure="assert x2 is not None on an argument with a None default",
    ),
    WildCase(
        "raises_mid_rewrite",
        TrainOnlyFailureNet,
        {"blocks.0": 1, "blocks.1": 1, "blocks.2": 1},
        expect="either",
        eval_first=True,
        failure="an owner whose re-trace fails in training mode only, after another is rewritten",
    ),
    WildCase(
        "feature_list_encoder",
        FeatureListEncoder,
        {f"layer{s}.{b}": 1 for s in (1, 2, 3) for b in (0, 1)},
        failure="an encoder returning a list of feature maps",
        extra={"stages": ["layer1", "layer2", "layer3"]},
    ),
    WildCase(
        "data_dependent_root",
        EarlyExitNet,
        {"early.0": 1, "early.1": 1, "late.0": 1, "late.1": 1},
        failure="the root reads a tensor's value (early exit); its blocks are plain",
    ),
    WildCase(
        "own_drop_path",
        OwnDropPathMixer,
        {"blocks.0": 1, "blocks.1": 1, "blocks.2": 1},
        failure="an HF-style *DropPath module (drop_prob) already on the residual branch",
        extra={"slots": ["blocks.0.drop_path", "blocks.1.drop_path", "blocks.2.drop_path"]},
    ),
    WildCase(
        "wrapped_inplace_act",
        WrappedInplaceActNet,
        {f"blocks.{i}": 1 for i in range(3)},
        failure="issue 22 class 1: act(f(x) + x) with act a wrapper of nn.ReLU(inplace=True)",
    ),
    WildCase(
        "hidden_inplace",
        HiddenInplaceNet,
        {"blocks.0": 1, "blocks.1": 1},
        expect="either",
        failure="issue 22 class 1: a module with parameters writing the residual sum in place",
    ),
    WildCase(
        "nested_branches",
        NestedBranchNet,
        {"dec": 2},
        failure="issue 22 class 2: up(x + res(x)) + skip, one site inside the other's branch",
    ),
    WildCase(
        "finfo_of_traced_dtype",
        FinfoViT,
        {"blocks.0": 2, "blocks.1": 2},
        failure="issue 22 class 7: -torch.finfo(q.dtype).max in attention (zero sites before)",
    ),
    WildCase(
        "as_tensor_of_traced_shape",
        AsTensorPadNet,
        {"blocks.0": 1, "blocks.1": 1},
        failure="issue 22 class 7: torch.as_tensor([h, w]) on a traced shape (zero sites before)",
    ),
    WildCase(
        "drop_path_marked_before_projection",
        MarkedReducingViT,
        {"blocks.0": 2, "blocks.1": 2},
        failure="issue 22 class 8: residuals marked by the author's drop_path1/2, in a block "
        "ending in a projection (filtered as layer-internal adds before)",
    ),
    WildCase(
        "positional_embedding_adds",
        TwoWayNet,
        {"layers.0": 4, "layers.1": 4, "": 1},
        failure="issue 22 class 9: q = queries + query_pe, both computed from the input (SAM's "
        "two-way transformer): the sum feeds a query, the values and the stream go on without it",
    ),
    WildCase(
        "pooled_projected_shortcut",
        PoolViT,
        {"blocks.0": 2, "blocks.1": 2, "blocks.2": 2},
        failure="issue 22 class 8: the attention residual of a block that changes dimension, "
        "its shortcut pooled (tokens made a map, pooled, flatten(2) back) and projected",
    ),
    WildCase(
        "conv_branch_conv_shortcut",
        ConvUnitNet,
        {"blocks.0": 1, "blocks.1": 1},
        failure="issue 22 class 8: one conv-norm-act branch against a conv-norm projection "
        "shortcut, read as RepVGG's parallel maps (zero sites before)",
    ),
    WildCase(
        "sliced_sequential",
        SlicedSequentialEncoder,
        {"features.1": 1, "features.2": 1, "features.4": 1, "features.5": 1},
        failure="issue 22 class 8: stages run as slices of a Sequential (smp's DPN encoder): "
        "new Sequentials outside the module tree, traced through, not one opaque call",
    ),
    WildCase(
        "dense_head_average",
        DenseAverageNet,
        {"blocks.0": 1, "blocks.1": 1},
        failure="issue 22 class 9: (head_a(h) + head_b(h)) / 2 read as a projection shortcut "
        "around a branch (an extra site at the root before)",
    ),
    WildCase(
        "side_output_sum",
        SideOutputNet,
        {"stage1": 1, "stage2.2": 1, "stage3.2": 1},
        failure="issue 22 class 9: deep-supervision side outputs summed into the prediction "
        "(an extra site at the root before)",
    ),
    WildCase(
        "two_map_projection_shortcut",
        TwoMapShortcutNet,
        {"blocks.0": 1, "blocks.1": 1, "blocks.2": 1, "blocks.3": 1, "unit": 1},
        failure="issue 22 class 8: GhostNet's depthwise + pointwise shortcut and a conv-BN-conv "
        "shortcut (two learned maps: not a shortcut before)",
    ),
    WildCase(
        "one_input_channel_conv",
        OneChannelNet,
        {"down1": 1, "down2": 1},
        failure="issue 22 class 8: a conv-norm-act unit reading one input channel, its conv "
        "read as not dense (the first unit of a one-channel medical network missed)",
        extra={"input": (1, 16, 16)},
    ),
    WildCase(
        "scripted_activation",
        ScriptActNet,
        {"blocks.0": 1, "blocks.1": 1, "blocks.2": 1},
        failure="issue 22 class 8: a torch.jit.script activation called in forward (fx passed "
        "it a Proxy: every forward skipped, zero sites)",
    ),
    WildCase(
        "uninstalled_shortcut",
        UninstalledShortcutNet,
        {"blocks.0": 1, "blocks.1": 1},
        failure="issue 22 class 8: a projection shortcut held in a plain list, not a submodule "
        "(fx's 'not installed as a submodule': every forward skipped)",
    ),
    WildCase(
        "identity_first_reparam_sum",
        MobileOneNet,
        {f"blocks.{i}": 1 for i in (1, 2, 3, 4)},
        failure="issue 22 recall: smp's MobileOne adds the identity BN first, then each parallel "
        "conv-BN (`out = scale + identity; out += conv(x)`): the depthwise blocks were missed "
        "and a pointwise one gated at its first partial sum",
    ),
]
