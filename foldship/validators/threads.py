"""How many threads inference runs on: shared by every runner (ONNX Runtime sessions, the PyTorch
runner) and the latency protocol, and imports neither PyTorch nor ONNX Runtime."""
from __future__ import annotations

import os
import sys


def resolved_threads(threads: int = 0) -> int:
    """The thread count used when ``threads`` is 0: PyTorch's intra-op default where PyTorch is
    loaded (what the build timed with), else one per physical core of this machine."""
    if threads:
        return threads
    torch = sys.modules.get("torch")
    return max(torch.get_num_threads(), 1) if torch is not None else physical_cores()


def physical_cores() -> int:
    """Physical cores this process may run on: distinct (package, core) pairs in /proc/cpuinfo,
    else the CPUs of its affinity mask (where cpuinfo names no cores, as on many ARM boards)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, package = set(), None, "0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "processor":
                    cpu, package = int(value), "0"
                elif key == "physical id":
                    package = value
                elif key == "core id" and cpu in allowed:
                    cores.add((package, value))
    except (OSError, ValueError):
        pass
    return len(cores) or max(len(allowed), 1)
