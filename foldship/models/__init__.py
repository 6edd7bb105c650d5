"""Loading trained models: built-in families, torchvision architectures, safe checkpoints, and
compressed models saved as a width spec plus safetensors.

Public names load on first use, so ``foldship.models.digest`` imports without PyTorch.
"""
from .._lazy import lazy_package

__all__ = ["LoadedModel", "Preprocessing", "load_model", "model_spec", "load_compressed", "save_compressed"]
lazy_package(__name__, {**dict.fromkeys(["LoadedModel", "Preprocessing", "load_model", "model_spec"], ".registry"),
                        **dict.fromkeys(["load_compressed", "save_compressed"], ".saved")})
