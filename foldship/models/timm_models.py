"""timm image models: ``timm:<name>``, built without weights, with timm's own preprocessing.

timm is optional (``pip install foldship[edge]``) and imported only here, only when a ``timm:``
model is used. Weights come from ``--checkpoint`` like any other model: timm's pretrained
downloads are never used (builds must work offline and load tensors only).
"""
from __future__ import annotations

import importlib
import math

from ..errors import BadInput
from .spec import ModelSpec, Preprocessing


def _timm():
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise BadInput("timm: models need the timm package; install it with `pip install foldship[edge]`") from None


def timm_preprocessing(pretrained_cfg: dict) -> Preprocessing:
    """timm's eval transform for a model: resize to input / crop_pct, centre crop, mean/std."""
    side = pretrained_cfg["input_size"][-1]
    return Preprocessing(mean=tuple(pretrained_cfg["mean"]), std=tuple(pretrained_cfg["std"]),
                         resize=math.floor(side / pretrained_cfg.get("crop_pct", 1.0)), crop=side,
                         interpolation=pretrained_cfg.get("interpolation", "bilinear"))


def timm_spec(arch: str) -> ModelSpec:
    timm = _timm()
    if arch not in timm.list_models():
        raise BadInput(f"unknown timm model {arch!r}; see timm.list_models(), e.g. efficientnet_lite0")
    cfg = timm.models.get_pretrained_cfg(arch).to_dict()
    build = lambda num_classes=cfg.get("num_classes", 1000): timm.create_model(arch, pretrained=False,
                                                                              num_classes=num_classes)
    return ModelSpec("timm", build, tuple(cfg["input_size"]), cfg.get("num_classes", 1000), timm_preprocessing(cfg))
