"""Loading trained models: built-in families, torchvision architectures, safe checkpoints."""
from .registry import LoadedModel, Preprocessing, load_model, model_spec

__all__ = ["LoadedModel", "Preprocessing", "load_model", "model_spec"]
