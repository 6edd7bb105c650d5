"""Does the MAC reduction show up as speed? ResNet-56 folded at ratio 0.5, through the real build.

1. ``foldship build`` ResNet-56, fold, ratio 0.5, Fold-AR, for each configuration in BUILDS:
   ``--groups all`` with raw widths (``round_to 1``: 8/16/32 channels) and with ``round_to auto``
   (this CPU's ONNX Runtime block: 16 on AVX-512, so the 16-channel stage stays whole), and
   ``--groups inner`` (residual streams whole) with both, each with the build's default protocol
   (the models taking turns block by block). Their report.md files are the product's output; a
   configuration the engine refuses is printed as not built, with its reason.
2. The builds' ONNX files (the baseline and every compressed model) timed again in one run,
   interleaved (``foldship.validators.latency.time_artifacts``: every model takes ``--trials``
   blocks in turn), under ONNX Runtime CPU session variants (intra-op threads, graph optimization
   level, spinning, clock).

Prints the baseline and compressed p50 at batch 64 side by side, the speedup with its per-round
interval, the MAC ratio and the share of the possible gain realised, (speedup - 1) / (1 / MAC
ratio - 1), and writes benchmarks/results/latency_resnet56.json.

    .venv/bin/python benchmarks/latency_resnet56.py [--trials 6] [--min-seconds 2] [--skip-build] [--variants 0 4]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from foldship.errors import BadInput
from foldship.pipeline.build import build
from foldship.pipeline.config import SHARED_DATA, load_config
from foldship.pipeline.environment import fingerprint, keep_freed_memory
from foldship.pipeline.report import load_run
from foldship.progress import StageProgress
from foldship.validators import LatencyProtocol, OrtSettings, onnx_artifact, onnx_macs
from foldship.validators.latency import time_artifacts
from foldship.validators.speed import Speedup, realised_share, speed_sentence

CHECKPOINT = SHARED_DATA / "checkpoints/cifar10_resnet_akamaster/resnet56-4bfd9763.th"
# name: (groups, round_to). A configuration the engine refuses is printed as not built and left out
# of the timing.
BUILDS = {"all-raw": ("all", 1), "all-auto": ("all", "auto"),
          "inner-raw": ("inner", 1), "inner-auto": ("inner", "auto")}
BATCHES = (1, 64)
# (label, intra-op threads, graph optimization level, spinning, clock); the first is the build's default.
# The "cpu" clock times the one compute thread's CPU time: on a busy shared machine it shows what
# the computation costs, where wall time also counts waiting for a core.
VARIANTS = [
    ("default: 2 threads, all, no spin", 2, "all", False, "wall"),
    ("2 threads, all, spin", 2, "all", True, "wall"),
    ("2 threads, extended (no NCHWc), no spin", 2, "extended", False, "wall"),
    ("1 thread, all", 1, "all", False, "wall"),
    ("1 thread, all, CPU-time clock", 1, "all", False, "cpu"),
    ("1 thread, extended (no NCHWc), CPU-time clock", 1, "extended", False, "cpu"),
    ("1 thread, basic, CPU-time clock", 1, "basic", False, "cpu"),
]


def folder(root: Path, name: str) -> Path:
    return root / f"resnet56-fold0.5-{name}"


def build_runs(root: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The product's own output: each build with its default protocol; and the refused builds."""
    reports, refused = {}, {}
    for name, (groups, round_to) in BUILDS.items():
        config = load_config(None, model="cifar_resnet56", checkpoint=str(CHECKPOINT), method="fold", ratio=0.5,
                             groups=groups, repair="fold-ar", round_to=round_to, out=str(folder(root, name)),
                             batches=list(BATCHES), overwrite=True)
        start = time.perf_counter()
        try:
            reports[name] = build(config, StageProgress()).report
        except BadInput as error:
            refused[name] = str(error)
            print(f"not built {name}: {error}", flush=True)
            continue
        print(f"built {name} in {time.perf_counter() - start:.0f} s: {reports[name]['speed']['sentence']}", flush=True)
    return reports, refused


def time_variants(root: Path, built: list[str], variants: list[tuple], trials: int, min_seconds: float) -> list[dict]:
    models = [onnx_artifact("baseline", folder(root, built[0]) / "baseline.onnx")]
    models += [onnx_artifact(name, folder(root, name) / "compressed.onnx") for name in built]
    macs = {a.name: onnx_macs(a.path) for a in models}
    rows = []
    for label, threads, optimization, spinning, clock in variants:
        protocol = LatencyProtocol(min_seconds=min_seconds, threads=threads, trials=trials, clock=clock)
        timed = {batch: time_artifacts(models, "onnxruntime-cpu", (3, 32, 32), batch, protocol,
                                       OrtSettings(spinning, optimization)) for batch in BATCHES}
        for name in built:
            mac_ratio = macs[name] / macs["baseline"]
            row = {"variant": label, "threads": threads, "optimization": optimization, "spinning": spinning,
                   "clock": clock, "build": name, "mac_ratio": mac_ratio}
            for batch in BATCHES:
                base, comp = timed[batch]["baseline"], timed[batch][name]
                speed = Speedup.from_blocks(base.block_p50_ms, comp.block_p50_ms)
                row[f"batch{batch}"] = {"baseline_p50_ms": base.p50_ms, "compressed_p50_ms": comp.p50_ms,
                                        "speedup": speed.as_dict(), "runs": [base.runs, comp.runs],
                                        "realised_share": realised_share(speed.value, mac_ratio),
                                        "sentence": speed_sentence(speed, batch, mac_ratio)}
            rows.append(row)
            b64 = row["batch64"]
            print(f"{label:42s} {name:9s} b64 {b64['baseline_p50_ms']:7.1f} -> {b64['compressed_p50_ms']:7.1f} ms: "
                  f"{b64['sentence']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="blocks per model and batch, taken in turns")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per model and batch, over its blocks")
    parser.add_argument("--runs", default="runs/bench", help="where the builds' run folders go")
    parser.add_argument("--skip-build", action="store_true", help="reuse the run folders of an earlier run")
    parser.add_argument("--out", default="benchmarks/results/latency_resnet56.json")
    parser.add_argument("--variants", type=int, nargs="+", default=[0, 4], help="indices into VARIANTS")
    args = parser.parse_args()

    keep_freed_memory()  # as the CLI does
    root = Path(args.runs)
    if args.skip_build:
        builds = {name: load_run(folder(root, name)) for name in BUILDS if (folder(root, name) / "report.json").exists()}
        refused = {name: "no run folder from an earlier run" for name in BUILDS if name not in builds}
    else:
        builds, refused = build_runs(root)
    rows = time_variants(root, list(builds), [VARIANTS[i] for i in args.variants], args.trials, args.min_seconds)

    print(f"\nONNX Runtime CPU, {args.trials} blocks per model in turns; p50 over all blocks; speedup: median of "
          f"per-round ratios (interval: their range)\n")
    print("| session | build | widths rule | MAC ratio | b64 p50 baseline -> compressed | b64 speedup (interval) | "
          "share of possible gain | b1 speedup |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        b1, b64 = r["batch1"], r["batch64"]
        rule = builds[r["build"]]["width_rule"]["round_to"] if "width_rule" in builds[r["build"]] else "?"
        s64, s1 = b64["speedup"], b1["speedup"]
        print(f"| {r['variant']} | {r['build']} | round_to {rule} | {r['mac_ratio']:.3f} | "
              f"{b64['baseline_p50_ms']:.1f} -> {b64['compressed_p50_ms']:.1f} ms | {s64['value']:.2f}x "
              f"({s64['low']:.2f}-{s64['high']:.2f}) | **{100 * b64['realised_share']:.0f} %** | {s1['value']:.2f}x |")
    for name, why in refused.items():
        print(f"| not built | {name} | round_to {BUILDS[name][1]} | | | | | {why} |")
    result = {
        "refused": refused,
        "builds": {name: {k: report.get(k) for k in ("mac_ratio", "speedup", "speedup_interval", "speed", "width_rule",
                                                   "latency_protocol")}
                   | {"baseline_latency": report["baseline"]["latency"],
                      "compressed_latency": report["compressed"]["latency"],
                      "accuracy": [report["baseline"]["accuracy"], report["compressed"]["accuracy"]],
                      "widths": {g["name"]: g["kept"] for g in report["compression"]["groups"]}}
                   for name, report in builds.items()},
        "variants": rows,
        "trials": args.trials, "min_seconds": args.min_seconds,
        "environment": fingerprint(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
