"""Exact rewrites: in-place module swaps that make a model's structure foldable without changing what
it computes (packed attention -> per-head projections, a plain option-A pad -> ``PadShortcut``).

Compression and group discovery apply them to their own copy; loading a saved compressed model
applies them to the rebuilt architecture, since its spec names the rewritten layers. The list is
explicit, so importing this module is all it takes to get them (no import-order side effects).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .channel_pad import rewrite_channel_pads
from .head_attention import rewrite_attention

Rewrite = Callable[[nn.Module, object], int]
MODEL_REWRITES: list[Rewrite] = [rewrite_attention, rewrite_channel_pads]


def register_rewrite(rewrite: Rewrite) -> Rewrite:
    """Register an exact, in-place rewrite that makes a model's structure foldable (usable as a decorator).

    It is called as ``rewrite(model, example_inputs)`` (the inputs may be None: a rewrite that needs
    them then does nothing) and returns how many modules it replaced.
    """
    MODEL_REWRITES.append(rewrite)
    return rewrite


def apply_rewrites(model: nn.Module, example_inputs=None) -> int:
    """Apply every registered rewrite to ``model`` in place; returns how many modules were replaced."""
    return sum(rewrite(model, example_inputs) for rewrite in MODEL_REWRITES)
