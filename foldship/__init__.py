"""foldship: fold or prune a trained PyTorch model, export it, and prove it still works."""
from .compress import channel_groups, compress
from .errors import BadInput, FoldshipError, GateFailed
from .models import load_compressed, load_model, save_compressed, wrap_module
from .pipeline import BuildConfig, build, load_config
from .sweep import load_sweep_config, run_sweep

__all__ = ["load_model", "wrap_module", "save_compressed", "load_compressed", "channel_groups", "compress", "BuildConfig",
           "load_config", "build", "load_sweep_config", "run_sweep", "FoldshipError", "BadInput", "GateFailed"]
