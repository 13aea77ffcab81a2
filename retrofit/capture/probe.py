"""The input a model expects: the size of the probe that analysis and verification run.

Read from what the model says about itself — timm's ``pretrained_cfg``, a ViT's
``patch_embed.img_size``, torchvision's ``image_size``, an HF ``config`` (``image_size``,
``num_channels``) — else 224² with the first convolution's input channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from retrofit.capture import detection

__all__ = ["VIDEO_PROBE", "default_example_input", "fixed_image_size", "probe_input_size"]

# Clip size of torchvision's video classifiers (r3d_18, mc3_18, r2plus1d_18, s3d): 16 frames of
# 112×112 in their weights' transforms.
VIDEO_PROBE = (16, 112, 112)


def probe_input_size(model: nn.Module) -> tuple[int, ...]:
    """The (C, H, W) input a model expects, for probe inputs in verification and analysis;
    (C, T, H, W) for a video model (its first convolution is an ``nn.Conv3d``), (T, C, H, W) for
    an HF video model (its config has ``num_frames``).

    Spatial size: a ViT-style ``patch_embed.img_size`` (timm; it reflects an ``img_size`` kwarg
    that the pretrained config does not), torchvision's ``image_size`` attribute, an HF config's
    ``image_size``, then timm's ``pretrained_cfg`` / ``default_cfg`` ``input_size``, else 224.
    Channels: the first Conv2d's ``in_channels`` when there is no config or it reads fewer
    channels than the config says (so ``in_chans=1`` models get one channel), else the
    config's, else 3.
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)), None)
    frames = _hf_config(model, "num_frames")
    if isinstance(frames, int) and frames > 0:
        # HF's video models (TimeSformer, V-JEPA 2, VideoMT) read (batch, frames, C, H, W).
        c = _hf_config(model, "num_channels")
        size = fixed_image_size(model) or (224, 224)
        return (frames, c if isinstance(c, int) and c > 0 else 3, *size)
    if isinstance(first, nn.Conv3d):
        return (first.in_channels, *VIDEO_PROBE)
    c, h, w = 3, 224, 224
    cfg_size = None
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            cfg_size = tuple(int(v) for v in cfg["input_size"])
            break
    if cfg_size is not None and len(cfg_size) == 3:
        c, h, w = cfg_size
    hf_channels = _hf_config(model, "num_channels")
    if cfg_size is None and isinstance(hf_channels, int) and hf_channels > 0:
        cfg_size, c = (hf_channels, h, w), hf_channels
    fixed = fixed_image_size(model)
    if fixed is not None:
        h, w = fixed
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # timm's config keeps 3 channels when a model is built with in_chans=1, so the first
            # conv decides when it reads fewer; a first conv reading more is behind a
            # space-to-depth stem (TResNet: 48 = 3·4²), where the config is right.
            if cfg_size is None or m.in_channels < c:
                c = m.in_channels
            break
    return (c, h, w)


def _hf_config(model: nn.Module, key: str) -> object:
    config = getattr(model, "config", None)
    if config is None or isinstance(config, Mapping):
        return None
    value = getattr(config, key, None)
    if value is None:
        # Multimodal and video configs keep the image settings in a vision sub-config.
        vision = getattr(config, "vision_config", None)
        value = getattr(vision, key, None) if vision is not None else None
    return value


def _size(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    return None


def fixed_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The image size a model is built for, where it says: timm's ``patch_embed.img_size``,
    torchvision's ``image_size``, an HF config's ``image_size``."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None) if patch_embed is not None else None
    if size is None:
        size = getattr(model, "image_size", None)
    found = _size(size)
    return found if found is not None else _size(_hf_config(model, "image_size"))


def default_example_input(model: nn.Module) -> Any | None:
    """The eval probe the model's own API asks for, when it is not one image batch: a
    torchvision detector's list of images (as positional arguments); else None."""
    if detection.is_detector(model):
        return detection.probe_images(model)
    return None
