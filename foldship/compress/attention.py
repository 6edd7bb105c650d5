"""Attention heads as channel groups (the group finder ``attention_head_groups``).

One channel of a "heads" group is one attention head: its q/k/v projection rows and its columns
of the output projection (docs/method.md section 3). With grouped-query attention the channel is a
KV group (one k/v head and the ``n_rep`` query heads that read it), so every KV head keeps the
same number of query heads. Folding merges whole heads (q/k/v rows: mean, output columns: sum);
dims within a head are never mixed (q.k contracts them, RoPE pairs dim i with i + head_dim/2).

Torch-Pruning cannot group heads (and can hang trying: docs/engine.md, "Group kinds"), so the q/k/v
projections are hidden from the tracer and the groups come from the finder below (``groups.py``
lists it), which recognises attention blocks by structure:

- BERT-style: ``.self.query/key/value`` and ``.output.dense`` (transformers' BertAttention and
  the encoders copied from it);
- LLaMA-style: ``q_proj/k_proj/v_proj/o_proj`` with ``head_dim`` (transformers' Llama, Mistral,
  Qwen2, ...; GQA through ``num_key_value_groups``);
- ``HeadAttention``: foldship's stand-in for ``nn.MultiheadAttention`` (torchvision ViT), whose
  packed projections cannot hold fewer heads than ``embed_dim / head_dim``; the exact rewrite
  ``models.head_attention.rewrite_attention`` swaps one for the other before groups are found.

After heads are removed, the head counts are patched on the attention module and, once every
layer sharing a Hugging Face config has the same count, on that config (``head_dim`` is pinned
so the config still describes the model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.head_attention import HeadAttention
from .views import GroupSpec


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
