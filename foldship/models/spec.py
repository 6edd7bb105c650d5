"""What foldship knows of a model: how to build it (``ModelSpec``), how images become its inputs
(``Preprocessing``), the loaded model with its input shape and origin (``LoadedModel``), and the one
forward pass that checks it is a classifier. The registry and every loader share these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import BadInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    """How images become model inputs: optional resize and centre crop, then mean/std."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None
    crop: int | None = None
    interpolation: str = "bilinear"


@dataclass
class ModelSpec:
    family: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    num_classes: int
    preprocessing: Preprocessing = field(default_factory=Preprocessing)


@dataclass
class LoadedModel:
    """A trained model with what later stages need to know about it."""

    name: str
    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    preprocessing: Preprocessing
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_mapping: str | None = None  # how checkpoint names met the model's: names, by-order or rename
    source: dict | None = None  # where a model from outside the registry came from (kind, file, sha256, ...)
    baseline_onnx: str | None = None  # an ONNX file given as the model: the build's baseline as it is

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        return example_inputs(self.model, self.input_shape, batch)


def example_inputs(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """Seeded random inputs of ``input_shape``, or the model's own (hf: token ids)."""
    if hasattr(model, "example_inputs"):  # models whose inputs are not images
        return model.example_inputs(batch)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_shape, generator=generator)


@dataclass
class ExternalSource:
    """A kind of model that is not a registry name: ``matches(name)`` says whether it reads ``name``,
    ``load(name, **request)`` returns the LoadedModel; ``weights_inside`` sources take no checkpoint."""

    kind: str
    matches: Callable[[str], bool]
    load: Callable[..., LoadedModel]
    weights_inside: bool = False


def check_forward(loaded: LoadedModel) -> None:
    """Run the model once on a random batch of its declared input shape, or refuse in one line.

    Tracing, export and validation all need a forward that returns one (batch, classes) logits
    tensor; checking it here turns a deep traceback later into a clear message now.
    """
    shape = (2, *loaded.input_shape)
    out = _run_once(loaded.model, loaded.input_shape, loaded.name)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, loaded.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"model {loaded.name} returns {got} for inputs of shape {shape}, not logits of shape "
                       f"(2, {loaded.num_classes}); foldship compresses classifiers that return one logits tensor")


def infer_num_classes(model: nn.Module, input_shape: tuple[int, ...], name: str) -> int:
    """The width of the logits ``model`` returns for a batch of two (a model that returns something
    else is refused by ``check_forward``)."""
    out = _run_once(model, input_shape, name)
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else 0


def _run_once(model: nn.Module, input_shape: tuple[int, ...], name: str):
    try:
        with torch.no_grad():
            return model(example_inputs(model, input_shape, 2))
    except Exception as exc:  # a model can fail on a wrong input in any way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BadInput(f"model {name} cannot run on inputs of shape {(2, *input_shape)} ({type(exc).__name__}: "
                       f"{first}); set input_size to the image size the model was built for") from None
