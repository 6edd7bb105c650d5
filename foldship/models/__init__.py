"""Loading trained models: built-in families, torchvision architectures, safe checkpoints, compressed
models saved as a width spec plus safetensors, and models from outside the registry: the user's own
code (``file.py:factory``), ``exported:`` torch.export programs and ``onnx:`` files."""
from . import exported, onnx_in, user_code  # noqa: F401  each registers its source with the registry
from .registry import LoadedModel, Preprocessing, load_model, model_spec
from .user_code import wrap_module
from .saved import load_compressed, save_compressed

__all__ = ["LoadedModel", "Preprocessing", "load_model", "model_spec", "wrap_module", "load_compressed",
           "save_compressed"]
