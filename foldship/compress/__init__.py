"""Compression stage: coupled channel groups, model folding and structured magnitude pruning."""
from __future__ import annotations

from torch import nn

from . import attention, channel_pad  # noqa: F401  register the attention-head finder and the rewrites
from .engine import METHODS, CompressionResult, compress_model
from .groups import ChannelGroup, channel_groups
from .widths import kept_width


def compress(model: nn.Module, example_inputs, method: str = "fold", ratio: float = 0.5, seed: int = 0,
             **options) -> nn.Module:
    """A compressed copy of ``model`` (the input is unchanged). Options: see ``compress_model``."""
    return compress_model(model, example_inputs, method, ratio, seed, **options).model


__all__ = ["compress", "compress_model", "CompressionResult", "channel_groups", "ChannelGroup", "kept_width", "METHODS"]
