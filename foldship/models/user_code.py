"""Models from the user's own code: ``path/to/file.py:factory`` or ``package.module:factory``.

This imports the file or module and calls ``factory(**model_args)``: it runs the user's code,
which is what they asked for. The module it returns gets the checkpoint with the same strict,
tensors-only loading (and name mappings) as a registry model. The file's sha256 and the
factory's name go into the report, so a run names the code that built its model.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from ..errors import BadInput
from .checkpoint import load_checkpoint
from ..files import sha256_of
from .spec import ExternalSource, LoadedModel, Preprocessing, check_forward, infer_num_classes

# Prefixes of registry and file sources: ``timm:x`` is a timm model, never a module called timm.
RESERVED_PREFIXES = ("torchvision", "timm", "hf", "exported", "onnx")


def is_user_code(name: str) -> bool:
    """``something.py:factory`` or ``dotted.module:factory`` (not a registry prefix)."""
    target, sep, factory = name.rpartition(":")
    if not sep or target in RESERVED_PREFIXES or not factory.isidentifier():
        return False
    return target.endswith(".py") or all(part.isidentifier() for part in target.split("."))


def _import_file(path: Path):
    if not path.is_file():
        raise BadInput(f"model file {path} does not exist; --model takes path/to/file.py:factory")
    module_name = f"foldship_user_code_{sha256_of(path)[:16]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a module up by name while it runs
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # as `python file.py` would: the file may import its sibling modules
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[module_name]
        raise BadInput(f"importing {path} failed ({_describe(exc)}); fix the file or run it with python first "
                       f"to see the error") from None
    finally:
        sys.path.remove(folder)
    return module


def _import_module(dotted: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        raise BadInput(f"cannot import module {dotted} ({_describe(exc)}); check the module path, or give a file "
                       f"as path/to/file.py:factory") from None
    except (Exception, SystemExit) as exc:
        raise BadInput(f"importing module {dotted} failed ({_describe(exc)})") from None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def build_user_model(name: str, model_args: dict | None = None) -> tuple[nn.Module, dict]:
    """Import the code ``name`` points at and call its factory; the module and its provenance."""
    target, _, factory_name = name.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        module = _import_file(path)
    else:
        module = _import_module(target)
        path = Path(module.__file__) if getattr(module, "__file__", None) else None
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        what = "no callable" if factory is None else f"a {type(factory).__name__}, not a callable,"
        raise BadInput(f"{target} has {what} named {factory_name!r}; it defines {', '.join(found) or 'none'}: "
                       f"--model takes {target}:<factory>")
    model_args = dict(model_args or {})
    try:
        model = factory(**model_args)
    except (Exception, SystemExit) as exc:
        raise BadInput(f"factory {name} raised {_describe(exc)}; check the factory and model_args "
                       f"{model_args or '{}'}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"factory {name} returned a {type(model).__name__}, not a torch.nn.Module; it must return "
                       f"the model")
    source = {"kind": "python", "file": str(path) if path else None, "sha256": sha256_of(path) if path else None,
              "factory": factory_name, "module": None if target.endswith(".py") else target,
              "model_args": model_args}
    return model, source


def image_shape(name: str, input_shape, input_size) -> tuple[int, ...]:
    """The (C, H, W) a model of the user's own code takes: input_shape, or input_size for RGB N x N."""
    if input_shape is not None:
        shape = tuple(input_shape)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise BadInput(f"input_shape is the shape of one sample without the batch axis, e.g. [3, 32, 32]; "
                           f"got {list(shape)}")
        if input_size is not None and shape[-1] != input_size:
            raise BadInput(f"input_shape {list(shape)} and input_size {input_size} disagree; give one of them")
        return shape
    if input_size is not None:
        return (3, input_size, input_size)
    raise BadInput(f"model {name} is your own code, so foldship does not know its input: give input_shape "
                   f"(e.g. --input-shape 3,32,32) or input_size (3-channel N x N images)")


def load_user_model(name: str, checkpoint=None, num_classes=None, input_size=None, input_shape=None,
                    model_args=None, trust_checkpoint=False, preprocessing=None, checkpoint_map=None,
                    **_) -> LoadedModel:
    model, source = build_user_model(name, model_args)
    shape = image_shape(name, input_shape, input_size)
    sha = mapping = None
    if checkpoint is not None:
        checkpoint, sha, mapping = load_checkpoint(model, checkpoint, name, trust_checkpoint, checkpoint_map)
    model.eval()
    loaded = LoadedModel(name, model, shape, num_classes or infer_num_classes(model, shape, name),
                         preprocessing or Preprocessing(), str(checkpoint) if checkpoint else None, sha, mapping,
                         source=source)
    check_forward(loaded)
    return loaded


def wrap_module(model: nn.Module, input_shape, num_classes: int | None = None,
                preprocessing: Preprocessing | None = None, name: str | None = None) -> LoadedModel:
    """A module built in Python, as ``foldship.build(config, model=...)`` takes it: put in eval mode,
    checked to run on ``input_shape`` (one sample, no batch axis) and to return one logits tensor.

    ``num_classes`` defaults to the width of those logits; ``preprocessing`` to ImageNet mean/std
    without resize or crop; ``name`` (in the report) to the module's class name.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"model must be a torch.nn.Module (or a LoadedModel), got a {type(model).__name__}")
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    name = name or type(model).__qualname__
    shape = image_shape(name, input_shape, None)
    model.eval()
    loaded = LoadedModel(name, model, shape, num_classes or infer_num_classes(model, shape, name),
                         preprocessing or Preprocessing(), source={"kind": "python object", "class": cls})
    check_forward(loaded)
    return loaded


SOURCE = ExternalSource("python", is_user_code, load_user_model)
