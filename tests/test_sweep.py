"""`foldship sweep` on the real ResNet-20: a killed and restarted CLI sweep ends with one row per job,
the paired table matches the rows, --select rebuilds the chosen job, and Ray gives the same accuracy."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from foldship.errors import BadInput
from foldship.sweep import load_sweep_config, run_sweep
from foldship.sweep.select import choose
from foldship.sweep.store import RESULTS, Row
from foldship.validators import evaluate_torch

from .conftest import ROOT, RESNET20, cli_command, invoke_cli

# A small grid with a fast build (200 images, batch 1 only, short timing, no shrink): 4 jobs.
FAST = {"limit": 200, "batches": [1], "latency_min_seconds": 0.02, "latency_min_runs": 5, "latency_warmup": 2,
        "exporter": "legacy", "shrinker": "none", "backends": ["onnxruntime-cpu"], "threads": 1,
        "checkpoint": [f"cifar_resnet20={RESNET20}"], "method": ["fold", "prune-l1"], "ratio": [0.3, 0.5],
        "repair": ["none"], "max_accuracy_drop": 0.75, "workers": 2}


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweepcfg") / "sweep.yaml"
    path.write_text(yaml.safe_dump(FAST))
    return path


def stored_lines(out: Path) -> list[str]:
    path = out / RESULTS
    return path.read_text().splitlines() if path.exists() else []


def start(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command("sweep", "--config", str(config), "--out", str(out), "--quiet", *extra),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop_after_rows(process: subprocess.Popen, out: Path, rows: int, signum: int) -> str:
    """Send ``signum`` once ``rows`` rows are stored (the sweep still running); return its stderr."""
    try:
        deadline = time.monotonic() + 600
        while len(stored_lines(out)) < rows:
            assert process.poll() is None, f"the sweep ended before the signal: {process.communicate()}"
            assert time.monotonic() < deadline, "the sweep stored no row"
            time.sleep(0.05)
        process.send_signal(signum)
        return process.communicate(timeout=300)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, sweep_config):
    """SIGTERM after the first row, SIGKILL after the next, then a run to the end with --select (in this
    process: no signal is sent to it)."""
    out = tmp_path_factory.mktemp("sweeps") / "local"
    first = start(sweep_config, out)
    stderr = stop_after_rows(first, out, 1, signal.SIGTERM)
    assert first.returncode == 130, stderr
    after_term = stored_lines(out)
    second = start(sweep_config, out)
    stop_after_rows(second, out, len(after_term) + 1, signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    last = invoke_cli("sweep", "--config", str(sweep_config), "--out", str(out), "--quiet", "--select",
                      "--select-by", "size")
    assert last.returncode == 0, last.stderr
    return out, after_term


def test_killed_and_restarted_sweep_has_one_row_per_job(local_sweep, resnet20, cifar_eval):
    out, after_term = local_sweep
    lines = stored_lines(out)
    rows = [Row(**json.loads(line)) for line in lines]
    keys = [r.key for r in rows]
    assert len(rows) == 4 and len(set(keys)) == 4
    assert {(r.method, r.ratio) for r in rows} == {("fold", 0.3), ("fold", 0.5), ("prune-l1", 0.3), ("prune-l1", 0.5)}
    assert lines[:len(after_term)] == after_term  # rows stored before the kill stay as they were
    baseline = evaluate_torch(resnet20.model, cifar_eval.x[:200]).correct(cifar_eval.y[:200])  # the first 200
    assert all(r.report["baseline"]["correct"] == baseline and r.report["data"]["images"] == 200 for r in rows)
    assert all(r.threads == 1 and len(r.node["cpus"]) == 1 for r in rows)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["status"] == "complete" and summary["grid"]["jobs"] == 4
    assert summary["settings"]["seed"] == 0 and summary["environment"]["packages"]["torch"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "accuracy_vs_ratio.png", "pareto.png", "results.jsonl",
                                                     "selected", "sweep.json", "sweep.md"]
    for plot in ("accuracy_vs_ratio.png", "pareto.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_table_matches_rows(local_sweep):
    out, _ = local_sweep
    rows = {(r.method, r.ratio): r for r in (Row(**json.loads(line)) for line in stored_lines(out))}
    paired = json.loads((out / "sweep.json").read_text())["paired"]
    assert [(p["ratio"], p["pruner"]) for p in paired] == [(0.3, "prune-l1"), (0.5, "prune-l1")]
    table = (out / "sweep.md").read_text()
    for p in paired:
        fold, prune = rows["fold", p["ratio"]], rows["prune-l1", p["ratio"]]
        difference = 100 * (fold.accuracy - prune.accuracy)
        assert p["checkpoints"] == 1 and p["mean_difference_pt"] == pytest.approx(difference)
        assert p["fold_wins"] == int(fold.accuracy > prune.accuracy)
        assert f"| none | {p['ratio']} | prune-l1 | 1 | {100 * fold.accuracy:.1f}% | {100 * prune.accuracy:.1f}% | " \
               f"{difference:+.1f} |" in table


def test_select_rebuilds_the_smallest_passing_job(local_sweep):
    out, _ = local_sweep
    rows = [Row(**json.loads(line)) for line in stored_lines(out)]
    passing = [r for r in rows if r.report["gates"]["passed"]]
    assert 0 < len(passing) < len(rows)  # the accuracy gate rules some jobs out
    best = min(passing, key=lambda r: (r.size_bytes, -r.accuracy, r.key))
    selection = json.loads((out / "sweep.json").read_text())["selection"]
    assert selection["job"] == best.key and selection["by"] == "size" and selection["run_folder_gates_passed"]
    report = json.loads((out / "selected" / "report.json").read_text())
    assert (report["method"], report["ratio"], report["repair"]) == (best.method, best.ratio, best.repair)
    assert report["compressed"]["correct"] == best.report["compressed"]["correct"]  # deterministic rebuild
    assert (out / "selected" / "compressed.onnx").is_file()


def with_speed_verdict(row: Row, verdict: str) -> Row:
    """The same stored row with its engine judged ``verdict`` against its baseline."""
    report = copy.deepcopy(row.report)
    report["speed"]["verdict"] = verdict
    return dataclasses.replace(row, report=report)


def test_select_by_latency_never_ships_a_measurably_slower_engine(local_sweep):
    """Without a min_speedup gate, selecting by latency skips a passing job whose engine was measurably slower
    than its baseline; selecting by size does not look at speed."""
    out, _ = local_sweep
    rows = sorted((Row(**json.loads(line)) for line in stored_lines(out)), key=lambda r: (r.latency_ms(), r.key))
    everyone = {"max_accuracy_drop": 1.0}  # every job passes the accuracy gate
    assert all(r.passes(everyone) for r in rows) and rows[0].latency_ms() < rows[1].latency_ms()
    fastest_slower = [with_speed_verdict(rows[0], "slower")] + [with_speed_verdict(r, "faster") for r in rows[1:]]
    selection = choose(fastest_slower, "latency", everyone)
    assert selection.row.key == rows[1].key and selection.slower_passed == 1
    all_slower = [with_speed_verdict(r, "slower") for r in rows]
    selection = choose(all_slower, "latency", everyone)
    assert selection.row is None and selection.slower_passed == len(rows) == 4
    assert "4 passed but were measurably slower" in selection.as_dict()["reason"]
    smallest = min(rows, key=lambda r: (r.size_bytes, -r.accuracy, r.key))
    assert choose(all_slower, "size", everyone).row.key == smallest.key


def test_ray_executor_gives_identical_accuracy(local_sweep, sweep_config, tmp_path):
    pytest.importorskip("ray")
    out, _ = local_sweep
    local = {r.key: r for r in (Row(**json.loads(line)) for line in stored_lines(out))}
    outcome = run_sweep(load_sweep_config(sweep_config, executor="ray", ratio=[0.5], out=str(tmp_path / "ray")))
    assert len(outcome.rows) == 2 and outcome.summary["executor"]["name"] == "ray"
    for row in outcome.rows:
        assert row.node["ray_node_id"] and row.node["hostname"]
        twin = local[row.key]
        for side in ("baseline", "compressed"):
            assert row.report[side]["correct"] == twin.report[side]["correct"]
            assert row.report[side]["per_class"] == twin.report[side]["per_class"]
        assert row.report["agreement"]["top1_agreement"] == twin.report["agreement"]["top1_agreement"]


def test_resume_with_other_settings_is_refused(local_sweep, sweep_config):
    out, _ = local_sweep
    before = (out / RESULTS).read_bytes()
    with pytest.raises(BadInput, match="other settings .*limit"):
        run_sweep(load_sweep_config(sweep_config, limit=100, out=str(out)))
    assert (out / RESULTS).read_bytes() == before


def test_resume_with_another_gate_limit_judges_rows_again(local_sweep, sweep_config, tmp_path):
    out, _ = local_sweep
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock", "selected"))
    outcome = run_sweep(load_sweep_config(sweep_config, max_accuracy_drop=0.0, select=True, out=str(copy)))
    assert outcome.summary["ran_now"] == 0 and (copy / RESULTS).read_bytes() == (out / RESULTS).read_bytes()
    assert outcome.selection.row is None and not (copy / "selected").exists()  # every job lost accuracy
    assert "| fail |" in (copy / "sweep.md").read_text() and "| pass |" not in (copy / "sweep.md").read_text()


@pytest.mark.parametrize("overrides,message", [
    ({"method": ["fold", "shrink"]}, "unknown method 'shrink'"),
    ({"method": []}, "method needs at least one value"),
    ({"ratio": [0.3, 1.5]}, "ratio"),
    ({"checkpoint": ["/nonexistent/checkpoints"]}, "does not exist"),
    ({"executor": "spark"}, "unknown executor"),
    ({"address": "ray://head:10001"}, "--address"),
    ({"select_by": "accuracy"}, "--select-by"),
])
def test_bad_input_writes_nothing(sweep_config, tmp_path, overrides, message):
    out = tmp_path / "sweep"
    with pytest.raises(BadInput, match=message):
        run_sweep(load_sweep_config(sweep_config, out=str(out), **{"executor": "local", **overrides}))
    assert not out.exists()


def test_folder_without_checkpoints_is_refused(sweep_config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no checkpoints"):
        load_sweep_config(sweep_config, checkpoint=[f"cifar_resnet20={tmp_path / 'empty'}"])


def test_recovery_is_a_sweep_axis(tmp_path):
    """finetune and its settings are grid keys: a plain and a distilled job of the same compression, each row
    carrying its recovery, the before-recovery top-1 of one equal to the plain job's top-1, and selection
    judging the distilled row like any other."""

    from .conftest import CIFAR_JPEG

    settings = FAST | {"method": ["fold"], "ratio": [0.3], "repair": ["fold-ar"], "groups": "inner",
                       "max_accuracy_drop": 1.0, "calibration_data": str(CIFAR_JPEG), "finetune": ["none", "distill"],
                       "finetune_epochs": [2], "finetune_batch": [32], "finetune_images": [256]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(settings))
    outcome = run_sweep(load_sweep_config(path, out=str(tmp_path / "sweep")))
    rows = {r.finetune: r for r in outcome.rows}
    label = "distill(epochs=2, batch=32, images=256)"
    assert sorted(rows) == [label, "none"]
    plain, distilled = rows["none"], rows[label]
    assert plain.key.endswith("|fold|0.3|fold-ar") and distilled.key == f"{plain.key}|{label}"
    assert plain.report["recovery"] is None and plain.accuracy_before_recovery is None
    recovery = distilled.report["recovery"]
    assert recovery["steps"] == 2 * 256 // 32 and recovery["images"] == 256
    # The same compressed model before recovery: PyTorch and ONNX Runtime agree on its top-1.
    assert recovery["before"]["correct"] == plain.report["compressed"]["correct"]
    assert distilled.accuracy_before_recovery == plain.accuracy
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "No pairs: no ratio and repair of this grid ran both fold" in table and "| fold top-1 |" not in table  # fold only
    assert f"| fold | 0.3 | fold-ar | {label} | {100 * distilled.accuracy:.1f}% | {100 * plain.accuracy:.1f}% |" in table
    assert outcome.summary["grid"]["finetunes"] == ["none", label]
    # 16 steps recover accuracy here (measured on the 1,000 images: 76.3 -> 82.3 %), so a gate between the two
    # rows' drops selects the distilled job, and one below both selects nothing.
    assert distilled.accuracy > plain.accuracy
    drops = [r.baseline_accuracy - r.accuracy for r in (distilled, plain)]
    assert choose(outcome.rows, "size", {"max_accuracy_drop": sum(drops) / 2}).row.key == distilled.key
    assert choose(outcome.rows, "size", {"max_accuracy_drop": min(drops) / 2}).row is None


def test_round_to_on_the_sweep_command_sets_every_jobs_widths(sweep_config, tmp_path):
    """`foldship sweep --round-to 8` builds each job with widths in multiples of 8, as build --round-to does:
    ratio 0.3 of ResNet-20's 16/32/64 inner channels is 11/22/44 raw, none a multiple of 8."""
    out = tmp_path / "sweep"
    result = invoke_cli("sweep", "--config", str(sweep_config), "--out", str(out), "--quiet", "--method", "fold",
                        "--ratio", "0.3", "--groups", "inner", "--round-to", "8")
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in stored_lines(out)]
    report = row["report"]
    assert report["round_to"] == 8
    narrowed = [g for g in report["compression"]["groups"] if g["kept"] < g["width"]]
    assert narrowed and all(g["kept"] % 8 == 0 for g in narrowed), narrowed
    refused = invoke_cli("sweep", "--config", str(sweep_config), "--out", str(tmp_path / "bad"), "--round-to", "some")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "round" in refused.stderr and not (tmp_path / "bad").exists()
