"""foldship: fold or prune a trained PyTorch model, export it, and prove it still works."""
from .compress import channel_groups, compress
from .errors import BadInput, FoldshipError, GateFailed
from .models import load_model
from .pipeline import BuildConfig, build, load_config

__all__ = ["load_model", "channel_groups", "compress", "BuildConfig", "load_config", "build",
           "FoldshipError", "BadInput", "GateFailed"]
