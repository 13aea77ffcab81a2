"""What a classifier's forward returns → the logits the loss and the metrics read.

torchvision and timm models return a tensor; others wrap it. Hugging Face transformers returns a
``ModelOutput`` (``ImageClassifierOutput(loss=None, logits=…)``, a dict subclass whose ``None``
fields are left out of its tuple form), Lightning and hand-written models often a dict
(``{"logits": …}``) or a tuple whose first element is the prediction and the rest auxiliary
outputs (torchvision's Inception/GoogLeNet in training: ``(logits, aux_logits…)``). The trainer
calls :func:`logits_of` at every site that reads a forward's result (training loss and
evaluation alike), so the two cannot disagree about which output is the prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["logits_of"]

# Keys of a mapping output that hold the prediction, in the order they are looked for.
LOGIT_KEYS = ("logits", "logit", "out", "output", "pred", "preds", "prediction")


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor in a model's output.

    A tensor is returned as is; a mapping (HF ``ModelOutput``, a dict) gives its ``logits``
    entry (or another of :data:`LOGIT_KEYS`); a tuple or list its first element (the prediction,
    before auxiliary outputs); a namedtuple or object with a ``logits`` attribute that attribute.

    Raises:
        TypeError: no tensor of logits can be found; the message names the output's type and
            what was looked for.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in LOGIT_KEYS:
            value = output.get(key)
            if value is not None:
                return logits_of(value)
        keys = list(output.keys())
        raise TypeError(
            f"the model returned a {type(output).__name__} with keys {keys}, none of them the "
            f"logits; expected a tensor, or a mapping with one of {list(LOGIT_KEYS)}"
        )
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise TypeError(
        f"the model returned a {type(output).__name__}, not logits; expected a tensor, a "
        f"mapping with 'logits', or a tuple whose first element is the logits"
    )
