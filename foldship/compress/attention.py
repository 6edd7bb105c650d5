"""Attention heads as channel groups, and the exact rewrite that makes torch's attention foldable.

One channel of a "heads" group is one attention head: its q/k/v projection rows and its columns
of the output projection (method.md section 3). With grouped-query attention the channel is a
KV group (one k/v head and the ``n_rep`` query heads that read it), so every KV head keeps the
same number of query heads. Folding merges whole heads (q/k/v rows: mean, output columns: sum);
dims within a head are never mixed (q.k contracts them, RoPE pairs dim i with i + head_dim/2).

Torch-Pruning cannot group heads (and can hang trying: ecosystem.md section 1), so the q/k/v
projections are hidden from the tracer and the groups come from the finder registered below,
which recognises attention blocks by structure:

- BERT-style: ``.self.query/key/value`` and ``.output.dense`` (transformers' BertAttention and
  the encoders copied from it);
- LLaMA-style: ``q_proj/k_proj/v_proj/o_proj`` with ``head_dim`` (transformers' Llama, Mistral,
  Qwen2, ...; GQA through ``num_key_value_groups``);
- ``HeadAttention``: foldship's stand-in for ``nn.MultiheadAttention`` (torchvision ViT), whose
  packed projections cannot hold fewer heads than ``embed_dim / head_dim``; ``rewrite_attention``
  swaps one for the other without changing what the model computes.

After heads are removed, the head counts are patched on the attention module and, once every
layer sharing a Hugging Face config has the same count, on that config (``head_dim`` is pinned
so the config still describes the model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .groups import GroupSpec, register_group_finder, register_rewrite


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


@register_rewrite
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


@dataclass
class HeadLayout:
    """Where one attention block keeps its heads."""

    name: str  # the attention module: also the group's name
    q: str
    k: str
    v: str
    out: str
    head_dim: int
    n_rep: int  # query heads per KV head (1 without GQA)
    patch: Callable[[int], None]  # sets head-count attributes from the new number of query heads
    config: object = None  # a Hugging Face config shared with other layers, if any

    def spec(self, modules: dict[str, nn.Module], after_remove: Callable[[int], None]) -> GroupSpec:
        q_width = self.n_rep * self.head_dim
        units = modules[self.k].out_features // self.head_dim
        q_table = torch.arange(units * q_width).reshape(units, q_width)
        kv_table = torch.arange(units * self.head_dim).reshape(units, self.head_dim)
        items = [(self.q, "out", q_table), (self.k, "out", kv_table), (self.v, "out", kv_table),
                 (self.out, "in", q_table)]
        return GroupSpec(self.name, "heads", items, hide=[self.q, self.k, self.v], after_remove=after_remove)


def _set(module: nn.Module, **values) -> None:
    for attr, value in values.items():
        if hasattr(module, attr):
            setattr(module, attr, value)


def _bert_layout(name: str, module: nn.Module) -> HeadLayout | None:
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if not (all(isinstance(getattr(inner, a, None), nn.Linear) for a in ("query", "key", "value"))
            and isinstance(getattr(output, "dense", None), nn.Linear) and hasattr(inner, "attention_head_size")):
        return None
    size = inner.attention_head_size

    def patch(heads: int) -> None:
        _set(inner, num_attention_heads=heads, all_head_size=heads * size)

    return HeadLayout(name, f"{name}.self.query", f"{name}.self.key", f"{name}.self.value", f"{name}.output.dense",
                      size, 1, patch, getattr(inner, "config", None))


def _llama_layout(name: str, module: nn.Module) -> HeadLayout | None:
    if not (all(isinstance(getattr(module, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and isinstance(getattr(module, "head_dim", None), int)):
        return None
    head_dim, n_rep = module.head_dim, getattr(module, "num_key_value_groups", 1)
    if module.q_proj.out_features != n_rep * module.k_proj.out_features:
        return None  # e.g. gated query projections: not a plain head layout

    def patch(heads: int) -> None:
        _set(module, num_heads=heads, num_attention_heads=heads, num_key_value_heads=heads // n_rep)

    return HeadLayout(name, f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj", f"{name}.o_proj", head_dim, n_rep,
                      patch, getattr(module, "config", None))


def _head_attention_layout(name: str, module: nn.Module, parent: nn.Module) -> HeadLayout | None:
    if not isinstance(module, HeadAttention):
        return None

    def patch(heads: int) -> None:
        module.num_heads = heads
        _set(parent, num_heads=heads)  # torchvision's EncoderBlock records it too

    return HeadLayout(name, f"{name}.q", f"{name}.k", f"{name}.v", f"{name}.out", module.head_dim, 1, patch)


def head_layouts(model: nn.Module) -> list[HeadLayout]:
    """Every attention block of ``model`` whose heads foldship can group, in module order."""
    layouts = []
    for name, module in model.named_modules():
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        layout = _bert_layout(name, module) or _llama_layout(name, module) or \
            _head_attention_layout(name, module, parent)
        if layout is not None:
            layouts.append(layout)
    return layouts


def _sync_config(layout: HeadLayout, sharing: list[HeadLayout], modules: dict[str, nn.Module]) -> None:
    """Write the head counts into a shared Hugging Face config once every layer using it agrees."""
    counts = {modules[other.q].out_features // other.head_dim for other in sharing}
    if layout.config is None or len(counts) != 1:
        return
    heads = counts.pop()
    _set(layout.config, num_attention_heads=heads)
    if hasattr(layout.config, "num_key_value_heads"):
        layout.config.num_key_value_heads = heads // layout.n_rep
        layout.config.head_dim = layout.head_dim  # otherwise derived as hidden_size // num_attention_heads


@register_group_finder
def attention_head_groups(model: nn.Module) -> list[GroupSpec]:
    """One "heads" group per attention block (unit: a head, or a KV group under GQA)."""
    layouts = head_layouts(model)
    modules = dict(model.named_modules())
    specs = []
    for layout in layouts:
        sharing = [other for other in layouts if other.config is not None and other.config is layout.config]

        def after_remove(n_units: int, layout: HeadLayout = layout, sharing: list[HeadLayout] = sharing) -> None:
            layout.patch(n_units * layout.n_rep)
            _sync_config(layout, sharing, modules)

        specs.append(layout.spec(modules, after_remove))
    return specs
