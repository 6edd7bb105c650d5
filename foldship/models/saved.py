"""Compressed models as data: a JSON structure spec (every layer's widths) plus safetensors weights.

Loading rebuilds the original architecture from the model registry, narrows each layer to the
widths in the spec, and loads the tensors strictly. Neither file is a pickle, so loading a
compressed model never runs code from it (the pattern of timm's ``_pruned`` specs).
"""
from __future__ import annotations

import copy

import hashlib
import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import BadInput
from ..files import atomic_write
from .checkpoint import short_list
from .registry import model_spec
from .spec import LoadedModel, Preprocessing, example_inputs
from .blocks import remove_blocks
from .rewrites import apply_rewrites

SPEC_FORMAT = "foldship-compressed-model"
SPEC_VERSION = 1
SPEC_NAME = "compressed.json"  # its weights are the same name with .safetensors

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = nn.modules.batchnorm._BatchNorm


class NotDescribable(BadInput):
    """The compressed model holds a change that a width spec cannot express."""


def layer_widths(module: nn.Module) -> dict | None:
    """The widths that fix a layer's tensor shapes, or None for a layer without any.

    A module type of foldship's own (e.g. ``PadShortcut``) states its widths itself (``spec_widths``)
    and is rebuilt from them (``from_spec_widths``).
    """
    if hasattr(module, "spec_widths"):
        return module.spec_widths()
    if isinstance(module, _CONVS):
        return {"kind": "conv", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, _NORMS):
        return {"kind": "batchnorm", "num_features": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"kind": "layernorm", "normalized_shape": list(module.normalized_shape)}
    if isinstance(module, nn.GroupNorm):
        return {"kind": "groupnorm", "num_groups": module.num_groups, "num_channels": module.num_channels}
    return None


def _narrowed(module: nn.Module, widths: dict) -> nn.Module:
    """A fresh layer like ``module`` (same kernel, stride, eps, ...) at the given widths."""
    kind = widths["kind"]
    if kind == "conv":
        return type(module)(widths["in_channels"], widths["out_channels"], module.kernel_size, module.stride,
                            module.padding, module.dilation, widths["groups"], module.bias is not None,
                            module.padding_mode)
    if kind == "linear":
        return nn.Linear(widths["in_features"], widths["out_features"], module.bias is not None)
    if kind == "batchnorm":
        # A copy, resized: BatchNorm subclasses carry more than the base class's arguments (timm's
        # BatchNormAct2d holds its activation, e.g. ReLU6), which a fresh instance would lose.
        narrowed, n = copy.deepcopy(module), widths["num_features"]
        narrowed.num_features = n
        for name, tensor in list(narrowed.named_parameters(recurse=False)) + list(narrowed.named_buffers(recurse=False)):
            if tensor.ndim == 1:
                resized = torch.empty(n, dtype=tensor.dtype)
                setattr(narrowed, name, nn.Parameter(resized) if isinstance(tensor, nn.Parameter) else resized)
        return narrowed
    if kind == "layernorm":
        return nn.LayerNorm(widths["normalized_shape"], module.eps, module.elementwise_affine,
                            bias=module.bias is not None)
    if kind == "groupnorm":
        return nn.GroupNorm(widths["num_groups"], widths["num_channels"], module.eps, module.affine)
    return type(module).from_spec_widths(widths)


def save_compressed(model: nn.Module, original: LoadedModel, spec_path: str | Path,
                    compression: dict | None = None, removed_blocks: Sequence[str] = ()) -> Path:
    """Write ``spec_path`` (JSON widths) and the weights beside it (same name, ``.safetensors``).

    ``original`` names the architecture the model was compressed from; ``compression`` (method,
    ratio, ...) is recorded as provenance; ``removed_blocks`` (``CompressionResult.removed_blocks``)
    are the residual blocks the model no longer has, rebuilt as the identity. Before anything is
    written, the spec is rebuilt into a model, loaded with the weights and run: a model the spec does not reproduce exactly (a layer
    type it has no widths for, say) raises ``NotDescribable`` instead of being saved. Each file is
    written under a temporary name and renamed, weights first: a spec on disk has its weights.
    """
    from safetensors.torch import save as to_safetensors

    if original.source is not None:
        raise NotDescribable(f"a width spec rebuilds models of foldship's registry, and {original.name} comes from "
                             f"{original.source['kind']}; ship the ONNX file instead")
    spec_path = Path(spec_path)
    weights_path = spec_path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    layers = {name: widths for name, module in model.named_modules() if (widths := layer_widths(module))}
    spec = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "foldship_version": metadata.version("foldship"),
        "model": {"name": original.name, "num_classes": original.num_classes,
                  "input_shape": list(original.input_shape), "preprocessing": asdict(original.preprocessing),
                  "checkpoint_sha256": original.checkpoint_sha256},
        "compression": compression or {},
        "weights": {"file": weights_path.name},
        "removed_blocks": list(removed_blocks),
        "layers": layers,
    }
    _check_reproduces(model, rebuild(spec, spec_path), state, original)
    data = to_safetensors(state, metadata={"format": "pt"})
    spec["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_path, data)
    atomic_write(spec_path, _spec_text(spec).encode())
    return spec_path


def _misfits(own: dict, state: dict) -> list[str]:
    """Why the tensors ``state`` do not load into a model whose state dict is ``own`` (empty: they do)."""
    problems = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
                "shape mismatches": [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                                     if k in own and own[k].shape != v.shape]}
    return [f"{label} {short_list(keys)}" for label, keys in problems.items() if keys]


def _check_reproduces(model: nn.Module, rebuilt: nn.Module, state: dict, original: LoadedModel) -> None:
    misfits = _misfits(rebuilt.state_dict(), state)
    if not misfits:
        rebuilt.load_state_dict(state, strict=True)
        x, training = original.example_inputs(2), model.training
        with torch.no_grad():
            expected = model.eval()(x.to(next(model.parameters()).device)).cpu()
            model.train(training)
            if torch.allclose(rebuilt.eval()(x), expected, rtol=1e-4, atol=1e-5):
                return
    detail = "; ".join(misfits) or "its outputs differ"
    raise NotDescribable(f"the compressed model cannot be saved as a width spec of {original.name}: {detail} once "
                         f"rebuilt at the recorded widths; ship the ONNX file instead")


def load_compressed(path: str | Path) -> LoadedModel:
    """Rebuild a compressed model from a run folder or its ``compressed.json`` spec, without pickles.

    The architecture comes from the model registry, each recorded layer is narrowed to its widths,
    and every tensor (routing buffers of option-A shortcuts included) must be in the weights file
    with the right shape and the checksum the spec records.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as from_safetensors

    path = Path(path)
    spec_path = path / SPEC_NAME if path.is_dir() else path
    spec = _read_spec(spec_path)
    weights_path = spec_path.with_name(spec["weights"]["file"])
    if not weights_path.is_file():
        raise BadInput(f"weights {weights_path} named by {spec_path} are missing; copy both files together")
    data = weights_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != spec["weights"].get("sha256"):
        raise BadInput(f"weights {weights_path} do not match the checksum in {spec_path}; they were changed or "
                       f"belong to another run: re-save the model")
    try:
        state = from_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise BadInput(f"weights {weights_path} are not a readable safetensors file ({exc})") from None
    model = rebuild(spec, spec_path)
    misfits = _misfits(model.state_dict(), state)
    if misfits:
        raise BadInput(f"weights {weights_path} do not fit the spec {spec_path}: {'; '.join(misfits)}; "
                       f"keep the two files of one run together")
    model.load_state_dict(state, strict=True)
    model.eval()
    info = spec["model"]
    return LoadedModel(info["name"], model, tuple(info["input_shape"]), info["num_classes"],
                       Preprocessing(**info["preprocessing"]), str(weights_path),
                       hashlib.sha256(data).hexdigest())


def rebuild(spec: dict, source: Path | str = "<spec>") -> nn.Module:
    """The registry architecture of ``spec["model"]`` without its removed blocks, every recorded layer at
    its recorded widths."""
    info = spec["model"]
    arch = model_spec(info["name"], info["num_classes"])
    model = arch.build(num_classes=arch.num_classes)
    example = example_inputs(model, tuple(info["input_shape"]), 2)
    try:  # specs written before depth compression have no removed_blocks
        remove_blocks(model, spec.get("removed_blocks", []), example)
    except BadInput as exc:
        raise BadInput(f"spec {source}: {exc}; the spec belongs to another model") from None
    # Compression ran on the rewritten structure, so the spec names its layers.
    apply_rewrites(model, example)
    modules = dict(model.named_modules())
    for name, widths in spec["layers"].items():
        original = modules.get(name)
        if original is None or (layer_widths(original) or {}).get("kind") != widths.get("kind"):
            raise BadInput(f"spec {source} describes layer {name!r} ({widths.get('kind')}) that {info['name']} "
                           f"does not have; the spec belongs to another model")
        if layer_widths(original) != widths:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _narrowed(original, widths))
    return model


def _spec_text(spec: dict) -> str:
    """Indented JSON with one line per layer, so a diff of two specs reads layer by layer."""
    head = json.dumps({k: v for k, v in spec.items() if k != "layers"}, indent=2)[:-2]
    rows = ",\n".join(f"    {json.dumps(name)}: {json.dumps(widths)}" for name, widths in spec["layers"].items())
    return f'{head},\n  "layers": {{\n{rows}\n  }}\n}}\n'


def _read_spec(spec_path: Path) -> dict:
    if not spec_path.is_file():
        raise BadInput(f"{spec_path} does not exist; pass a run folder or its {SPEC_NAME}")
    try:
        spec = json.loads(spec_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{spec_path} is not valid JSON ({exc}); re-save the compressed model") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise BadInput(f"{spec_path} is not a foldship compressed-model spec (no format {SPEC_FORMAT!r})")
    if spec.get("version") != SPEC_VERSION:
        raise BadInput(f"{spec_path} has spec version {spec.get('version')}; this foldship reads version "
                       f"{SPEC_VERSION}: upgrade foldship or re-save the model")
    return spec
