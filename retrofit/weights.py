"""Reading weight files into a model: safetensors, weights-only torch files, retrofit checkpoints.

A core module (the CLI's ``--weights`` and ``retrofit.models`` use it without loading the trainer;
``retrofit.train.checkpoint`` writes the files it reads). Nothing read here executes code:
safetensors, or ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrofit.errors import ModelError

__all__ = ["FORMAT", "load_weights", "read_weights"]

# The ``format`` tag of a retrofit checkpoint (retrofit.train.checkpoint writes it).
FORMAT = "retrofit-checkpoint"


def _unwrap_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj["model"]
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights {str(path)!r}: not a state_dict (a mapping of names to tensors)")
    # Wrappers prefix keys: DDP with "module.", torch.compile with "_orig_mod.".
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` file or a weights-only torch file.

    Raises:
        ModelError: missing file or a file that is neither.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights {str(path)!r}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    is_safetensors = path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{")
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"weights {str(path)!r}: cannot be read as safetensors or a weights-only torch state_dict "
            f"({type(e).__name__}: {e})"
        ) from None
    return _unwrap_state(obj, path)


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load ``path`` (safetensors, a state_dict, or a retrofit checkpoint) into ``model``; in place.

    Raises:
        ModelError: unreadable file, or (``strict``) keys or shapes that do not match the model;
            the message lists the first differences and, for a classifier size mismatch, the
            ``num_classes`` to build the model with.
    """
    path = Path(path)
    state = read_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:4]}")
        if shapes:
            k, theirs, ours = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatch(es), first {k}: {theirs} in the file, {ours} in the model"
            )
        hint = _num_classes_hint(path, shapes)
        raise ModelError(
            f"weights {str(path)!r} do not fit {type(model).__name__}: "
            + "; ".join(parts)
            + (f" ({hint})" if hint else "")
        )
    model.load_state_dict(state, strict=strict)
    return model


def _num_classes_hint(path: Path, shapes: list) -> str | None:
    meta = path.with_name("model.json")
    if meta.is_file():
        try:
            n = json.loads(meta.read_text()).get("num_classes")
        except (OSError, ValueError):
            n = None
        if n:
            return f"these weights are for num_classes={n}: build the model with that"
    if shapes:
        return "a classifier of another size? build the model with the num_classes the weights were trained for"
    return None
