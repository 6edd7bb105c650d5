"""What a build does differently for models that come from outside the registry.

- A module handed to ``foldship.build(config, model=...)`` is used as it is (no checkpoint).
- A model converted from ONNX must reproduce the ONNX file in ONNX Runtime on the evaluation
  images before anything is compressed, and the user's file (not a re-export of the converted
  module) is the baseline the report compares with.
- Repairs that act through BatchNorm are refused for models that have none (an ONNX graph has
  BatchNorm fused into its convolutions).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.presets import resolve_preprocessing
from ..errors import BadInput
from ..exporters import ExportOptions, describe_onnx, export_model, ship_onnx
from ..exporters.stage import TORCH_PARITY_RELATIVE_TOLERANCE, ExportedModel
from ..exporters.verify import max_abs_error, onnx_logits, torch_logits
from ..models.spec import LoadedModel
from ..models.user_code import wrap_module
from .config import BuildConfig

BN_REPAIRS = ("fold-ar", "bn-recalibrate")


def given_model(model: LoadedModel | nn.Module, config: BuildConfig) -> LoadedModel:
    """A model passed to ``build``: a LoadedModel as it is, a module wrapped with the config's input
    shape (``input_shape``, or ``input_size`` for RGB N x N), num_classes and preprocessing keys."""
    if not isinstance(model, LoadedModel):
        size = config.input_size
        shape = config.input_shape or ([3, size, size] if size else None)
        model = wrap_module(model, shape, config.num_classes)
        model.preprocessing = resolve_preprocessing(model.preprocessing, config.preprocess,
                                                    **config.preprocessing_overrides())
    return model


def check_repair(repair: str, model: nn.Module, name: str) -> None:
    if repair in BN_REPAIRS and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                                        for m in model.modules()):
        raise BadInput(f"--repair {repair} corrects through BatchNorm layers, and model {name} has none (an ONNX "
                       f"graph has them fused into its convolutions); use --repair none")


def check_conversion(loaded: LoadedModel, images: torch.Tensor) -> dict:
    """The converted module against ONNX Runtime running the user's file, on every evaluation image.

    Same bound as an export's parity check: relative to the largest logit. Recorded in the model's
    source entry of the report; a conversion outside it is refused before anything is compressed.
    """
    reference = onnx_logits(loaded.baseline_onnx, images)
    converted = torch_logits(loaded.model, images)
    error = max_abs_error(reference, converted)
    tolerance = TORCH_PARITY_RELATIVE_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    check = {"images": len(images), "max_abs_error": error, "tolerance": tolerance,
             "top1_agreement": float((reference.argmax(1) == converted.argmax(1)).mean())}
    loaded.source["conversion_check"] = check
    if not error <= tolerance:
        raise BadInput(f"the PyTorch conversion of {loaded.baseline_onnx} differs from ONNX Runtime by {error:.3g} "
                       f"(> {tolerance:.3g}) on the evaluation images; foldship will not compress a model that does "
                       f"not compute what the file computes")
    return check


def export_baseline(loaded: LoadedModel, example: torch.Tensor, folder: Path, options: ExportOptions,
                    images: torch.Tensor) -> ExportedModel:
    """The baseline ONNX file: the user's own file when the model came as one (shipped as given, no
    shrinking), else the model exported as the compressed one will be."""
    if loaded.baseline_onnx is None:
        return export_model(loaded.model, example, folder, "baseline", options, images)
    return ship_onnx(describe_onnx(loaded.baseline_onnx, "given"), folder, "baseline",
                     dataclasses.replace(options, shrinker="none"), images)
