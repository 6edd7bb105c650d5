"""``foldship build``: load -> compress -> export (ONNX) -> validate -> run folder.

Every stage is a plain function call on plain artifacts (a LoadedModel, an ImageSet, a
CompressionResult, an OnnxArtifact); this module only orders them and writes the results.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from importlib import metadata

import numpy as np

from ..compress.engine import compress_model
from ..data import calibration_images, load_images
from ..exporters import export_onnx
from ..models.registry import LoadedModel, Preprocessing, load_model
from ..validators import agreement, count_macs, count_params, evaluate_gates, evaluate_onnx, evaluate_torch
from ..validators.latency import LatencyProtocol, time_onnx, time_torch
from .config import BuildConfig
from .environment import fingerprint
from .progress import StageProgress
from .report import render_markdown
from .run_folder import RunFolder

BACKENDS = ("onnxruntime-cpu", "torch-cpu")


@dataclass
class BuildOutcome:
    report: dict
    out: str

    @property
    def passed(self) -> bool:
        return self.report["gates"]["passed"]


def load_from_config(config: BuildConfig) -> LoadedModel:
    loaded = load_model(config.model, config.checkpoint, config.num_classes, config.input_size,
                        config.trust_checkpoint)
    if config.mean or config.std:
        base = loaded.preprocessing
        loaded.preprocessing = dataclasses.replace(base, mean=tuple(config.mean or base.mean),
                                                   std=tuple(config.std or base.std))
    return loaded


def build(config: BuildConfig, progress: StageProgress | None = None) -> BuildOutcome:
    """Run every stage and write the run folder; bad input raises BadInput before anything is kept."""
    progress = progress or StageProgress(quiet=True)
    config.validate()
    folder = RunFolder(config.out, config.overwrite)
    try:
        report = _run_stages(config, folder, progress)
        folder.write_json("report.json", report)
        folder.path("report.md").write_text(render_markdown(report))
        out = folder.commit()
    except BaseException:
        folder.discard()
        raise
    return BuildOutcome(report, str(out))


def _run_stages(config: BuildConfig, folder: RunFolder, progress: StageProgress) -> dict:
    with progress.stage("load model"):
        loaded = load_from_config(config)
    with progress.stage("load data"):
        data = load_images(config.data, loaded.preprocessing, config.limit, loaded.num_classes)
        calibration = None
        if config.calibration_data:
            calibration = calibration_images(config.calibration_data, loaded.preprocessing, data,
                                             config.calibration_count, config.seed)
    example = loaded.example_inputs(2)
    with progress.stage(f"compress ({config.method})", total=None) as advance:
        result = compress_model(loaded.model, example, config.method, config.ratio, config.seed, config.groups,
                                config.group_ratios, config.protected, config.round_to, repair=config.repair,
                                calibration=calibration, device=config.device, progress=advance)
    compressed = result.model.cpu().eval()
    with progress.stage("export ONNX", total=2) as advance:
        base_onnx = export_onnx(loaded.model, example, folder.path("baseline.onnx"), config.exporter)
        advance()
        comp_onnx = export_onnx(compressed, example, folder.path("compressed.onnx"), config.exporter)
        advance()
    with progress.stage("evaluate", total=4) as advance:
        predictions = {}
        for key, model, onnx_file in (("baseline", loaded.model, base_onnx), ("compressed", compressed, comp_onnx)):
            predictions[key, "torch"] = evaluate_torch(model, data.x)
            advance()
            predictions[key, "onnx"] = evaluate_onnx(onnx_file.path, data.x, config.threads or None)
            advance()
    protocol = LatencyProtocol(min_seconds=config.latency_min_seconds, threads=config.threads)
    latency: dict[str, dict] = {"baseline": {b: {} for b in BACKENDS}, "compressed": {b: {} for b in BACKENDS}}
    with progress.stage("time (own block per model)", total=4 * len(config.batches)) as advance:
        for key, model, onnx_file in (("baseline", loaded.model, base_onnx), ("compressed", compressed, comp_onnx)):
            for batch in config.batches:
                latency[key]["onnxruntime-cpu"][f"batch{batch}"] = time_onnx(
                    onnx_file.path, loaded.input_shape, batch, protocol).as_dict()
                advance()
            for batch in config.batches:
                latency[key]["torch-cpu"][f"batch{batch}"] = time_torch(
                    model, loaded.input_shape, batch, protocol).as_dict()
                advance()
    labels = data.y.numpy()
    sides = {}
    for key, model, onnx_file in (("baseline", loaded.model, base_onnx), ("compressed", compressed, comp_onnx)):
        onnx_pred = predictions[key, "onnx"]
        sides[key] = {
            "params": count_params(model),
            "macs": count_macs(model, example),
            "accuracy": onnx_pred.correct(labels) / len(labels),
            "correct": onnx_pred.correct(labels),
            "total": len(labels),
            "torch_correct": predictions[key, "torch"].correct(labels),
            "onnx": asdict(onnx_file) | {"path": "baseline.onnx" if key == "baseline" else "compressed.onnx"},
            "latency": latency[key],
        }
    speedup = {b: {batch: sides["baseline"]["latency"][b][batch]["p50_ms"] / sides["compressed"]["latency"][b][batch]["p50_ms"]
                   for batch in sides["baseline"]["latency"][b]} for b in BACKENDS}
    mac_ratio = sides["compressed"]["macs"] / sides["baseline"]["macs"]
    largest = f"batch{max(config.batches)}"
    measured = {
        "accuracy_drop": sides["baseline"]["accuracy"] - sides["compressed"]["accuracy"],
        "speedup": speedup["onnxruntime-cpu"][largest],
    }
    gates = evaluate_gates(measured, {"max_accuracy_drop": config.max_accuracy_drop, "min_speedup": config.min_speedup})
    compression = result.summary()
    compression["groups_compressed"] = sum(g["action"] in ("folded", "pruned") for g in compression["groups"])
    return {
        "foldship_version": metadata.version("foldship"),
        "model": {"name": loaded.name, "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.checkpoint_sha256,
                  "input_shape": list(loaded.input_shape), "num_classes": loaded.num_classes,
                  "preprocessing": asdict(loaded.preprocessing)},
        "data": {"path": data.source, "images": len(data),
                 "calibration": None if calibration is None else
                 {"path": config.calibration_data, "images": len(calibration), "disjoint_from_evaluation": True}},
        "method": config.method,
        "ratio": config.ratio,
        "seed": config.seed,
        "groups_policy": config.groups,
        "repair": config.repair,
        "residual_streams": result.residual_streams,
        "round_to": config.round_to,
        "device": config.device,
        "compression": compression,
        "baseline": sides["baseline"],
        "compressed": sides["compressed"],
        "agreement": agreement(predictions["baseline", "onnx"], predictions["compressed", "onnx"]),
        "onnx_parity": {
            "baseline_top1_match": int((predictions["baseline", "onnx"].top1 == predictions["baseline", "torch"].top1).sum()),
            "compressed_top1_match": int((predictions["compressed", "onnx"].top1 == predictions["compressed", "torch"].top1).sum()),
            "baseline_max_abs_error": _max_abs(predictions["baseline", "onnx"].logits, predictions["baseline", "torch"].logits),
            "compressed_max_abs_error": _max_abs(predictions["compressed", "onnx"].logits, predictions["compressed", "torch"].logits),
        },
        "mac_ratio": mac_ratio,
        "speedup": speedup,
        "speedup_vs_mac_ratio": speedup["onnxruntime-cpu"][largest] * mac_ratio,
        "latency_protocol": asdict(protocol) | {"order": "each model timed in its own block, batches in order"},
        "environment": fingerprint(),
        "gates": {"passed": all(g.passed for g in gates), "results": [g.as_dict() for g in gates]},
    }


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
