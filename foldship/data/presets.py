"""Named preprocessing pipelines (resize, interpolation, centre crop, mean/std), one per training recipe.

A model family brings its own default (``models.registry``; timm models read their
``pretrained_cfg``); a preset or single keys in the config override it. Weights trained
elsewhere often need another recipe than the architecture's default: the TensorFlow-trained
EfficientNet-Lite0 weights expect inputs scaled to [-1, 1] (``inception-bicubic-224``: 820/1000
top-1 on the ImageNet sample, against about 720 with ImageNet mean/std).
"""
from __future__ import annotations

import dataclasses

from ..errors import BadInput
from ..models.spec import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # torchvision's modes

PRESETS: dict[str, Preprocessing] = {
    "cifar": Preprocessing(),  # no resize: 32x32 inputs, ImageNet statistics
    "imagenet-bilinear-256-224": Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 256, 224, "bilinear"),  # torchvision
    "imagenet-bicubic-256-224": Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 256, 224, "bicubic"),  # timm, crop_pct .875
    "inception-bicubic-224": Preprocessing(INCEPTION_MEAN, INCEPTION_STD, 224, 224, "bicubic"),  # TF-trained weights
}


def resolve_preprocessing(default: Preprocessing, preset: str | None = None, **overrides) -> Preprocessing:
    """``default``, replaced by ``preset`` if given, then by each override that is not None
    (``mean``, ``std``, ``resize``, ``crop``, ``interpolation``)."""
    if preset is not None and preset not in PRESETS:
        raise BadInput(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)} "
                       f"or set resize, crop, interpolation, mean and std")
    base = PRESETS[preset] if preset else default
    values = {k: tuple(v) if k in ("mean", "std") else v for k, v in overrides.items() if v is not None}
    result = dataclasses.replace(base, **values)
    check_preprocessing(result)
    return result


def check_preprocessing(p: Preprocessing) -> None:
    if p.interpolation not in INTERPOLATIONS:
        raise BadInput(f"unknown interpolation {p.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
    for key in ("resize", "crop"):
        value = getattr(p, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BadInput(f"{key} must be a positive number of pixels, got {value!r}")
    if len(p.mean) != len(p.std) or any(s <= 0 for s in p.std):
        raise BadInput(f"mean {p.mean} and std {p.std} need one value per channel, and std > 0")


def scaled_to(p: Preprocessing, from_side: int, side: int) -> Preprocessing:
    """``p`` for a square input of ``side`` pixels instead of ``from_side``, seeing the same part of each
    image: the crop becomes ``side`` and the resize shrinks by the same factor (crop fraction kept).
    BadInput for a pipeline without a resize step (images used at their stored size cannot change it)."""
    if not p.resize:
        raise BadInput(f"a {side} px input needs images resized on loading, and this preprocessing has no resize "
                       f"step; use an image folder (.npz arrays are used as stored) and set the config keys resize "
                       f"and crop (e.g. resize: {from_side}, crop: {from_side})")
    crop = p.crop or from_side
    return dataclasses.replace(p, resize=max(side, round(p.resize * side / crop)), crop=side)
