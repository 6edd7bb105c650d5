"""``HeadAttention``: ``nn.MultiheadAttention``'s computation with one Linear per projection, so heads
can be removed, and the exact rewrite that swaps one for the other (see ``models/rewrites.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadAttention(nn.Module):
    """``nn.MultiheadAttention``'s computation with separate q/k/v/out Linears and any head count.

    Same forward signature and results as ``nn.MultiheadAttention`` (modules without
    ``add_bias_kv`` / ``add_zero_attn``); heads are removed by slicing the Linears.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout, self.batch_first = num_heads, head_dim, dropout, batch_first
        width = num_heads * head_dim
        self.q = nn.Linear(embed_dim, width, bias)
        self.k = nn.Linear(kdim or embed_dim, width, bias)
        self.v = nn.Linear(vdim or embed_dim, width, bias)
        self.out = nn.Linear(width, embed_dim, bias)

    @staticmethod
    def can_replace(mha: nn.MultiheadAttention) -> bool:
        return mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "HeadAttention":
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.kdim, mha.vdim, mha.in_proj_bias is not None,
                  mha.dropout, mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for layer, weight, bias in zip((new.q, new.k, new.v), weights, biases):
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            new.out.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device).train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length = query.shape[:2]
        q, k, v = (layer(t).view(batch, t.shape[1], -1, self.head_dim).transpose(1, 2)
                   for layer, t in ((self.q, query), (self.k, key), (self.v, value)))
        mask = _additive_mask(attn_mask, key_padding_mask, batch, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, dropout, self.training)  # returned after dropout, as torch does
            heads = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                   is_causal=is_causal and mask is None)
        out = self.out(heads.transpose(1, 2).reshape(batch, length, -1))
        if unbatched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(attn_mask, key_padding_mask, batch: int, dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (bool: True = blocked; float: added) as one additive mask."""
    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # (batch * heads, L, S)
            mask = mask.view(batch, -1, *mask.shape[1:])
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def rewrite_attention(model: nn.Module, example_inputs=None) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by an equivalent ``HeadAttention``.

    Returns how many were replaced; modules ``HeadAttention`` cannot represent are left as they are.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if name and isinstance(m, nn.MultiheadAttention) and HeadAttention.can_replace(m)]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, HeadAttention.from_torch(mha))
    return len(targets)
