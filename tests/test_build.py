"""`foldship build` end to end through the real CLI: run folder, report schema, gates, bad input."""
import json

import pytest

from .conftest import CIFAR_LOSSLESS, RESNET20, invoke_cli, run_cli, write_config

# All 1,000 images (the checkpoint's known 915 correct); the shortest latency protocol, since the report's
# latency is checked for its layout and order (p50 <= p90 <= p99), never for speed.
FAST = {"batches": [1, 64], "latency_min_seconds": 0, "latency_min_runs": 6, "latency_warmup": 1, "limit": 1000}


@pytest.fixture(scope="module")
def fast_config(tmp_path_factory):
    return write_config(tmp_path_factory, FAST)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, fast_config):
    out = tmp_path_factory.mktemp("runs") / "demo"
    result = run_cli("build", "--config", str(fast_config), "--out", str(out), "--quiet")
    return result, out


def test_build_writes_complete_run_folder(demo_run):
    result, out = demo_run
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "baseline.onnx", "compressed.json", "compressed.onnx", "compressed.safetensors", "latency.png",
        "latency_samples.json", "report.json", "report.md"]


def test_run_folder_holds_the_compressed_model_as_data(demo_run):
    import foldship
    from foldship.validators import count_params

    _, out = demo_run
    report = json.loads((out / "report.json").read_text())
    assert report["saved_model"] == {"spec": "compressed.json", "weights": "compressed.safetensors"}
    assert count_params(foldship.load_compressed(out).model) == report["compressed"]["params"] == 128_017


def test_report_schema_and_real_numbers(demo_run):
    _, out = demo_run
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "fold" and report["ratio"] == 0.3 and report["seed"] == 0
    base, comp = report["baseline"], report["compressed"]
    assert (base["correct"], base["total"]) == (915, 1000) and base["accuracy"] == 0.915
    assert base["params"] == 269_722 and comp["params"] == 128_017
    assert comp["macs"] < base["macs"] and 0 <= comp["accuracy"] <= 1
    for side in (base, comp):
        for backend in ("onnxruntime-cpu", "torch-cpu"):
            for batch in ("batch1", "batch64"):
                stats = side["latency"][backend][batch]
                assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] and stats["throughput_per_s"] > 0
    assert report["onnx_parity"]["baseline_top1_match"] == 1000
    assert report["onnx_parity"]["compressed_top1_match"] == 1000
    assert 0 <= report["agreement"]["top1_agreement"] <= 1
    env = report["environment"]
    assert env["packages"]["torch"] == "2.14.1" and env["python"] and env["cpu"]
    assert report["gates"] == {"passed": True, "results": []}
    assert report["residual_streams"] in ("compressed", "kept whole")
    assert "| top-1 (ONNX Runtime) | 91.5% (915/1000)" in (out / "report.md").read_text()


def test_failed_gate_exits_3_and_names_it(tmp_path, fast_config):
    out = tmp_path / "gated"
    result = invoke_cli("build", "--config", str(fast_config), "--out", str(out), "--quiet", "--ratio", "0.7",
                     "--method", "prune-l2", "--exporter", "legacy", "--max-accuracy-drop", "0.001")
    assert result.returncode == 3, result.stderr
    assert "max_accuracy_drop" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["gates"]["passed"] is False
    assert report["gates"]["results"][0]["name"] == "max_accuracy_drop"


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "ratio 1.5 is outside (0, 1)"),
    (["--method", "magic"], "unknown method"),
    (["--model", "cifar_resnet32"], "needs a trained checkpoint"),
    (["--checkpoint", "/nonexistent/x.th"], "does not exist"),
    (["--data", "/nonexistent/data.npz"], "does not exist"),
    (["--model", "resnet9000"], "unknown model"),
])
def test_bad_input_exits_2_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "runs" / "bad"
    result = invoke_cli("build", "--out", str(out), "--quiet", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_existing_output_folder_is_refused(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke_cli("build", "--out", str(out), "--quiet")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_wrong_label_range_is_refused(tmp_path):
    import numpy as np

    data = np.load(CIFAR_LOSSLESS)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=data["x"][:10], y=data["y"][:10] + 20)
    result = invoke_cli("build", "--data", str(bad), "--checkpoint", str(RESNET20), "--out", str(tmp_path / "o"), "--quiet")
    assert result.returncode == 2 and "labels in [" in result.stderr
    assert not (tmp_path / "o").exists()
