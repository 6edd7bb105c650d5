"""What makes a build cheap on the machine: freed memory kept for reuse instead of page-faulted in again, and
every stage's wall and CPU time recorded."""
import re
import sys
import time

import pytest
import torch

from foldship.pipeline.environment import fingerprint, keep_freed_memory
from foldship.progress import StageProgress

BLOCK_KIB = 64 * 1024  # a 64 MiB block, the size of one EfficientNet-Lite0 activation at batch 32


def resident_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc/self/status")
def test_freed_tensors_stay_in_the_process_for_reuse():
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    for _ in range(3):  # as activations of one size come and go in repeated forward passes
        block = torch.ones(BLOCK_KIB * 256)  # 64 MiB of float32, every page written
        held = resident_kib()
        del block
        # glibc's default maps a block this large on its own and unmaps it when freed: resident memory
        # falls by its 65,536 KiB (measured: 65,540) and the next pass faults every page in again.
        # Kept, the freed block stays resident in malloc's free lists.
        assert held - resident_kib() < BLOCK_KIB // 16
    assert fingerprint()["malloc_keeps_freed_memory"] is True


def test_every_stage_records_its_wall_and_cpu_time():
    progress = StageProgress(quiet=True)
    with progress.stage("busy"):
        start = time.process_time()
        while time.process_time() - start < 0.2:  # 0.2 s of CPU in this process
            pass
    with progress.stage("idle"):
        time.sleep(0.2)
    busy, idle = progress.timings
    assert busy["stage"] == "busy" and busy["user_s"] + busy["sys_s"] >= 0.19
    assert idle["stage"] == "idle" and idle["wall_s"] >= 0.19 and idle["user_s"] + idle["sys_s"] < 0.1
    with pytest.raises(ValueError), progress.stage("failing"):
        raise ValueError("a stage that fails is still timed")
    assert progress.timings[-1]["stage"] == "failing"
