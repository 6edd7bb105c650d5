"""report.json / report.md / plots, `foldship validate` on two ONNX files and `foldship bench`, on real
ResNet-20 exports (baseline and pruned at two ratios) and real CIFAR-10 images."""
import json

import numpy as np
import pytest

from foldship.compress.engine import compress_model
from foldship.exporters import export_onnx
from foldship.pipeline.budget import plan_budget, validated_latency
from foldship.pipeline.config import load_config
from foldship.pipeline.report import budget_lines, run_title, speed_cell, write_sweep
from foldship.pipeline.validate import validate_artifacts
from foldship.validators import count_macs, onnx_macs

from .conftest import CIFAR_LOSSLESS, invoke_cli

QUICK = dict(latency_min_seconds=0.0, latency_min_runs=6, latency_warmup=1, limit=300, batches=[1, 16], threads=1,
             latency_trials=3)


@pytest.fixture(scope="module")
def onnx_files(resnet20, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    example = resnet20.example_inputs(2)
    export_onnx(resnet20.model, example, folder / "baseline.onnx", "legacy")
    macs = {"baseline": count_macs(resnet20.model, example)}
    for ratio in (0.3, 0.6):
        pruned = compress_model(resnet20.model, example, "prune-l1", ratio, 0, "inner", {}, None, 1).model
        export_onnx(pruned, example, folder / f"pruned{ratio}.onnx", "legacy")
        macs[ratio] = count_macs(pruned, example)
    return folder, macs


@pytest.fixture(scope="module")
def validated(onnx_files, tmp_path_factory):
    folder, _ = onnx_files
    runs = {}
    for ratio in (0.3, 0.6):
        config = load_config(None, out=str(tmp_path_factory.mktemp("validate") / f"r{ratio}"), min_agreement=0.5, **QUICK)
        runs[ratio] = validate_artifacts([folder / "baseline.onnx", folder / f"pruned{ratio}.onnx"], config,
                                         str(CIFAR_LOSSLESS))
    return runs


def test_macs_from_the_graph_match_the_module(onnx_files):
    folder, macs = onnx_files
    assert onnx_macs(folder / "baseline.onnx") == macs["baseline"] == 40_551_040
    assert onnx_macs(folder / "pruned0.6.onnx") == macs[0.6] < macs["baseline"]


def test_report_json_has_every_validation_entry(validated, onnx_files):
    _, macs = onnx_files
    report = json.loads(open(validated[0.3].out + "/report.json").read())
    base, comp = report["baseline"], report["compressed"]
    assert (base["correct"], base["total"]) == (274, 300) and base["accuracy"] == pytest.approx(274 / 300)
    assert base["top5_accuracy"] >= base["accuracy"] and len(base["per_class"]) == 10
    assert report["mac_ratio"] == pytest.approx(macs[0.3] / macs["baseline"])
    # The speedup is the median over rounds of the per-round block p50 ratios, recomputed here from the
    # blocks each side recorded; the headline's share is (speedup - 1) / (1 / MAC ratio - 1).
    blocks = [b / c for b, c in zip(base["latency"]["onnxruntime-cpu"]["batch16"]["block_p50_ms"],
                                    comp["latency"]["onnxruntime-cpu"]["batch16"]["block_p50_ms"])]
    speed = report["speedup"]["onnxruntime-cpu"]["batch16"]
    assert speed == pytest.approx(float(np.median(blocks)), rel=1e-3) and len(blocks) == report["latency_protocol"]["trials"]
    headline = report["speed"]
    assert (headline["backend"], headline["batch"], headline["blocks"]) == ("onnxruntime-cpu", 16, len(blocks))
    assert (headline["low"], headline["high"]) == pytest.approx((min(blocks), max(blocks)), rel=1e-3)
    # The report rounds the share, and the speedup it is recomputed from here, to 4 places.
    share_rounding = 5e-5 + 5e-5 / (1 / report["mac_ratio"] - 1)
    assert headline["realised_share"] == pytest.approx((speed - 1) / (1 / report["mac_ratio"] - 1), abs=share_rounding)
    assert headline["verdict"] == ("no measurable difference" if min(blocks) <= 1 <= max(blocks) else
                                   "faster" if speed > 1 else "slower")
    assert "speedup_vs_mac_ratio" not in report
    for side in (base, comp):
        for batch in ("batch1", "batch16"):
            stats = side["latency"]["onnxruntime-cpu"][batch]
            assert stats["runs"] >= 6 and len(stats["block_p50_ms"]) == 3 and stats["threads"] == 1 and stats["p50_ms"] <= stats["p99_ms"]
            assert stats["throughput_per_s"] > 0 and stats["peak_memory_mb"] is not None
    assert [a["name"] for a in report["artifacts"]] == ["baseline", "compressed"]
    assert report["agreement"]["tolerance"]["precision"] == "fp32" and 0 < report["agreement"]["top1_agreement"] < 1
    protocol = report["latency_protocol"]
    assert protocol["threads"] == 1 and protocol["batches"] == [1, 16] and protocol["min_runs"] == 6
    assert report["environment"]["packages"]["onnxruntime"] and report["gates"]["results"][0]["name"] == "min_agreement"
    samples = json.loads(open(validated[0.3].out + "/latency_samples.json").read())
    assert len(samples["compressed"]["onnxruntime-cpu"]["batch16"]) == comp["latency"]["onnxruntime-cpu"]["batch16"]["runs"]


def test_report_md_leads_with_the_verdict_and_the_table(validated):
    lines = open(validated[0.6].out + "/report.md").read().splitlines()
    assert lines[0] == "# foldship: validate baseline.onnx vs pruned0.6.onnx"
    assert lines[2].startswith("**Gates: ")
    assert lines[4] == "| metric | baseline | compressed | change |"
    text = "\n".join(lines)
    assert "| top-1 (ONNX Runtime) | 91.3% (274/300) |" in text
    assert "| onnxruntime-cpu batch16 p50 / p90 / p99 |" in text and "| onnxruntime-cpu batch1 throughput |" in text
    assert "Speed on ONNX Runtime CPU: **" in text and "at batch 16 for 0." in text
    assert "![latency distributions](latency.png)" in text
    assert "## Per-class top-1" in text and "## Every artifact" in text


def test_title_names_the_budget_of_a_budgeted_build():
    report = {"model": {"name": "timm:efficientnet_lite0"}, "method": "fold", "ratio": 0.3,
              "compression": {"budget": {"target": "macs", "goal": 0.8}}}
    assert run_title(report) == "timm:efficientnet_lite0 — fold at a 0.80x MAC budget"
    report["compression"]["budget"] = None
    assert run_title(report) == "timm:efficientnet_lite0 — fold at ratio 0.3"


def test_report_md_lists_every_group_a_budget_narrowed(resnet20):
    x = resnet20.example_inputs(2)
    plan = plan_budget(resnet20.model, x, "fold", target_macs=0.7, round_to=8, group_policy="inner", repair="fold-ar")
    lines = budget_lines(plan.summary())
    assert lines[0] == "## Budget" and lines[2].startswith(f"Target 0.70x MACs, planned {plan.mac_fraction:.3f}x MACs.")
    assert "with repair fold-ar" in lines[2] and f"of {len(plan.groups)} surveyed groups narrowed" in lines[2]
    narrowed = [g for g in plan.groups if g.width < g.size]
    rows = lines[6:-1]
    assert len(rows) == len(narrowed) >= 2 and lines[-1] == ""
    for row, group in zip(rows, narrowed):
        first_pass = next(g.width for g in plan.first_pass if g.name == group.name)
        assert row.startswith(f"| {group.name} | inner | {group.size} | {first_pass} | {group.width} | ")
    assert budget_lines(None) == []


def test_a_latency_goal_is_checked_against_the_builds_own_timing_of_the_same_kind():
    # 1.25x faster is 0.8x the latency; per-block speedups 1.1-1.6 are latencies 0.625-0.909.
    speed = {"backend": "onnxruntime-cpu", "batch": 16, "value": 1.25, "low": 1.1, "high": 1.6}
    budget = {"target": "latency", "goal": 0.75, "latency_fraction": 0.7139, "mac_fraction": 0.7098, "probe": "noise",
              "removed_blocks": [{"block": "blocks.5.2", "mac_share": 0.0852, "damage": 0.01}]}
    check = validated_latency(budget, speed)
    assert check == {"backend": "onnxruntime-cpu", "batch": 16, "latency_fraction": 0.8,
                     "latency_interval": [0.625, 0.9091], "met": False}
    assert validated_latency(budget | {"goal": 0.8}, speed)["met"]  # at the goal counts as met
    lines = budget_lines(budget | {"validated": check})
    assert lines[-2] == ("Validation timed the engine at 0.800x the baseline's latency (0.62–0.91) at batch 16 on "
                         "ONNX Runtime CPU: the 0.75x goal is **not met** in this timing (the plan's last round: 0.714x).")
    # Another batch, another backend or a MAC target: the plan's timing and the build's are not the same kind.
    assert validated_latency(budget, speed | {"batch": 64}) is None
    assert validated_latency(budget, speed | {"backend": "torch-cpu"}) is None
    assert validated_latency(budget | {"target": "macs"}, speed) is None and validated_latency(budget, None) is None


def test_plots_are_real_small_pngs(validated, tmp_path):
    import matplotlib.image

    latency_png = validated[0.3].out + "/latency.png"
    image = matplotlib.image.imread(latency_png)
    assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0.05  # not blank
    sweep = write_sweep([validated[0.3].out, validated[0.6].out], tmp_path / "sweep")
    by_folder = {r["folder"]: r for r in sweep["runs"]}
    for ratio in (0.3, 0.6):
        run = by_folder[validated[ratio].out]
        assert run["accuracy"] == validated[ratio].report["compressed"]["accuracy"]
        assert run["size_bytes"] == validated[ratio].report["compressed"]["size_bytes"]
    assert by_folder[validated[0.6].out]["size_bytes"] < by_folder[validated[0.3].out]["size_bytes"]
    speed = validated[0.3].report["speed"]
    assert f"| {speed_cell(speed)} |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert speed_cell(speed).startswith(speed["sentence"].split(" at batch")[0])
    for name in ("accuracy_vs_size.png", "sweep.md", "sweep.json"):
        assert (tmp_path / "sweep" / name).is_file()
    for png in (latency_png, tmp_path / "sweep" / "accuracy_vs_size.png"):
        data = open(png, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_bench_times_one_onnx_file(onnx_files, tmp_path):
    folder, _ = onnx_files
    out = tmp_path / "bench.json"
    result = invoke_cli("bench", str(folder / "pruned0.6.onnx"), "--batch", "8", "--min-seconds", "0", "--threads", "1",
                     "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "onnxruntime-cpu" in result.stdout
    bench = json.loads(out.read_text())
    assert set(bench["latency"]["onnxruntime-cpu"]) == {"batch1", "batch8"}
    assert bench["input_shape"] == [3, 32, 32] and bench["precision"] == "fp32"
    assert np.isfinite(bench["latency"]["onnxruntime-cpu"]["batch8"]["p99_ms"])


def test_validate_refuses_what_it_cannot_judge(onnx_files, tmp_path):
    from foldship.errors import BadInput

    folder, _ = onnx_files
    config = load_config(None, out=str(tmp_path / "x"), **QUICK)
    with pytest.raises(BadInput, match="give one run folder, two model files"):
        validate_artifacts([folder / "baseline.onnx"], config)
    with pytest.raises(BadInput, match="missing.txt does not exist"):
        validate_artifacts([folder / "baseline.onnx", folder / "missing.txt"], config)
    assert not (tmp_path / "x").exists()
