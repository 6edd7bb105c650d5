"""Does the MAC reduction show up as speed? ResNet-56 folded at ratio 0.5, through the real build.

1. ``foldship build`` ResNet-56, fold, ratio 0.5, Fold-AR, for each group policy (``all``: residual
   streams folded too; ``inner``: streams kept whole), with the build's default latency protocol
   (each model in its own block, batch 1 and 64). Their report.md files are the product's output.
2. The two builds' ONNX files (baseline and both compressed models) timed again under ONNX
   Runtime CPU session variants (intra-op threads, graph optimization level, spinning, clock), each
   model in its own block, models alternating block by block over ``--trials`` trials (A B C A B
   C ...) so slow drift on a shared machine hits every model alike; samples pool per model.

Prints a Markdown table (speedup at batch 1 and 64, and speedup x MAC ratio: the fraction of the
theoretical gain) and writes benchmarks/results/latency_resnet56.json.

    .venv/bin/python benchmarks/latency_resnet56.py [--trials 3] [--min-seconds 1.0] [--skip-build]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from foldship.pipeline.build import build
from foldship.pipeline.config import SHARED_DATA, load_config
from foldship.pipeline.environment import fingerprint
from foldship.pipeline.progress import StageProgress
from foldship.pipeline.report import load_run
from foldship.validators import LatencyProtocol, OrtSettings, onnx_artifact, onnx_macs
from foldship.validators.stage import ValidationSettings, time_blocks

CHECKPOINT = SHARED_DATA / "checkpoints/cifar10_resnet_akamaster/resnet56-4bfd9763.th"
POLICIES = ("all", "inner")
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


def build_runs(root: Path) -> dict[str, dict]:
    """The product's own output: each build with its default protocol (one block per model and backend)."""
    reports = {}
    for policy in POLICIES:
        config = load_config(None, model="cifar_resnet56", checkpoint=str(CHECKPOINT), method="fold", ratio=0.5,
                             groups=policy, repair="fold-ar", out=str(root / f"resnet56-fold0.5-{policy}"),
                             batches=[1, 64], overwrite=True)
        start = time.perf_counter()
        reports[policy] = build(config, StageProgress()).report
        print(f"built {policy} in {time.perf_counter() - start:.0f} s: speedup_vs_mac_ratio "
              f"{reports[policy]['speedup_vs_mac_ratio']:.2f}", flush=True)
    return reports


def time_variants(root: Path, variants: list[tuple], trials: int, min_seconds: float) -> list[dict]:
    first = root / f"resnet56-fold0.5-{POLICIES[0]}"
    models = {"baseline": onnx_artifact("baseline", first / "baseline.onnx")}
    models.update({policy: onnx_artifact(policy, root / f"resnet56-fold0.5-{policy}" / "compressed.onnx")
                   for policy in POLICIES})
    macs = {name: onnx_macs(a.path) for name, a in models.items()}
    rows = []
    for label, threads, optimization, spinning, clock in variants:
        protocol = LatencyProtocol(min_seconds=min_seconds, threads=threads, trials=trials, clock=clock)
        settings = ValidationSettings([1, 64], protocol, OrtSettings(spinning, optimization))
        latency = time_blocks([(a, "onnxruntime-cpu") for a in models.values()], (3, 32, 32), settings)
        for policy in POLICIES:
            row = {"variant": label, "threads": threads, "optimization": optimization, "spinning": spinning,
                   "clock": clock, "groups": policy, "mac_ratio": macs[policy] / macs["baseline"]}
            for batch in ("batch1", "batch64"):
                base, comp = latency["baseline"]["onnxruntime-cpu"][batch], latency[policy]["onnxruntime-cpu"][batch]
                row[batch] = {"baseline_p50_ms": base.p50_ms, "compressed_p50_ms": comp.p50_ms,
                              "speedup": base.p50_ms / comp.p50_ms, "runs": [base.runs, comp.runs]}
                row[batch]["fraction_of_mac_gain"] = row[batch]["speedup"] * row["mac_ratio"]
            rows.append(row)
            print(f"{label:42s} {policy:5s} b64 {row['batch64']['baseline_p50_ms']:7.1f} -> "
                  f"{row['batch64']['compressed_p50_ms']:7.1f} ms: fraction {row['batch64']['fraction_of_mac_gain']:.2f}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--runs", default="runs/bench", help="where the builds' run folders go")
    parser.add_argument("--skip-build", action="store_true", help="reuse the run folders of an earlier run")
    parser.add_argument("--out", default="benchmarks/results/latency_resnet56.json")
    parser.add_argument("--variants", type=int, nargs="+", help="indices into VARIANTS (default: all)")
    args = parser.parse_args()

    root = Path(args.runs)
    builds = ({policy: load_run(root / f"resnet56-fold0.5-{policy}") for policy in POLICIES} if args.skip_build
              else build_runs(root))
    variants = [VARIANTS[i] for i in args.variants] if args.variants else VARIANTS
    rows = time_variants(root, variants, args.trials, args.min_seconds)

    print("\n| ORT CPU session | groups | MAC ratio | b1 speedup | b64 p50 base -> comp (ms) | b64 speedup | "
          "speedup x MAC ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        b1, b64 = r["batch1"], r["batch64"]
        print(f"| {r['variant']} | {r['groups']} | {r['mac_ratio']:.3f} | {b1['speedup']:.2f}x | "
              f"{b64['baseline_p50_ms']:.1f} -> {b64['compressed_p50_ms']:.1f} | {b64['speedup']:.2f}x | "
              f"**{b64['fraction_of_mac_gain']:.2f}** |")
    result = {
        "builds": {policy: {k: report[k] for k in ("mac_ratio", "speedup", "speedup_vs_mac_ratio", "latency_protocol")}
                   | {"baseline_latency": report["baseline"]["latency"],
                      "compressed_latency": report["compressed"]["latency"],
                      "accuracy": [report["baseline"]["accuracy"], report["compressed"]["accuracy"]]}
                   for policy, report in builds.items()},
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
