"""Gates: every configured limit is checked, a failing one exits 3 and is named, the report is still
written; limits that cannot mean anything are bad input (exit 2). Through the real CLI."""
import json

import pytest

from foldship.errors import BadInput
from foldship.pipeline.config import load_config
from foldship.validators.gates import GATES, check_limits, evaluate_gates

from .conftest import invoke_cli, write_config

QUICK = {"latency_min_seconds": 0.0, "latency_min_runs": 3, "latency_warmup": 1, "limit": 300, "batches": [1, 16],
         "exporter": "legacy", "shrinker": "none",
         "threads": 1}  # one thread: a busy 2-core machine stalls PyTorch's thread barriers


@pytest.fixture(scope="module")
def quick_config(tmp_path_factory):
    return write_config(tmp_path_factory, QUICK)


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, quick_config):
    """Ratio 0.7 with a 0.1-point accuracy budget: must fail; the generous gates beside it must pass."""
    out = tmp_path_factory.mktemp("runs") / "gated"
    result = invoke_cli("build", "--config", str(quick_config), "--out", str(out), "--quiet", "--ratio", "0.7",
                     "--method", "prune-l2", "--max-accuracy-drop", "0.001", "--min-agreement", "0.99",
                     "--min-speedup", "0.01", "--max-p99-ms", "100000", "--max-size-mb", "100")
    return result, out


def test_failing_gates_exit_3_and_are_named(gated_run):
    result, out = gated_run
    assert result.returncode == 3, result.stderr
    assert "gate failed: max_accuracy_drop, min_agreement" in result.stderr
    report = json.loads((out / "report.json").read_text())
    verdicts = {g["name"]: g["passed"] for g in report["gates"]["results"]}
    assert verdicts == {"max_accuracy_drop": False, "min_agreement": False, "min_speedup": True,
                        "max_p99_ms": True, "max_size_mb": True}
    assert report["gates"]["passed"] is False
    by_name = {g["name"]: g for g in report["gates"]["results"]}
    drop = report["baseline"]["accuracy"] - report["compressed"]["accuracy"]
    assert by_name["max_accuracy_drop"]["value"] == pytest.approx(drop) and drop > 0.001
    assert by_name["min_agreement"]["value"] == report["agreement"]["top1_agreement"] < 0.99
    assert by_name["max_size_mb"]["value"] == pytest.approx(report["compressed"]["size_bytes"] / 1e6)
    # min_speedup judges the lower end of the speedup interval the report states (6 interleaved blocks).
    assert by_name["min_speedup"]["value"] == pytest.approx(report["speed"]["low"], abs=1e-4) and report["speed"]["blocks"] == 6
    assert by_name["max_p99_ms"]["value"] == report["compressed"]["latency"]["onnxruntime-cpu"]["batch1"]["p99_ms"]
    summary = (out / "report.md").read_text()
    assert "**Gates: FAILED: max_accuracy_drop" in summary and "min_agreement (" in summary
    assert (out / "latency.png").stat().st_size > 0


def test_passing_gates_exit_0(gated_run, tmp_path):
    _, run = gated_run
    out = tmp_path / "revalidated"
    result = invoke_cli("validate", str(run), "--out", str(out), "--quiet", "--limit", "300", "--batch", "16",
                     "--min-seconds", "0", "--threads", "1", "--max-accuracy-drop", "0.9", "--min-agreement", "0.01",
                     "--max-size-mb", "100")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["gates"]["passed"] is True and len(report["gates"]["results"]) == 3
    assert "**Gates: PASSED** (all 3)" in (out / "report.md").read_text()


@pytest.mark.parametrize("overrides,message", [
    ({"min_agreement": 1.5}, "--min-agreement is a fraction in [0, 1]"),
    ({"max_accuracy_drop": -0.1}, "--max-accuracy-drop is a fraction in [0, 1]"),
    ({"max_p99_ms": 0}, "--max-p99-ms must be positive"),
    ({"max_size_mb": -1}, "--max-size-mb must be positive"),
    ({"batches": [1, 0]}, "batches must be positive integers"),
    ({"latency_min_runs": 0}, "latency protocol needs"),
    ({"ort_optimization": "max"}, "unknown ONNX Runtime optimization level"),
    ({"backends": ["tpu"]}, "unknown backend(s) tpu"),
])
def test_meaningless_settings_are_bad_input(overrides, message):
    with pytest.raises(BadInput) as info:
        load_config(None, **overrides)
    assert message in str(info.value)


def test_each_gate_compares_in_its_direction():
    measured = {"accuracy_drop": 0.02, "agreement": 0.95, "speedup": 1.5, "p99_ms": 3.0, "size_mb": 1.2}
    results = evaluate_gates(measured, {"max_accuracy_drop": 0.01, "min_agreement": 0.9, "min_speedup": 2.0,
                                        "max_p99_ms": 3.0, "max_size_mb": None})
    assert [(g.name, g.rule, g.passed) for g in results] == [
        ("max_accuracy_drop", "<=", False), ("min_agreement", ">=", True), ("min_speedup", ">=", False),
        ("max_p99_ms", "<=", True)]
    assert all(g.measures == GATES[g.name] for g in results)


def test_a_gate_that_cannot_be_measured_fails():
    (result,) = evaluate_gates({"speedup": None}, {"min_speedup": 1.0})
    assert result.passed is False and result.value is None


def test_check_limits():
    assert check_limits({"min_agreement": 0.99, "max_size_mb": None}) == {"min_agreement": 0.99, "max_size_mb": None}
    with pytest.raises(BadInput, match="--min-speedup must be positive"):
        check_limits({"min_speedup": 0})
