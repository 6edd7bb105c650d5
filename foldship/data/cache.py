"""On-disk cache of decoded, resized and cropped images, so a second build does not decode again.

The key covers everything the cached pixels depend on: each file's path, size and modification
time, the resize/crop/interpolation steps, and the decoder versions. Normalisation (mean/std) is
applied after the cache, so changing it reuses the same entry. Entries are safetensors files
(tensors only, nothing to unpickle), written to a temporary name and renamed into place, so a
reader never sees half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import torch

CACHE_ENV = "FOLDSHIP_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "foldship" / "images"))


def cache_key(files: list[Path], steps: dict) -> str:
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    versions = {name: metadata.version(name) for name in ("pillow", "torchvision")}
    blob = json.dumps({"files": entries, "steps": steps, "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_cached(key: str) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = cache_dir() / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        return load_file(str(path))["images"]
    except (SafetensorError, OSError, KeyError):  # a damaged entry is decoded again and replaced
        return None


def write_cached(key: str, images: torch.Tensor) -> None:
    """Store ``images`` under ``key``; a cache that cannot be written only costs the next build time."""
    from safetensors.torch import save_file

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"images": images.contiguous()}, temp)
            os.replace(temp, folder / f"{key}.safetensors")
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
    except OSError:
        pass
