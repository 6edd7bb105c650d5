"""Model registry: CLI names -> architecture factories with their default input and preprocessing.

Names: ``cifar_resnet20`` ... ``cifar_resnet110`` and ``cifar_resnet18`` (built in),
``torchvision:<name>``, ``timm:<name>`` and ``hf:<hub id or folder>``. Models from outside the
registry (the user's own code, ``exported:`` programs, ``onnx:`` files) come from loaders that
register themselves with ``register_source`` (see ``foldship.models``), so this module never
imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import BadInput
from .checkpoint import read_state_dict, resolve_checkpoint
from .cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet, cifar_resnet18
from .digest import sha256_of
from .foreign import apply_mapping

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


EXTERNAL_SOURCES: list[ExternalSource] = []


def register_source(source: ExternalSource) -> ExternalSource:
    EXTERNAL_SOURCES.append(source)
    return source


def external_source(name: str) -> ExternalSource | None:
    """The registered source that reads ``name``, or None for a registry name."""
    from . import exported, onnx_in, user_code  # noqa: F401  each registers its source on import
    return next((s for s in EXTERNAL_SOURCES if s.matches(name)), None)


def weights_inside(name: str) -> bool:
    """Whether ``name`` brings its trained weights (hf: model folders, exported programs, ONNX files)."""
    source = external_source(name)
    return name.startswith("hf:") or (source is not None and source.weights_inside)


def _cifar_specs() -> dict[str, ModelSpec]:
    specs = {f"cifar_resnet{d}": ModelSpec("cifar_resnet", lambda num_classes=10, d=d: CifarResNet(d, num_classes),
                                           (3, 32, 32), 10)
             for d in CIFAR_RESNET_DEPTHS}
    return specs | {"cifar_resnet18": ModelSpec("cifar_resnet", cifar_resnet18, (3, 32, 32), 10)}


BUILTIN_MODELS: dict[str, ModelSpec] = _cifar_specs()


def model_spec(name: str, num_classes: int | None = None, input_size: int | None = None) -> ModelSpec:
    """Resolve a model name to its spec; unknown names get a list of what exists."""
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
    elif name.startswith("torchvision:"):
        spec = _torchvision_spec(name.split(":", 1)[1])
    elif name.startswith("timm:"):
        from .timm_models import timm_spec  # timm is an optional extra: import it only when asked for
        spec = timm_spec(name.split(":", 1)[1])
    elif name.startswith("hf:"):
        from .hf import hf_spec  # transformers is an optional extra: import it only when asked for
        spec = hf_spec(name.split(":", 1)[1])
    else:
        raise BadInput(f"unknown model {name!r}; use one of {', '.join(BUILTIN_MODELS)}, torchvision:<name> "
                       f"(e.g. torchvision:resnet18), timm:<name> (e.g. timm:efficientnet_lite0) "
                       f"or hf:<hub id or model folder>")
    if num_classes is not None:
        spec = ModelSpec(spec.family, spec.build, spec.input_shape, num_classes, spec.preprocessing)
    if input_size is not None:
        spec = ModelSpec(spec.family, spec.build, (spec.input_shape[0], input_size, input_size), spec.num_classes,
                         spec.preprocessing)
    return spec


def _torchvision_spec(arch: str) -> ModelSpec:
    import torchvision
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise BadInput(f"unknown torchvision model {arch!r}; see torchvision.models.list_models(), e.g. resnet18")
    build = lambda num_classes=1000: torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    preprocessing = Preprocessing(resize=256, crop=224)
    return ModelSpec("torchvision", build, (3, 224, 224), 1000, preprocessing)


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    trust_checkpoint: bool = False,
    preprocessing: Preprocessing | None = None,
    checkpoint_map: str | dict[str, str] | None = None,
    model_args: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    """Build ``name`` and load ``checkpoint`` into it strictly (names and shapes must match).

    ``checkpoint_map`` maps a checkpoint saved under other names first (see ``foreign``).
    ``model_args`` and ``input_shape`` are for models from the user's own code (see ``user_code``).
    """
    source = external_source(name)
    if source is not None:
        return source.load(name, checkpoint=checkpoint, num_classes=num_classes, input_size=input_size,
                           input_shape=input_shape, model_args=model_args or {}, trust_checkpoint=trust_checkpoint,
                           preprocessing=preprocessing, checkpoint_map=checkpoint_map)
    if model_args or input_shape is not None:
        raise BadInput(f"model_args and input_shape are for a factory of your own code; model {name} is built by "
                       f"foldship: drop them (input_size sets its image size)")
    spec = model_spec(name, num_classes, input_size)
    model = spec.build(num_classes=spec.num_classes)
    sha = mapping = None
    if checkpoint is not None:
        checkpoint, sha, mapping = load_checkpoint(model, checkpoint, name, trust_checkpoint, checkpoint_map)
    model.eval()
    return LoadedModel(name, model, spec.input_shape, spec.num_classes, preprocessing or spec.preprocessing,
                       str(checkpoint) if checkpoint else None, sha, mapping)


def load_checkpoint(model: nn.Module, checkpoint: str | Path, name: str, trust_checkpoint: bool = False,
                    checkpoint_map=None) -> tuple[Path, str, str]:
    """Load ``checkpoint`` into ``model`` strictly; its path, sha256 and the name mapping used."""
    path = resolve_checkpoint(checkpoint)
    state, mapping = apply_mapping(read_state_dict(path, trust_checkpoint), model, checkpoint_map, path)
    load_strict(model, state, path, name)
    return path, sha256_of(path), mapping


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


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source, name: str) -> None:
    """Load ``state`` or refuse, naming missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    shape_errors = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    dtype_errors = [f"{k} is {v.dtype}" for k, v in state.items()
                    if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if dtype_errors:
        raise BadInput(f"checkpoint {source} has non-float weights ({short_list(dtype_errors)}) where model {name} "
                       f"needs floating point; pass the float checkpoint saved before quantisation")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise BadInput(f"checkpoint {source} holds NaN or infinite values in {short_list(nonfinite)}; the training "
                       f"diverged or the file is damaged: pass a healthy checkpoint")
    result = None
    if not shape_errors:
        result = model.load_state_dict(state, strict=False)
    missing = list(result.missing_keys) if result else [k for k in own if k not in state]
    unexpected = list(result.unexpected_keys) if result else [k for k in state if k not in own]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"missing keys {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {short_list(unexpected)}")
    if shape_errors:
        problems.append(f"shape mismatches {short_list(shape_errors)}")
    if problems:
        raise BadInput(f"checkpoint {source} does not fit model {name}: {'; '.join(problems)}; "
                       f"check --model (depth, width, num_classes) matches the checkpoint")


def short_list(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
