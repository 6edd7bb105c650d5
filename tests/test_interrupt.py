"""SIGINT and SIGTERM in the middle of a real ``foldship build``: exit 130, and the output folder is
the previous complete run or absent, never partial (no staging folder left either)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
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


@pytest.mark.parametrize("signum,previous", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["sigint", "sigterm"])
def test_signal_during_distillation_keeps_previous_run_or_nothing(tmp_path, signum, previous):
    """The signal arrives while ``--finetune distill`` trains (its progress bar is on screen): exit 130 and
    nothing of the interrupted build is left."""
    import os
    import threading

    from .conftest import CIFAR_JPEG

    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({"limit": 100, "batches": [1], "exporter": "legacy", "shrinker": "none",
                                      "calibration_data": str(CIFAR_JPEG), "finetune": "distill",
                                      "finetune_images": 256, "finetune_batch": 32, "finetune_epochs": 1000}))
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "run"
    if previous:
        out.mkdir()
        for name, text in PREVIOUS.items():
            (out / name).write_text(text)
    # FORCE_COLOR: rich draws live progress bars into the pipe, so the test sees the distillation stage start.
    process = subprocess.Popen(cli_command("build", "--config", str(config), "--out", str(out), "--overwrite"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"FORCE_COLOR": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while "img/s" not in "".join(stderr):  # a distillation step has finished
            assert process.poll() is None, f"the build ended before the signal: {''.join(stderr)}"
            assert time.monotonic() < deadline, "the build never reached distillation"
            time.sleep(0.05)
        process.send_signal(signum)
        process.wait(timeout=300)
        reader.join(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, "".join(stderr)
    assert "interrupted:" in "".join(stderr).strip().splitlines()[-1]
    if previous:
        assert [p.name for p in parent.iterdir()] == ["run"]
        assert {p.name: p.read_text() for p in out.iterdir()} == PREVIOUS
    else:
        assert list(parent.iterdir()) == []


def test_a_run_folder_writes_nothing_before_its_block_and_leaves_nothing_after_an_interrupt_in_it(tmp_path):
    from foldship.pipeline.run_folder import RunFolder

    folder = RunFolder(tmp_path / "runs" / "nested" / "run")
    assert list(tmp_path.iterdir()) == []  # a signal between construction and the block has nothing to leave
    with pytest.raises(KeyboardInterrupt):
        with folder:
            folder.path("report.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # staging folder and the folders created above it are gone
    with RunFolder(tmp_path / "runs" / "run") as folder:
        folder.path("report.json").write_text("{}")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["run"]


@contextlib.contextmanager
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this block, whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_the_moment_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """SIGINT the instant the staging folder exists (the window CI's sigint-load build once hit, when the
    folder was named only after mkdtemp returned): it is named before it is made, so it goes."""
    from foldship.pipeline.run_folder import RunFolder

    make = os.mkdir

    def make_then_signal(path, *args, **kwargs):
        make(path, *args, **kwargs)
        if Path(path).name.startswith(".run."):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "mkdir", make_then_signal)
    with sigint_raises(), pytest.raises(KeyboardInterrupt):
        with RunFolder(tmp_path / "runs" / "run"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_deferred_signals_wait_for_the_block_with_other_threads_running():
    """A process-directed SIGINT while another thread runs (a progress bar's, a thread pool's) waits until
    the block is done: masking it in this thread alone would let the kernel hand it to the other."""
    from foldship.pipeline.run_folder import signals_deferred

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    finished = False
    try:
        with sigint_raises(), pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler would run here, were the signal not held
                finished = True
    finally:
        stop.set()
        other.join()
    assert finished
