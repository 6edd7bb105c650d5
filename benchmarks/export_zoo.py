"""The export stage on the model zoo: nodes, size, parity and time per exporter x shrinker, and FP16.

Models: the trained CIFAR-10 ResNet-20 and ResNet-56 folded at ratio 0.5 (on the 1,000 lossless
test images), torchvision resnet18 and mobilenet_v2 (random weights and BN statistics, 64x64
upsampled CIFAR images) and vit_b_16 (random weights, 32x32 images, 2x2 patches). For each cell:
nodes before -> after shrinking, the passes kept, file size, ONNX Runtime vs PyTorch max abs
error and top-1 agreement on the check images, seconds. FP16 (CIFAR models, all 1,000 images):
top-1 agreement and max abs error with float16 activations emulated, and on ORT CPU as is.
Prints Markdown tables and writes benchmarks/results/export_zoo.json.

    .venv/bin/python benchmarks/export_zoo.py [--models resnet20 ...] [--shrinkers onnxslim onnxsim none]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from foldship.compress import compress
from foldship.data import load_images
from foldship.errors import FoldshipError
from foldship.exporters import ExportOptions, export_model
from foldship.models import load_model
from foldship.models.spec import Preprocessing
from foldship.pipeline.config import SHARED_DATA
from foldship.pipeline.environment import fingerprint

CHECKPOINTS = SHARED_DATA / "checkpoints/cifar10_resnet_akamaster"
MODELS = ("resnet20", "folded_resnet56", "resnet18", "mobilenet_v2", "vit_b_16")


def zoo_model(name: str, images: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet20":
        return load_model("cifar_resnet20", CHECKPOINTS / "resnet20-12fca82f.th").model, images
    if name == "folded_resnet56":
        loaded = load_model("cifar_resnet56", CHECKPOINTS / "resnet56-4bfd9763.th")
        return compress(loaded.model, loaded.example_inputs(2), method="fold", ratio=0.5), images
    if name == "vit_b_16":
        model = torchvision.models.vit_b_16(image_size=32).eval()
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
        return model, images[:32]
    model = getattr(torchvision.models, name)().eval()
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():  # default BN statistics make random mobilenet logits ~1e-9
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model, torch.nn.functional.interpolate(images[:32], size=64, mode="bilinear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--exporters", nargs="+", default=["dynamo", "legacy"])
    parser.add_argument("--shrinkers", nargs="+", default=["onnxslim", "onnxsim", "none"])
    parser.add_argument("--out", default="benchmarks/results/export_zoo.json")
    args = parser.parse_args()

    images = load_images(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz", Preprocessing(), None, 10).x
    rows = []
    print("| model | exporter | shrinker | nodes | passes kept | size KiB | max abs vs torch | top-1 agree | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, inputs = zoo_model(name, images)
        for exporter in args.exporters:
            for shrinker in args.shrinkers:
                fp16 = name in ("resnet20", "folded_resnet56") and exporter == "dynamo" and shrinker == "onnxslim"
                options = ExportOptions(exporter, shrinker, "fp16" if fp16 else "fp32").validate()
                with tempfile.TemporaryDirectory() as folder:
                    start = time.perf_counter()
                    try:
                        exported = export_model(model, inputs[:2], folder, name, options, inputs)
                    except FoldshipError as exc:  # e.g. the legacy exporter on ViT's fused attention
                        rows.append({"model": name, "exporter": exporter, "shrinker": shrinker, "error": str(exc)})
                        print(f"| {name} | {exporter} | {shrinker} | failed: {exc} |||||||", flush=True)
                        continue
                    seconds = time.perf_counter() - start
                row = {"model": name, "exporter": exporter, "shrinker": shrinker, "seconds": seconds,
                       **exported.summary()}
                rows.append(row)
                shrink, parity = row["shrink"], row["torch_parity"]
                kept = ", ".join(p["name"] for p in shrink["passes"] if p["kept"]) or "-"
                print(f"| {name} | {exporter} | {shrinker} | {shrink['nodes_before']} -> {shrink['nodes_after']} | "
                      f"{kept} | {row['onnx']['size_bytes'] / 1024:.0f} | {parity['max_abs_error']:.2g} | "
                      f"{parity['top1_agreement']:.3f} | {seconds:.1f} |", flush=True)
    print("\n| model (FP16, 1,000 images) | top-1 agreement | max abs | max rel | ORT CPU as is: agreement "
          "| max abs | size vs FP32 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row.get("fp16"):
            f = row["fp16"]
            print(f"| {row['model']} | {f['top1_agreement']:.4f} | {f['max_abs_error']:.3g} | "
                  f"{f['max_rel_error']:.2g} | {f['ort_cpu_top1_agreement']:.4f} | {f['ort_cpu_max_abs_error']:.3g} | "
                  f"{f['artifact']['size_bytes'] / row['onnx']['size_bytes']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": fingerprint(), "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
