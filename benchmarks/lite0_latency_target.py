"""EfficientNet-Lite0 built for a latency target, next to the build for the MAC target it reached.

1. ``foldship build --config examples/efficientnet_lite0_imagenet.yaml --target-latency 0.75`` (the
   example's ``target_macs`` dropped): the planner times candidate architectures against the
   baseline at batch 16 and corrects its MAC goal until the measured latency meets 0.75x.
2. The same config with ``--target-macs`` set to the MAC fraction build 1 planned: the same MAC
   budget spent by sensitivity alone.
3. With ``--drop-blocks``: build 1 again with ``--drop-blocks``, the latency met by removing whole
   residual blocks (timed after each removal past the MAC estimate) instead of narrowing channels.

Both are real builds with the default protocol (every model timed in interleaved blocks). Prints
for each: MACs, top-1 on the 1,000 ImageNet sample images, the build's own batch-16 speed (baseline
and compressed p50, the speedup with its per-round interval, compressed / baseline p50), and the
wall and CPU time of the build; writes benchmarks/results/lite0_latency_target.json.

    .venv/bin/python benchmarks/lite0_latency_target.py [--target-latency 0.75] [--drop-blocks] [--runs runs/bench]
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from foldship.pipeline.build import build
from foldship.pipeline.config import SHARED_DATA, load_config
from foldship.pipeline.environment import fingerprint
from foldship.progress import StageProgress

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "efficientnet_lite0_imagenet.yaml"


def run(name: str, root: Path, **overrides) -> dict:
    config = load_config(CONFIG, data=str(SHARED_DATA / "imagenet_sample"), out=str(root / name), overwrite=True,
                         **overrides)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    report = build(config, StageProgress()).report
    after = resource.getrusage(resource.RUSAGE_SELF)
    batch = f"batch{max(config.batches)}"
    base, comp = (report[side]["latency"]["onnxruntime-cpu"][batch]["p50_ms"] for side in ("baseline", "compressed"))
    return {"name": name, "removed_blocks": [b["block"] for b in report["compression"]["budget"]["removed_blocks"]],
            "target": report["compression"]["budget"]["target"],
            "goal": report["compression"]["budget"]["goal"], "planned_mac_fraction": report["compression"]["budget"]["mac_fraction"],
            "mac_ratio": report["mac_ratio"], "top1": report["compressed"]["accuracy"],
            "baseline_top1": report["baseline"]["accuracy"], "baseline_p50_ms": base, "compressed_p50_ms": comp,
            "p50_fraction": comp / base, "speed": report["speed"], "rounds": report["compression"]["budget"]["rounds"],
            "width_rule": report["width_rule"], "stages": report.get("stages"),
            "wall_s": round(time.perf_counter() - start, 1), "user_s": round(after.ru_utime - before.ru_utime, 1),
            "sys_s": round(after.ru_stime - before.ru_stime, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-latency", type=float, default=0.75)
    parser.add_argument("--drop-blocks", action="store_true", help="also meet the latency target by removing blocks")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lite0_latency_target.json")
    args = parser.parse_args()
    latency = run(f"lite0-latency{args.target_latency}", args.runs, target_macs=None, target_latency=args.target_latency)
    macs = run(f"lite0-macs{latency['planned_mac_fraction']}", args.runs, target_macs=latency["planned_mac_fraction"])
    builds = [latency, macs]
    if args.drop_blocks:
        builds.append(run(f"lite0-latency{args.target_latency}-blocks", args.runs, target_macs=None,
                          target_latency=args.target_latency, drop_blocks=True))
    print("\n| build | MACs | top-1 | b16 p50 baseline -> compressed | compressed / baseline p50 | speed (build's own, "
          "interleaved) | width rule | wall / user / sys s |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    for r in builds:
        goal = f"--target-{'latency' if r['target'] == 'latency' else 'macs'} {r['goal']}" + (
            f" --drop-blocks ({', '.join(r['removed_blocks'])})" if r["removed_blocks"] else "")
        print(f"| {goal} | {r['mac_ratio']:.3f}x | {100 * r['top1']:.1f} % | {r['baseline_p50_ms']:.1f} -> "
              f"{r['compressed_p50_ms']:.1f} ms | **{r['p50_fraction']:.3f}** | {r['speed']['sentence']} | "
              f"round_to {r['width_rule']['round_to']} | {r['wall_s']:.0f} / {r['user_s']:.0f} / {r['sys_s']:.0f} |")
    for r in builds:
        if r["target"] == "latency":
            print(f"\nlatency plan rounds ({r['name']}): {r['rounds']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"builds": builds, "environment": fingerprint()}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
