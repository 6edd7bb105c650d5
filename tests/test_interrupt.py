"""SIGINT and SIGTERM in the middle of a real ``foldship build``: exit 130, and the output folder is
the previous complete run or absent, never partial (no staging folder left either)."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, cli_command

PREVIOUS = {"report.json": '{"previous": true}\n', "report.md": "previous run\n", "compressed.onnx": "previous"}


def staging(parent: Path) -> Path | None:
    """The hidden folder the build is writing into, once it exists."""
    return next((p for p in parent.iterdir() if p.name.startswith(".run.") and p.is_dir()), None)


def holds(name: str):
    def ready(parent: Path) -> bool:
        folder = staging(parent)
        return folder is not None and (folder / name).exists()
    return ready


@pytest.mark.parametrize("signum,ready,previous", [
    (signal.SIGINT, lambda parent: staging(parent) is not None, True),  # load / compress
    (signal.SIGTERM, holds("compressed.safetensors"), False),  # ONNX export
    (signal.SIGTERM, holds("compressed.onnx"), True),  # validation
], ids=["sigint-load", "sigterm-export", "sigterm-validate"])
def test_signal_mid_build_keeps_previous_run_or_nothing(tmp_path, signum, ready, previous):
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump({"limit": 200, "batches": [1], "latency_min_seconds": 0.5,
                                      "exporter": "legacy", "shrinker": "none"}))
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "run"
    if previous:
        out.mkdir()
        for name, text in PREVIOUS.items():
            (out / name).write_text(text)
    # Restore the default SIGINT action: a shell running CI in the background may have it ignored.
    process = subprocess.Popen(cli_command("build", "--config", str(config), "--out", str(out), "--quiet",
                                           "--overwrite"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not ready(parent):
            assert process.poll() is None, f"the build ended before the signal: {process.communicate()}"
            assert time.monotonic() < deadline, "the build never reached the stage"
            time.sleep(0.01)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted:")
    if previous:
        assert [p.name for p in parent.iterdir()] == ["run"]
        assert {p.name: p.read_text() for p in out.iterdir()} == PREVIOUS
    else:
        assert list(parent.iterdir()) == []
