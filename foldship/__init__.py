"""foldship: fold or prune a trained PyTorch model, export it, and prove it still works.

Public names load on first use: ``import foldship`` alone imports neither PyTorch nor ONNX.
"""
from ._lazy import lazy_package

__all__ = ["load_model", "wrap_module", "save_compressed", "load_compressed", "channel_groups", "compress", "BuildConfig",
           "load_config", "build", "load_sweep_config", "run_sweep", "FoldshipError", "BadInput", "GateFailed"]
lazy_package(__name__, {
    "load_model": ".models", "wrap_module": ".models", "save_compressed": ".models", "load_compressed": ".models",
    "channel_groups": ".compress", "compress": ".compress",
    "BuildConfig": ".pipeline", "load_config": ".pipeline", "build": ".pipeline",
    "load_sweep_config": ".sweep", "run_sweep": ".sweep",
    "FoldshipError": ".errors", "BadInput": ".errors", "GateFailed": ".errors",
})
