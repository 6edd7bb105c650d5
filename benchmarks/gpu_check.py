"""GPU path check: folding on the GPU against folding on the CPU, and PyTorch CUDA latency of the
baseline vs the folded model, with CUDA events around each forward pass and with one CUDA graph
replayed per run.

Models: the CIFAR ResNet-18 of the papers (``cifar_resnet18``: torchvision resnet18, 3x3 stem, no
max-pool, 10 classes; random weights, seed 0) and the trained CIFAR-10 ResNet-56 checkpoint, each
folded at --ratio with every group (the papers' setting), seed 0.

Checks, per model (exit 1 if one fails): the GPU fold has the CPU fold's widths, and on the real
CIFAR-10 test images its logits are within 1e-3 of the largest CPU-fold logit and agree on top-1
for at least 99 % of the images (both evaluated on the same device in FP32, TF32 off). Also
reported: whether the two folds merged the same channels (weights equal to 1e-5), compression
seconds on each device, and top-1 accuracy of baseline and both folds.

Latency: PyTorch p50 / p90 of baseline and folded model at each batch size, each model timed in
its own block (foldship's latency protocol, ``torch-cuda`` backend), PyTorch's default math (TF32
convolutions on), cudnn.benchmark on. Prints one table; writes JSON (--out).

    benchmarks/gpu_check.sh [--ratio 0.5] [--batches 1 256] [--min-seconds 0.5] [--out FILE]
    benchmarks/gpu_check.sh --device cpu --batches 1 8 --min-seconds 0.05   # this script, without a GPU

Without a GPU (and without --device cpu) it says so and exits 0 without running anything.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from foldship.compress import compress_model
from foldship.data import load_images
from foldship.models import load_model
from foldship.models.registry import Preprocessing
from foldship.pipeline.config import SHARED_DATA
from foldship.pipeline.environment import fingerprint
from foldship.validators import LatencyProtocol, time_artifact, torch_artifact

CIFAR_LOSSLESS = SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz"
RESNET56 = SHARED_DATA / "checkpoints/cifar10_resnet_akamaster/resnet56-4bfd9763.th"
MAX_LOGIT_DIFF = 1e-3  # of the largest |logit|
MIN_TOP1_AGREEMENT = 0.99
SAME_WEIGHTS = 1e-5  # relative: the two folds merged the same channels


def models():
    torch.manual_seed(0)
    yield "resnet18-cifar", load_model("cifar_resnet18")
    yield "resnet56", load_model("cifar_resnet56", RESNET56)


def logits(model: torch.nn.Module, images: torch.Tensor, device: str) -> torch.Tensor:
    model = model.to(device).eval()
    with torch.no_grad():
        out = torch.cat([model(batch.to(device)).cpu() for batch in images.split(250)])
    model.cpu()
    return out


def compare_folds(baseline, cpu_fold, device_fold, images, labels, device: str) -> dict:
    """The device fold against the CPU fold: widths, merged weights, logits on real images."""
    cpu_state, dev_state = cpu_fold.model.state_dict(), device_fold.model.cpu().state_dict()
    same_widths = cpu_state.keys() == dev_state.keys() and all(
        cpu_state[k].shape == dev_state[k].shape for k in cpu_state)
    weight_diff = max((float((cpu_state[k].double() - dev_state[k].double()).abs().max()) /
                       max(float(cpu_state[k].double().abs().max()), 1e-12))
                      for k in cpu_state if cpu_state[k].is_floating_point()) if same_widths else None
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare the weights, not TF32 rounding
    try:
        base, ref, got = (logits(m, images, device) for m in (baseline, cpu_fold.model, device_fold.model))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    logit_diff = float((ref - got).abs().max()) / float(ref.abs().max())
    agreement = float((ref.argmax(1) == got.argmax(1)).double().mean())
    return {
        "same_widths": same_widths,
        "same_merges": weight_diff is not None and weight_diff <= SAME_WEIGHTS,
        "max_weight_rel_diff": weight_diff,
        "max_logit_rel_diff": logit_diff,
        "top1_agreement": agreement,
        "images": len(images),
        "correct": {"baseline": int((base.argmax(1) == labels).sum()), "cpu_fold": int((ref.argmax(1) == labels).sum()),
                    "device_fold": int((got.argmax(1) == labels).sum())},
        "seconds": {"cpu_fold": round(cpu_fold.seconds, 3), "device_fold": round(device_fold.seconds, 3)},
        "passed": same_widths and logit_diff <= MAX_LOGIT_DIFF and agreement >= MIN_TOP1_AGREEMENT,
    }


def latency(model: torch.nn.Module, input_shape, batches, modes, backend: str, args) -> dict:
    timings = {}
    for mode in modes:
        protocol = LatencyProtocol(warmup=20, min_runs=30, min_seconds=args.min_seconds, cuda_graphs=mode == "graph")
        timings[mode] = {f"batch{b}": time_artifact(torch_artifact("model", model), backend, input_shape, b,
                                                     protocol).as_dict() for b in batches}
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check this script without a GPU")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--min-seconds", type=float, default=0.5, help="minimum timed seconds per measurement")
    parser.add_argument("--images", type=int, default=1000, help="CIFAR-10 test images for the fold check")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no NVIDIA GPU is visible to PyTorch (torch.cuda.is_available() is False), so nothing was "
              "run; run it on a machine with a GPU, or pass --device cpu to check the script itself",
              file=sys.stderr)
        return 0
    gpu = args.device.startswith("cuda")
    backend, modes = ("torch-cuda", ("events", "graph")) if gpu else ("torch-cpu", ("host",))
    torch.backends.cudnn.benchmark = True
    data = load_images(CIFAR_LOSSLESS, Preprocessing(), args.images, num_classes=10)
    started, results = time.perf_counter(), {}
    for name, loaded in models():
        example = loaded.example_inputs(2)
        cpu_fold = compress_model(loaded.model, example, "fold", args.ratio, seed=0, device="cpu")
        device_fold = compress_model(loaded.model, example, "fold", args.ratio, seed=0, device=args.device)
        check = compare_folds(loaded.model, cpu_fold, device_fold, data.x, data.y, args.device)
        print(f"{name}: fold on {args.device} vs cpu: {'PASS' if check['passed'] else 'FAIL'} "
              f"(same widths {check['same_widths']}, same merges {check['same_merges']}, max logit diff "
              f"{check['max_logit_rel_diff']:.1e} of the largest, top-1 agreement {100 * check['top1_agreement']:.1f}%, "
              f"correct {check['correct']}, fold seconds {check['seconds']})", flush=True)
        results[name] = {"fold_check": check, "latency": {
            side: latency(model, loaded.input_shape, args.batches, modes, backend, args)
            for side, model in (("baseline", loaded.model), ("compressed", device_fold.model.cpu()))}}
    env = fingerprint()
    device_name = env["gpu"]["name"] if gpu else env["cpu"]
    print_table(results, args, modes, device_name)
    passed = all(r["fold_check"]["passed"] for r in results.values())
    report = {"device": args.device, "device_name": device_name, "ratio": args.ratio, "batches": args.batches,
              "backend": backend, "cudnn_benchmark": True, "tf32_convolutions": torch.backends.cudnn.allow_tf32,
              "seconds": round(time.perf_counter() - started, 1), "passed": passed, "models": results,
              "environment": env}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all checks passed' if passed else 'a fold check FAILED'}; wrote {args.out}")
    return 0 if passed else 1


def print_table(results: dict, args, modes, device_name: str) -> None:
    head = ["model", "batch"] + [f"{side} {mode} p50/p90 ms" for mode in modes for side in ("baseline", "folded")] + \
        [f"speedup {mode}" for mode in modes]
    rows = []
    for name, r in results.items():
        for b in args.batches:
            stats = {(side, mode): r["latency"][side][mode][f"batch{b}"] for side in ("baseline", "compressed")
                     for mode in modes}
            row = [name, str(b)]
            row += [f"{stats[side, mode]['p50_ms']:.3f} / {stats[side, mode]['p90_ms']:.3f}"
                    for mode in modes for side in ("baseline", "compressed")]
            row += [f"{stats['baseline', mode]['p50_ms'] / stats['compressed', mode]['p50_ms']:.2f}x" for mode in modes]
            rows.append(row)
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows)]
    print(f"\nPyTorch latency on {device_name} (fold ratio {args.ratio}, every group, FP32):")
    for row in (head, ["-" * w for w in widths], *rows):
        print(" | ".join(str(x).rjust(w) for x, w in zip(row, widths)))


if __name__ == "__main__":
    sys.exit(main())
