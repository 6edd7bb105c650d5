"""Loading trained models: built-in families, torchvision architectures, safe checkpoints, compressed
models saved as a width spec plus safetensors, and models from outside the registry: the user's own
code (``file.py:factory``), ``exported:`` torch.export programs and ``onnx:`` files.

Public names load on first use: importing the package costs no PyTorch.
"""
from .._lazy import lazy_package

__all__ = ["LoadedModel", "Preprocessing", "load_model", "model_spec", "wrap_module", "load_compressed",
           "save_compressed"]
lazy_package(__name__, {**dict.fromkeys(["LoadedModel", "Preprocessing"], ".spec"),
                        **dict.fromkeys(["load_model", "model_spec"], ".registry"),
                        "wrap_module": ".user_code",
                        **dict.fromkeys(["load_compressed", "save_compressed"], ".saved")})
