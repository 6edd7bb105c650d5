"""EfficientNet-Lite0 at --target-macs 0.80: what the budget survey's constants, the distillation
temperature, feature terms in the distillation loss and whole blocks removed before the channel plan
do to top-1 (docs/recovery.md, "What else was tried").

The same stages as ``foldship build`` with examples/efficientnet_lite0_imagenet.yaml, evaluated on the
first 500 ImageNet sample images and calibrated on the other 500, repair bn-recalibrate: the budget
plan (with the survey constants given here in place of foldship's), compression, top-1 before
distillation, then one distillation per temperature and loss from the same compressed model (0.0001,
batch 32, 4 epochs, the recovery case's settings). ``--blocks-first K`` makes a mixed plan: the first K
blocks of foldship's depth order (``--drop-blocks``, probed on the same calibration images) are removed,
and the channel plan meets the rest of the target on the model without them.
A loss is ``+``-joined terms: ``kl`` (foldship's), ``head`` (the mean squared error of the 1,280-wide
features before pooling, divided by the teacher's mean square: feature mimicking, Wang et al. 2022,
"Compressing Models with Few Samples: Mimicking then Replacing"), ``stages`` (the same at each stage's
output, averaged; the plan keeps their widths).
Top-1 is PyTorch's on the CPU; no files are exported.
The constants are module-level in foldship (compress/budget.py, compress/distill.py); this script
sets them for its own process only.

    PYTHONPATH=. .venv/bin/python benchmarks/lite0_variants.py [--survey-recalibration 64]
        [--first-pass-share 0.5] [--probe-count 32] [--blocks-first 0] [--temperatures 4 1 2] [--losses kl head kl+head]
        [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from foldship.compress.engine import compress_model
from foldship.data import calibration_images, load_images
from foldship.pipeline.build import load_from_config
from foldship.pipeline.config import SHARED_DATA, load_config, read_yaml
from foldship.pipeline.environment import fingerprint, keep_freed_memory
from foldship.validators import count_macs
from foldship.validators.accuracy import classification_scores, evaluate_torch

ROOT = Path(__file__).resolve().parents[1]
# Modules, not names: the constants are read from these modules' globals at call time.
SURVEY = importlib.import_module("foldship.pipeline.budget")
ALLOCATION = importlib.import_module("foldship.compress.budget")
DISTILL = importlib.import_module("foldship.compress.distill")


class WithFeatures(nn.Module):
    """A timm EfficientNet whose output is its logits followed by the flattened features ``terms`` name:
    distill() hands the loss one tensor per model, so the features travel in it."""

    def __init__(self, model: nn.Module, terms: set[str]):
        super().__init__()
        unknown = terms - {"kl", "head", "stages"}
        if unknown or not terms:
            raise SystemExit(f"unknown loss terms {sorted(unknown)}; use kl, head and stages joined by +")
        self.model, self.terms = model, terms

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[logits, features...] in the order the loss reads them."""
        m, features = self.model, []
        h = m.bn1(m.conv_stem(x))
        for stage in m.blocks:
            h = stage(h)
            if "stages" in self.terms:
                features.append(h)
        h = m.bn2(m.conv_head(h))
        if "head" in self.terms:
            features.append(h)
        return [m.forward_head(h)] + features

    def sizes(self, x: torch.Tensor) -> list[int]:
        with torch.no_grad():
            return [p[0].numel() for p in self.parts(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.flatten(1) for p in self.parts(x)], 1)


def feature_loss(kl, temperature: float, terms: set[str], sizes: list[int]):
    """The distillation loss over WithFeatures outputs: each term's normalised error, the stages averaged."""
    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        pieces = list(zip(student.split(sizes, 1), teacher.split(sizes, 1)))
        (s_logits, t_logits), features = pieces[0], pieces[1:]
        errors = [((s - t) ** 2).mean() / (t ** 2).mean() for s, t in features]
        total = kl(s_logits, t_logits, temperature) if "kl" in terms else 0.0
        if "head" in terms:
            total = total + errors.pop()
        if "stages" in terms:
            total = total + sum(errors) / len(errors)
        return total
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--survey-recalibration", type=int, default=SURVEY.SURVEY_RECALIBRATION_COUNT,
                        help="calibration images the survey re-estimates BN statistics on")
    parser.add_argument("--first-pass-share", type=float, default=ALLOCATION.FIRST_PASS_SHARE,
                        help="share of the MAC cut planned from each group's damage alone")
    parser.add_argument("--probe-count", type=int, default=SURVEY.PROBE_COUNT, help="probe images of the survey")
    parser.add_argument("--blocks-first", type=int, default=0,
                        help="remove the first K blocks of the depth order, then narrow channels for the rest")
    parser.add_argument("--temperatures", type=float, nargs="*", default=[DISTILL.TEMPERATURE],
                        help="distillation temperatures, each from the same compressed model (none: no distillation)")
    parser.add_argument("--losses", nargs="+", default=["kl"],
                        help="distillation losses, each terms joined by + from kl, head, stages (every one is run "
                             "at every temperature)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/lite0_variants.json")
    args = parser.parse_args()
    if args.blocks_first < 0:
        parser.error(f"--blocks-first must be 0 or more, got {args.blocks_first}")
    SURVEY.SURVEY_RECALIBRATION_COUNT, SURVEY.PROBE_COUNT = args.survey_recalibration, args.probe_count
    ALLOCATION.FIRST_PASS_SHARE = args.first_pass_share
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    config = load_config(None, **read_yaml(ROOT / "examples/efficientnet_lite0_imagenet.yaml") | {
        "data": str(SHARED_DATA / "imagenet_sample"), "limit": 500, "calibration_data": str(SHARED_DATA / "imagenet_sample"),
        "repair": "bn-recalibrate", "threads": args.threads, "out": "unused"})
    start = time.perf_counter()
    loaded = load_from_config(config)
    data = load_images(config.data, loaded.preprocessing, config.limit, loaded.num_classes,
                       input_shape=loaded.input_shape)
    calibration = calibration_images(config.calibration_data, loaded.preprocessing, data, config.calibration_count,
                                     config.seed).x
    example = loaded.example_inputs(2)
    round_to = config.width_rule().round_to
    with contextlib.closing(ALLOCATION.block_removals(loaded.model, example,
                                                     calibration[:ALLOCATION.BLOCK_PROBE_COUNT])) as order:
        removed = [block for _, block in zip(range(args.blocks_first), order)]  # range first: no extra step
    if len(removed) < args.blocks_first:
        parser.error(f"--blocks-first {args.blocks_first}: the model has {len(removed)} removable blocks")
    model = ALLOCATION.without_blocks(loaded.model, example, [b.name for b in removed]) if removed else loaded.model
    goal = config.target_macs / ALLOCATION.mac_left(removed)  # of the MACs the model without them keeps
    plan = SURVEY.plan_budget(model, example, config.method, goal, None, round_to,
                              config.groups, config.protected, args.threads, calibration, config.seed, config.repair)
    compressed = compress_model(model, example, config.method, config.ratio, config.seed, config.groups,
                                plan.group_ratios(), config.protected, round_to, repair=config.repair,
                                calibration=calibration).model.cpu().eval()

    def top1(model) -> int:
        return classification_scores(evaluate_torch(model.eval(), data.x), data.y, loaded.num_classes)["correct"]

    result = {"survey_recalibration": args.survey_recalibration, "first_pass_share": args.first_pass_share,
              "probe_count": args.probe_count, "removed_blocks": [b.name for b in removed],
              "baseline": top1(loaded.model), "total": len(data),
              "mac_ratio": count_macs(compressed, example) / count_macs(loaded.model, example),
              "widths": {g.name: [g.width, g.size] for g in plan.groups if g.width != g.size},
              "before": top1(compressed), "plan_seconds": round(time.perf_counter() - start), "after": {}}
    black = [-m / s for m, s in zip(loaded.preprocessing.mean, loaded.preprocessing.std)]
    settings = DISTILL.DistillSettings(epochs=4, lr=1e-4, batch=32, seed=config.seed, threads=args.threads)
    kl = DISTILL.distillation_loss
    for temperature in args.temperatures:
        for spec in args.losses:
            terms = set(spec.split("+"))
            student, teacher = WithFeatures(copy.deepcopy(compressed), terms), WithFeatures(loaded.model, terms)
            DISTILL.distillation_loss = feature_loss(kl, temperature, terms, teacher.sizes(calibration[:1]))
            DISTILL.distill(student, teacher, calibration, settings, "cpu", black)
            result["after"][f"T={temperature:g} {spec}"] = top1(student.model)
    DISTILL.distillation_loss = kl

    print(f"\n| survey BN images | first-pass share | probe images | blocks removed | MACs | baseline | "
          f"before distillation | after, by temperature and loss |\n|---:|---:|---:|---|---:|---:|---:|---|\n"
          f"| {args.survey_recalibration} | {args.first_pass_share:g} | {args.probe_count} | "
          f"{', '.join(result['removed_blocks']) or 'none'} | {result['mac_ratio']:.3f}x | "
          f"{result['baseline']}/{len(data)} | {result['before']}/{len(data)} | "
          + (", ".join(f"{t}: {c}" for t, c in result["after"].items()) or "not distilled") + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result | {"environment": fingerprint()}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
