"""benchmarks/gpu_check.sh on a machine without a GPU: one clear line, exit 0, nothing written.
(On a GPU it folds and times for minutes: a benchmark, run by hand; see docs/gpu.md.)"""
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU is visible to PyTorch")
    assert "pass --device cpu" in lines[0] and not out.exists()
