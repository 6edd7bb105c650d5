"""Latency on target machines: `foldship bench RUN_DIR` in an environment without PyTorch (only
requirements-edge.lock's packages), and `foldship validate RUN_DIR --latency` merging its JSON into the
run's report and gates. A real run folder (ResNet-20 and its half-pruned copy, exported to ONNX and
validated on real CIFAR-10 images), real ONNX Runtime sessions."""
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from foldship.compress.engine import compress_model
from foldship.errors import BadInput
from foldship.exporters import export_onnx
from foldship.pipeline.config import load_config
from foldship.pipeline.targets import bench_run, merge_latency
from foldship.pipeline.validate import validate_artifacts

from .conftest import CIFAR_LOSSLESS, ROOT

QUICK = dict(latency_min_seconds=0.0, latency_min_runs=3, latency_warmup=1, limit=64, batches=[1, 4], threads=1,
             backends=["onnxruntime-cpu"])


@pytest.fixture(scope="module")
def run_folder(resnet20, tmp_path_factory):
    """A run folder as build leaves it: both ONNX files beside the report validate wrote for them,
    whose own speed gate (--min-speedup 0.01) is the limit a target is judged by by default."""
    onnx = tmp_path_factory.mktemp("onnx")
    example = resnet20.example_inputs(2)
    export_onnx(resnet20.model, example, onnx / "baseline.onnx", "legacy")
    pruned = compress_model(resnet20.model, example, "prune-l2", 0.5, 0, "inner", {}, None, 1).model
    export_onnx(pruned, example, onnx / "compressed.onnx", "legacy")
    run = tmp_path_factory.mktemp("runs") / "run"
    config = load_config(None, out=str(run), min_speedup=0.01, **QUICK)
    validate_artifacts([onnx / "baseline.onnx", onnx / "compressed.onnx"], config, str(CIFAR_LOSSLESS))
    for name in ("baseline.onnx", "compressed.onnx"):
        shutil.copy(onnx / name, run / name)
    return run


@pytest.fixture(scope="module")
def bench(run_folder):
    return bench_run(run_folder, name="board-a", batches=[1, 2], threads=1, min_seconds=0.0)


def test_bench_interleaves_the_run_folders_two_files(run_folder, bench):
    for side in ("baseline", "compressed"):
        digest = hashlib.sha256((run_folder / f"{side}.onnx").read_bytes()).hexdigest()
        assert bench["run"]["files"][side]["sha256"] == digest
    cpu = bench["latency"]["onnxruntime-cpu"]
    for key in ("batch1", "batch2"):
        base, comp = cpu["baseline"][key], cpu["compressed"][key]
        # 6 blocks each, taken in turns; min_runs 20 split over them: ceil(20 / 6) = 4 runs a block.
        assert len(base["block_p50_ms"]) == len(comp["block_p50_ms"]) == 6 and base["runs"] == comp["runs"] == 24
        ratios = [b / c for b, c in zip(base["block_p50_ms"], comp["block_p50_ms"])]  # round by round
        interval = bench["speedup_interval"]["onnxruntime-cpu"][key]
        assert bench["speedup"]["onnxruntime-cpu"][key] == pytest.approx(statistics.median(ratios), rel=1e-3)
        assert (interval["low"], interval["high"]) == pytest.approx((min(ratios), max(ratios)), rel=1e-3)
    assert bench["input_shape"] == [3, 32, 32] and bench["latency_protocol"]["threads"] == 1
    assert bench["latency_protocol"]["providers"] == {"onnxruntime-cpu": "CPUExecutionProvider"}
    machine = bench["machine"]
    assert 1 <= machine["physical_cores"] <= os.cpu_count() and machine["packages"]["onnxruntime"]
    assert bench["target"] == "board-a" and bench["format"] == "foldship-bench/2"


def test_merge_adds_one_entry_per_target_and_judges_each(run_folder, bench, tmp_path):
    files = []
    for name in ("board-a", "board-b"):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(bench | {"target": name}))
    speedup = bench["speedup_interval"]["onnxruntime-cpu"]["batch2"]["low"]  # the gate judges the lower end
    report, folder = merge_latency(run_folder, files, tmp_path / "merged", {"min_speedup": speedup + 1})
    assert list(report["targets"]) == ["board-a", "board-b"]
    assert report["targets"]["board-a"]["latency"] == bench["latency"]
    target_gates = [g for g in report["gates"]["results"] if g.get("target")]
    assert [(g["target"], g["backend"], g["name"]) for g in target_gates] == [
        ("board-a", "onnxruntime-cpu", "min_speedup"), ("board-b", "onnxruntime-cpu", "min_speedup")]
    assert all(g["value"] == speedup and g["limit"] == speedup + 1 and not g["passed"] for g in target_gates)
    assert not report["gates"]["passed"]
    own = [g for g in report["gates"]["results"] if not g.get("target")]
    assert own == json.loads((run_folder / "report.json").read_text())["gates"]["results"]  # kept as judged
    markdown = (tmp_path / "merged" / "report.md").read_text()
    assert "## Latency on targets" in markdown and "min_speedup on board-b (onnxruntime-cpu)" in markdown
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["latency.png", "latency_samples.json",
                                                                      "report.json", "report.md"]
    # Without limits given, a target is judged by the run's own (min_speedup 0.01 here).
    report, _ = merge_latency(run_folder, files[:1], tmp_path / "defaults")
    assert [(g["limit"], g["passed"]) for g in report["targets"]["board-a"]["gates"]] == [(0.01, True)]


@pytest.mark.parametrize("change,message", [
    (lambda b: b["run"]["files"]["compressed"].update(sha256="0" * 64), "timed another compressed.onnx"),
    (lambda b: b.update(format="something else"), "is not a run folder's bench file"),
])
def test_merge_refuses_timings_of_other_files(run_folder, bench, tmp_path, change, message):
    edited = json.loads(json.dumps(bench))
    change(edited)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(edited))
    with pytest.raises(BadInput, match=message):
        merge_latency(run_folder, [path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_refuses_two_files_of_one_target_and_limits_it_cannot_judge(run_folder, bench, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    with pytest.raises(BadInput, match="two --latency files name the target 'board-a'"):
        merge_latency(run_folder, [path, path], tmp_path / "out")
    with pytest.raises(BadInput, match="max_accuracy_drop cannot judge a target's timings"):
        merge_latency(run_folder, [path], tmp_path / "out", {"max_accuracy_drop": 0.01})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BadInput, match="is not valid JSON"):
        merge_latency(run_folder, [tmp_path / "broken.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("lscpu") is None or len(os.sched_getaffinity(0)) != os.cpu_count(),
                    reason="needs lscpu and every CPU of the machine")
def test_physical_cores_match_lscpu():
    from foldship.validators.threads import physical_cores

    listed = subprocess.run(["lscpu", "-p=CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    assert physical_cores() == len({line for line in listed.splitlines() if not line.startswith("#")})


def test_bench_refuses_backends_that_do_not_run_onnx_or_are_missing(run_folder):
    from foldship.validators.artifacts import onnx_backends

    with pytest.raises(BadInput, match="run on ONNX Runtime backends .* not torch-cpu"):
        bench_run(run_folder, backends=["torch-cpu"])
    if "onnxruntime-cuda" not in onnx_backends():  # without a GPU: one line, before anything is timed
        with pytest.raises(BadInput, match="onnxruntime-cuda not available on this machine"):
            bench_run(run_folder, backends=["onnxruntime-cuda"])


def light_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``names`` need, following their requirements (extras left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        found[name] = dist = metadata.distribution(name)
        todo += [r.name for r in map(Requirement, dist.requires or [])
                 if not r.marker or r.marker.evaluate({"extra": ""})]
    return list(found.values())


def light_venv(root) -> "os.PathLike":
    """A virtual environment holding only requirements-edge.lock's packages and what they need,
    linked from this environment's site-packages (nothing is downloaded)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    pins = [line.split("==")[0] for line in (ROOT / "requirements-edge.lock").read_text().splitlines()
            if line and not line.startswith("#")]
    for dist in light_closure(pins):
        for top in sorted({f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}):
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))
    return root / "bin" / "python"


def test_bench_and_merge_run_without_pytorch(run_folder, tmp_path):
    python = light_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"PYTHONPATH": str(ROOT)}
    check = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert check.returncode == 1 and "No module named 'torch'" in check.stderr

    def foldship(*args):
        return subprocess.run([python, "-m", "foldship", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    timed = foldship("bench", str(run_folder), "--json", "edge.json", "--batch", "2", "--threads", "1",
                     "--min-seconds", "0", "--name", "edge-box", "--quiet")
    assert timed.returncode == 0, timed.stderr
    result = json.loads((tmp_path / "edge.json").read_text())
    assert result["machine"]["packages"]["torch"] is None and result["machine"]["torch_threads"] is None
    speedup = result["speedup_interval"]["onnxruntime-cpu"]["batch2"]["low"]  # the gate judges the lower end

    merged = foldship("validate", str(run_folder), "--latency", "edge.json", "--out", "merged",
                      "--min-speedup", str(round(speedup * 2 + 1, 3)), "--max-p99-ms", "1e9")
    assert merged.returncode == 3, merged.stderr  # the speed gate on edge-box fails, the p99 gate passes
    assert "gate failed: min_speedup (edge-box, onnxruntime-cpu) (report in merged)" in merged.stderr
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    gates = {g["name"]: g for g in report["targets"]["edge-box"]["gates"]}
    assert gates["min_speedup"]["value"] == speedup and not gates["min_speedup"]["passed"]
    p99 = result["latency"]["onnxruntime-cpu"]["compressed"]["batch1"]["p99_ms"]
    assert gates["max_p99_ms"]["value"] == p99 and gates["max_p99_ms"]["passed"]
    assert "| edge-box |" in (tmp_path / "merged" / "report.md").read_text()

    refused = foldship("validate", str(run_folder), "--latency", "edge.json", "--data", "x.npz", "--out", "again")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--data" in refused.stderr
    assert not (tmp_path / "again").exists()
    heavy = foldship("inspect")  # the compression side: one line saying what this install runs
    assert heavy.returncode == 2 and heavy.stderr.count("\n") == 1 and "needs torch" in heavy.stderr
