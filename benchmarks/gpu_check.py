"""GPU path check: folding on the GPU against folding on the CPU, and PyTorch CUDA latency of the
baseline vs the folded model (one CUDA graph replayed per run, and plain CUDA events), next to the
MAC ratio. One call on a bare NVIDIA machine that has PyTorch with CUDA: see benchmarks/gpu_check.sh
and docs/gpu.md.

Models: the CIFAR ResNet-18 of the papers (``cifar_resnet18``: torchvision resnet18, 3x3 stem, no
max-pool, 10 classes; random weights, seed 0) and the trained CIFAR-10 ResNet-56 checkpoint, each
folded at --ratio with every group (the papers' setting), seed 0.

Checks, per model (exit 1 if one fails): the GPU fold has the CPU fold's widths, and on the real
CIFAR-10 test images its logits are within 1e-3 of the largest CPU-fold logit and agree on top-1
for at least 99 % of the images (both evaluated on the same device in FP32, TF32 off). Also
reported: whether the two folds merged the same channels (weights equal to 1e-5), compression
seconds on each device (--fold-repeats runs each, CPU and GPU alternating; the first GPU run pays
for CUDA start-up), and top-1 of baseline and both folds.

Latency: PyTorch p50 / p90 of baseline and folded model at each batch size, the two models
alternating block by block (--trials blocks each, foldship's ``time_blocks`` on the ``torch-cuda``
backend), PyTorch's default math (TF32 convolutions on), cudnn.benchmark on; the speedup beside the
MAC ratio and the share of the possible gain it realises, (speedup - 1) / (1 / MAC ratio - 1).
Prints one table; writes one JSON (--out).

    benchmarks/gpu_check.sh [--ratio 0.5] [--batches 1 128] [--min-seconds 0.5] [--out FILE]
    benchmarks/gpu_check.sh --device cpu --batches 1 8 --min-seconds 0.05 --images 64  # the script, no GPU

Without a GPU (and without --device cpu) it says so and exits 0 without running anything.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

MAX_LOGIT_DIFF = 1e-3  # of the largest |logit|
MIN_TOP1_AGREEMENT = 0.99
SAME_WEIGHTS = 1e-5  # relative: the two folds merged the same channels


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check this script without a GPU")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--min-seconds", type=float, default=0.5, help="minimum timed seconds per block")
    parser.add_argument("--trials", type=int, default=3, help="latency blocks per model, alternating (A B A B ...)")
    parser.add_argument("--fold-repeats", type=int, default=2, help="folds per device, CPU and GPU alternating")
    parser.add_argument("--images", type=int, default=1000, help="CIFAR-10 test images for the fold check")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no NVIDIA GPU is visible to PyTorch {torch.__version__} (torch.cuda.is_available() is "
              f"False), so nothing was run and no JSON written; run it on a machine with a GPU, or pass --device cpu "
              f"to check the script itself", file=sys.stderr)
        return 0
    # Imported after the GPU check: a machine without a GPU learns so in a second.
    from foldship.data import load_images
    from foldship.models.spec import Preprocessing
    from foldship.pipeline.config import SHARED_DATA
    from foldship.pipeline.environment import fingerprint

    started = time.perf_counter()
    gpu = args.device.startswith("cuda")
    torch.backends.cudnn.benchmark = True
    data = load_images(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz", Preprocessing(), args.images,
                       num_classes=10)
    results = {}
    for name, loaded in models(SHARED_DATA):
        results[name] = check_model(loaded, data, args, gpu)
        print(f"{name}: done at {time.perf_counter() - started:.0f} s", flush=True)
    env = fingerprint()
    device_name = env["gpu"]["name"] if gpu else env["cpu"]
    print_table(results, args, device_name)
    passed = all(r["fold_check"]["passed"] for r in results.values())
    report = {"device": args.device, "device_name": device_name, "ratio": args.ratio, "batches": args.batches,
              "backend": "torch-cuda" if gpu else "torch-cpu", "cudnn_benchmark": True,
              "tf32_convolutions": torch.backends.cudnn.allow_tf32, "trials": args.trials,
              "min_seconds": args.min_seconds, "seconds": round(time.perf_counter() - started, 1), "passed": passed,
              "models": results, "environment": env}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"{'all checks passed' if passed else 'a fold check FAILED'} in {report['seconds']} s; wrote {args.out}")
    return 0 if passed else 1


def models(shared: Path):
    from foldship.models import load_model

    torch.manual_seed(0)
    yield "resnet18-cifar", load_model("cifar_resnet18")
    yield "resnet56", load_model("cifar_resnet56", shared / "checkpoints/cifar10_resnet_akamaster/resnet56-4bfd9763.th")


def check_model(loaded, data, args, gpu: bool) -> dict:
    """Fold on both devices (alternating), compare the folds, time both models, count MACs."""
    from foldship.compress import compress_model
    from foldship.validators.complexity import count_macs

    example = loaded.example_inputs(2)
    cpu_folds, device_folds = [], []
    for _ in range(args.fold_repeats):
        cpu_folds.append(compress_model(loaded.model, example, "fold", args.ratio, seed=0, device="cpu"))
        device_folds.append(compress_model(loaded.model, example, "fold", args.ratio, seed=0, device=args.device))
    cpu_fold, device_fold = cpu_folds[-1], device_folds[-1]
    check = compare_folds(loaded.model, cpu_fold, device_fold, data.x, data.y, args.device)
    check["seconds"] = {"cpu_fold": [round(f.seconds, 3) for f in cpu_folds],
                        "device_fold": [round(f.seconds, 3) for f in device_folds]}
    print(f"{loaded.name}: fold on {args.device} vs cpu: {'PASS' if check['passed'] else 'FAIL'} (same widths "
          f"{check['same_widths']}, same merges {check['same_merges']}, max logit diff "
          f"{check['max_logit_rel_diff']:.1e} of the largest, top-1 agreement {100 * check['top1_agreement']:.1f}%, correct {check['correct']}, fold "
          f"seconds {check['seconds']})", flush=True)
    folded = device_fold.model.cpu().eval()
    macs = {"baseline": count_macs(loaded.model, example), "compressed": count_macs(folded, example)}
    modes = ("graphs", "events") if gpu else ("host",)
    latency = {mode: time_pair(loaded.model, folded, loaded.input_shape, args, gpu, mode == "graphs") for mode in modes}
    mac_ratio = macs["compressed"] / macs["baseline"]
    speedup = {mode: {key: sides["baseline"][key]["p50_ms"] / sides["compressed"][key]["p50_ms"]
                      for key in sides["baseline"]} for mode, sides in latency.items()}
    return {"fold_check": check, "macs": macs, "mac_ratio": mac_ratio, "latency": latency, "speedup": speedup,
            "realised_share": {mode: {key: realised_share(s, mac_ratio) for key, s in per.items()}
                               for mode, per in speedup.items()}}


def realised_share(speedup: float, mac_ratio: float) -> float | None:
    """(speedup - 1) / (1 / MAC ratio - 1): 1.0 when latency falls as MACs do, 0 for no change, < 0 slower."""
    return (speedup - 1) / (1 / mac_ratio - 1) if mac_ratio < 1 else None


def time_pair(baseline, folded, input_shape, args, gpu: bool, cuda_graphs: bool) -> dict:
    """Baseline and folded model alternating block by block (foldship's time_blocks), every batch size."""
    from foldship.validators import LatencyProtocol, torch_artifact
    from foldship.validators.stage import ValidationSettings, time_blocks

    protocol = LatencyProtocol(warmup=20, min_runs=30, min_seconds=args.min_seconds, trials=args.trials,
                               cuda_graphs=cuda_graphs)
    backend = "torch-cuda" if gpu else "torch-cpu"
    plan = [(torch_artifact("baseline", baseline), backend), (torch_artifact("compressed", folded), backend)]
    timed = time_blocks(plan, tuple(input_shape), ValidationSettings(list(args.batches), protocol, backends=[backend]))
    return {side: {key: stats.as_dict() for key, stats in timed[side][backend].items()} for side in timed}


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
        "passed": same_widths and logit_diff <= MAX_LOGIT_DIFF and agreement >= MIN_TOP1_AGREEMENT,
    }


def print_table(results: dict, args, device_name: str) -> None:
    modes = list(next(iter(results.values()))["latency"])
    head = ["model", "MAC ratio", "batch"] + [f"{side} {mode} p50/p90 ms" for mode in modes
                                             for side in ("baseline", "folded")] + \
        [f"{mode}: speedup (share of possible gain)" for mode in modes]
    rows = []
    for name, r in results.items():
        for b in args.batches:
            key = f"batch{b}"
            row = [name, f"{r['mac_ratio']:.3f}", str(b)]
            row += [f"{r['latency'][mode][side][key]['p50_ms']:.3f} / {r['latency'][mode][side][key]['p90_ms']:.3f}"
                    for mode in modes for side in ("baseline", "compressed")]
            row += [f"{r['speedup'][mode][key]:.2f}x ({_share(r['realised_share'][mode][key])})" for mode in modes]
            rows.append(row)
    widths = [max(len(str(x)) for x in column) for column in zip(head, *rows)]
    print(f"\nPyTorch latency on {device_name} (fold ratio {args.ratio}, every group, FP32; baseline and folded "
          f"alternating, {args.trials} blocks each):")
    for row in (head, ["-" * w for w in widths], *rows):
        print(" | ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    for name, r in results.items():
        seconds = r["fold_check"]["seconds"]
        print(f"{name}: fold seconds cpu {seconds['cpu_fold']}, {args.device} {seconds['device_fold']}")


def _share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f} %"


if __name__ == "__main__":
    sys.exit(main())
