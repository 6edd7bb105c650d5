"""Distillation speed on the CPU: channels-last against the default (contiguous) layout, in one run.

``foldship.compress.distill`` trains models with depthwise convolutions in channels-last layout on
the CPU and every other model in the default layout (``training_layout``). This script measures
the rule: it distils the same compressed model from the same start in both layouts, whatever the
rule would choose, taking turns (default, channels-last, channels-last, default, ...) for ``--rounds``
rounds so drift on a shared machine hits both alike, and prints seconds per step, the speedup
(median over rounds of default seconds / channels-last seconds) and how far the two students'
logits ended apart (the layouts sum in different orders; they agree to rounding, not bit for bit).

Cases, real checkpoints and real images (top-1 is not measured: a few steps on a few images):
- ``resnet20``: the demo's model, fold at ratio 0.2 in widths of 8, `--groups inner`; CIFAR-10
  JPEG calibration images, batch 64;
- ``resnet56``: fold at ratio 0.5, `--groups inner` (the ResNet-56 recovery case); batch 64;
- ``lite0``: EfficientNet-Lite0 (examples/efficientnet_lite0_imagenet.yaml's checkpoint), fold at
  a uniform ratio 0.125 of every group (0.80x MACs, without the budget survey, whose minutes buy
  nothing here); ImageNet sample images, batch 32 (the Lite0 recovery case's).

    PYTHONPATH=. .venv/bin/python benchmarks/distill_speed.py [--cases resnet20 resnet56 lite0]
        [--steps 10] [--rounds 3] [--threads 2] [--out benchmarks/results/distill_speed.json]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
from pathlib import Path

import torch

from foldship.compress.engine import compress_model
from foldship.data import load_images
from foldship.data.presets import Preprocessing
from foldship.models import load_model
from foldship.pipeline.build import load_from_config
from foldship.pipeline.config import SHARED_DATA, load_config, read_yaml
from foldship.pipeline.environment import fingerprint

ROOT = Path(__file__).resolve().parents[1]
DISTILL = importlib.import_module("foldship.compress.distill")  # distill reads training_layout from it at call time
RULE = DISTILL.training_layout
LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}
CIFAR_CALIBRATION = SHARED_DATA / "cifar10" / "cifar10_test_10k_from_jpeg.npz"
CHECKPOINTS = SHARED_DATA / "checkpoints" / "cifar10_resnet_akamaster"


def cifar_case(name: str, checkpoint: str, ratio: float, round_to: int, steps: int):
    loaded = load_model(name, CHECKPOINTS / checkpoint)
    example = loaded.example_inputs(2)
    student = compress_model(loaded.model, example, "fold", ratio, groups="inner", round_to=round_to).model
    x = load_images(CIFAR_CALIBRATION, Preprocessing(), steps * 64, require_labels=False).x
    return loaded.model, student, x, 64


def lite0_case(steps: int):
    config = load_config(None, **read_yaml(ROOT / "examples/efficientnet_lite0_imagenet.yaml") | {"out": "unused"})
    loaded = load_from_config(config)
    example = loaded.example_inputs(2)
    student = compress_model(loaded.model, example, "fold", 0.125, round_to=8).model
    x = load_images(config.data, loaded.preprocessing, steps * 32, require_labels=False,
                    input_shape=loaded.input_shape).x
    return loaded.model, student, x, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["resnet20", "resnet56", "lite0"],
                        choices=["resnet20", "resnet56", "lite0"])
    parser.add_argument("--steps", type=int, default=10, help="distillation steps per timing (one epoch of that many batches)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/distill_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for case in args.cases:
        teacher, start, images, batch = (
            cifar_case("cifar_resnet20", "resnet20-12fca82f.th", 0.2, 8, args.steps) if case == "resnet20" else
            cifar_case("cifar_resnet56", "resnet56-4bfd9763.th", 0.5, 1, args.steps) if case == "resnet56" else
            lite0_case(args.steps))
        settings = DISTILL.DistillSettings(epochs=1, lr=1e-4, batch=batch, seed=0, threads=args.threads)
        seconds = {"default": [], "channels-last": []}
        students = {}
        for r in range(args.rounds):
            order = ["default", "channels-last"] if r % 2 == 0 else ["channels-last", "default"]
            for layout in order:
                DISTILL.training_layout = lambda model, x, device, chosen=LAYOUTS[layout]: chosen
                student = copy.deepcopy(start)
                record = DISTILL.distill(student, teacher, images, settings, "cpu")
                seconds[layout].append(record.seconds / record.steps)
                students[layout] = student
        DISTILL.training_layout = RULE
        rule = "channels-last" if RULE(start, images, torch.device("cpu")) == torch.channels_last else "default"
        with torch.no_grad():
            probe = images[:batch]
            a, b = students["default"].eval()(probe), students["channels-last"].eval()(probe)
            apart = float((a - b).abs().max() / a.abs().max())
        ratios = [d / c for d, c in zip(seconds["default"], seconds["channels-last"])]
        rows.append({"case": case, "rule": rule, "batch": batch, "steps": args.steps, "rounds": args.rounds,
                     "default_s_per_step": statistics.median(seconds["default"]),
                     "channels_last_s_per_step": statistics.median(seconds["channels-last"]),
                     "speedup": statistics.median(ratios), "speedup_low": min(ratios), "speedup_high": max(ratios),
                     "logits_apart": apart, "seconds": seconds})

    print("\n| case | foldship trains in | batch | default s/step | channels-last s/step | speedup (min-max over rounds) | logits apart (max rel.) |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['rule']} | {r['batch']} | {r['default_s_per_step']:.3f} | {r['channels_last_s_per_step']:.3f} | "
              f"{r['speedup']:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f}) | {r['logits_apart']:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rows": rows, "environment": fingerprint()}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
