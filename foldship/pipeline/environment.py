"""Environment fingerprint recorded in every report: versions, hardware, threads; and the
process-wide allocator setting a build runs under.

PyTorch is described where it is loaded; the timing side (``foldship bench``) runs without it and
describes the GPU through the CUDA driver instead.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from importlib import metadata

from ..validators.artifacts import cuda_gpus
from ..validators.threads import physical_cores

# onnxruntime-gpu provides the same module as onnxruntime: one of the two is installed.
PACKAGES = ("foldship", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
            "torch-pruning", "numpy")


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_ALLOCATOR = {"keeps_freed_memory": False}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default every block over 128 KiB-32 MiB is its own mmap, unmapped when freed, so each
    activation tensor of a forward pass (EfficientNet-Lite0 at batch 32: 50-150 MB each) is
    page-faulted in and zeroed by the kernel again on every pass, CPU time spent in the kernel
    rather than on the model (docs/speed.md). With mmap off for large blocks and no automatic
    trimming, freed blocks return to malloc's free lists and the next pass reuses them. Peak memory
    is what the process holds at its largest, not more; an explicit ``malloc_trim`` still returns it.
    Returns whether the setting took (glibc only; idempotent).
    """
    if not _ALLOCATOR["keeps_freed_memory"]:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _ALLOCATOR["keeps_freed_memory"] = bool(libc.mallopt(M_MMAP_MAX, 0) and
                                                     libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator's own behaviour stays
            pass
    return _ALLOCATOR["keeps_freed_memory"]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model: x86 cpuinfo's "model name", else the board an ARM kernel names ("Model", the device tree)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                found.setdefault(key, value)
    except OSError:
        pass
    try:
        with open("/proc/device-tree/model") as f:
            found.setdefault("device-tree", f.read().strip("\x00\n "))
    except OSError:
        pass
    return next((found[k] for k in ("model name", "Model", "device-tree", "Hardware") if found.get(k)),
                platform.processor() or platform.machine())


def fingerprint() -> dict:
    torch = sys.modules.get("torch")
    gpu = None
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    elif torch is None and cuda_gpus():
        gpu = {"name": cuda_gpus()[0]}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "malloc_keeps_freed_memory": _ALLOCATOR["keeps_freed_memory"],
        "gpu": gpu,
    }
