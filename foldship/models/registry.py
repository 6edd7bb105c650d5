"""Model registry: CLI names -> architecture factories with their default input and preprocessing.

Names: ``cifar_resnet20`` ... ``cifar_resnet110`` and ``cifar_resnet18`` (built in),
``torchvision:<name>``, ``timm:<name>`` and ``hf:<hub id or folder>``. Models from outside the
registry (the user's own code, ``exported:`` programs, ``onnx:`` files) come from the loaders whose
``SOURCE`` ``external_sources`` lists. The types they share live in ``spec``.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from .checkpoint import load_checkpoint
from .cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet, cifar_resnet18
from .spec import ExternalSource, LoadedModel, ModelSpec, Preprocessing


def external_sources() -> tuple[ExternalSource, ...]:
    """The kinds of model that are not registry names."""
    from . import exported, onnx_in, user_code  # imported when a name is resolved: onnx_in brings in ONNX
    return exported.SOURCE, onnx_in.SOURCE, user_code.SOURCE


def external_source(name: str) -> ExternalSource | None:
    """The source that reads ``name``, or None for a registry name."""
    return next((s for s in external_sources() if s.matches(name)), None)


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


