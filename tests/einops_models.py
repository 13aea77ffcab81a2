"""A vision transformer written the way vit-pytorch and much paper code write it: einops.

``rearrange``/``repeat`` called by their global names and a ``Rearrange`` layer in the patch
embedding (einops parses its pattern against ``x.shape``, which a symbolic trace cannot give
it); the blocks as pairs in a ``ModuleList`` applied as ``for attn, ff in self.layers: x =
attn(x) + x; x = ff(x) + x``; and CaiT's class attention (Touvron et al. 2021): a learned class
token attends to the patches, ``cls = attn(cls, context=x) + cls``, so the first class-attention
residual's shortcut is a parameter, not a function of the input.

Residual sites by construction: 2 per patch block (``transformer.layers.i``) and 2 per
class-attention block (``cls_transformer.layers.i``); one depth index per block.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        kv_input = x if context is None else torch.cat((x, context), dim=1)
        q = self.to_q(x)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out(rearrange(attn @ v, "b h n d -> b n (h d)"))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
    )


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim), feed_forward(dim, 2 * dim)]) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x, context=context) + x
            x = ff(x) + x
        return x


class EinopsCaiT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2, cls_depth: int = 1, patch: int = 4) -> None:
        super().__init__()
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
            nn.LayerNorm(3 * patch * patch),
            nn.Linear(3 * patch * patch, dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = Transformer(dim, depth)
        self.cls_transformer = Transformer(dim, cls_depth)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 10))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = x + self.pos_embedding[:, :n]
        x = self.transformer(x)
        cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=b)
        cls = self.cls_transformer(cls, context=x)
        return self.head(cls[:, 0])
