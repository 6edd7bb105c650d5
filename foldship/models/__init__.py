"""Loading trained models: built-in families, torchvision architectures, safe checkpoints, and
compressed models saved as a width spec plus safetensors."""
from .registry import LoadedModel, Preprocessing, load_model, model_spec
from .saved import load_compressed, save_compressed

__all__ = ["LoadedModel", "Preprocessing", "load_model", "model_spec", "load_compressed", "save_compressed"]
