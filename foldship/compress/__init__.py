"""Compression stage: coupled channel groups, model folding and structured magnitude pruning."""
from __future__ import annotations

import sys


def _import_torch_pruning_without_timm() -> None:
    """Import Torch-Pruning before any module of this stage does, with timm hidden unless already imported.

    Torch-Pruning imports timm when it is installed, only for an op counter foldship does not use, and
    timm loads torchvision's models and torch._dynamo: about 2.5 s of imports in every process that
    compresses (each CLI run, each sweep worker), 1.2 s of it never needed by a CIFAR build with the
    legacy exporter. A model that needs timm imports it later, as usual.
    """
    if "timm" in sys.modules:
        import torch_pruning
        return
    sys.modules["timm"] = None  # ``import timm`` fails: Torch-Pruning's op counter goes without timm's hooks
    try:
        import torch_pruning
    finally:
        del sys.modules["timm"]


_import_torch_pruning_without_timm()  # before the imports below, which import Torch-Pruning

from torch import nn

from .engine import METHODS, CompressionResult, compress_model
from .groups import ChannelGroup, channel_groups
from .widths import kept_width


def compress(model: nn.Module, example_inputs, method: str = "fold", ratio: float = 0.5, seed: int = 0,
             **options) -> nn.Module:
    """A compressed copy of ``model`` (the input is unchanged). Options: see ``compress_model``."""
    return compress_model(model, example_inputs, method, ratio, seed, **options).model


__all__ = ["compress", "compress_model", "CompressionResult", "channel_groups", "ChannelGroup", "kept_width", "METHODS"]
