"""``foldship build``: load -> compress -> export (ONNX) -> validate -> run folder.

Every stage is a plain function call on plain artifacts (a LoadedModel, an ImageSet, a
CompressionResult, an OnnxArtifact); this module only orders them and writes the results.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata

from torch import nn

from ..compress.distill import check_images, check_trainable, distill
from ..compress.engine import compress_model
from ..data import CalibrationImages, calibration_images
from ..data.presets import resolve_preprocessing
from ..exporters import export_model, export_report
from ..models.registry import load_model
from ..models.saved import SPEC_NAME, NotDescribable, save_compressed
from ..models.spec import LoadedModel, check_forward
from ..progress import StageProgress
from ..validators import count_macs, count_params, run_folder_artifacts, torch_artifact
from ..validators.accuracy import classification_scores, evaluate_torch
from ..validators.stage import validate
from .budget import plan_budget, validated_latency
from .config import BuildConfig
from .environment import fingerprint, keep_freed_memory
from .inputs import compressed_side, input_entry, load_side_images
from .report import write_report
from .run_folder import RunFolder
from .sources import check_conversion, check_repair, export_baseline, given_model


@dataclass
class BuildOutcome:
    report: dict
    out: str

    @property
    def passed(self) -> bool:
        return self.report["gates"]["passed"]


def load_from_config(config: BuildConfig) -> LoadedModel:
    loaded = load_model(config.model, config.checkpoint, config.num_classes, config.input_size,
                        config.trust_checkpoint, checkpoint_map=config.checkpoint_map, model_args=config.model_args,
                        input_shape=config.input_shape)
    config.require_weights()  # after loading: an unknown model or a missing file is what to fix first
    loaded.preprocessing = resolve_preprocessing(loaded.preprocessing, config.preprocess,
                                                 **config.preprocessing_overrides())
    check_forward(loaded)
    return loaded


def build(config: BuildConfig, progress: StageProgress | None = None, *,
          model: LoadedModel | nn.Module | None = None) -> BuildOutcome:
    """Run every stage and write the run folder; bad input raises BadInput before anything is kept.

    ``model`` builds a model made in Python instead of ``config.model`` (whose checkpoint and
    model_args are then not used): a LoadedModel as it is, or an nn.Module with trained weights,
    taken with the config's input_shape (or input_size), num_classes and preprocessing keys.
    """
    progress = progress or StageProgress(quiet=True)
    config.validate()
    keep_freed_memory()  # process-wide: the survey's and evaluation's activations reuse freed memory
    with RunFolder(config.out, config.overwrite) as folder:  # commits whole, or discards on any error or signal
        report, latency_samples = _run_stages(config, folder, progress, model)
        write_report(folder.staging, report, latency_samples)
    return BuildOutcome(report, str(folder.final))


def _run_stages(config: BuildConfig, folder: RunFolder, progress: StageProgress,
                given: LoadedModel | nn.Module | None = None) -> tuple[dict, dict]:
    first_stage = len(progress.timings)
    with progress.stage("load model"):
        loaded = load_from_config(config) if given is None else given_model(given, config)
        check_repair(config.repair, loaded.model, loaded.name)
        shrunk = compressed_side(loaded, config.compressed_input_size)  # loaded itself at the baseline's input
    with progress.stage("load data") as advance:
        # The same pictures as each side sees them; calibration and recovery read images at the compressed input.
        inputs = {"baseline": loaded, "compressed": shrunk}
        evaluation = load_side_images(config.data, {s: (m.input_shape, m.preprocessing) for s, m in inputs.items()},
                                      config.limit, loaded.num_classes, advance)
        data, compressed_data = evaluation["baseline"], evaluation["compressed"]
        chosen = None  # calibration images, near-copies of the evaluation images left out
        if config.calibration_data:
            chosen = calibration_images(config.calibration_data, shrunk.preprocessing, compressed_data,
                                        config.calibration_count, config.seed)
        calibration = None if chosen is None else chosen.x
        training = None
        if config.finetune != "none":  # distillation's own draw: all calibration images unless finetune_images
            training = calibration_images(config.calibration_data, shrunk.preprocessing, compressed_data,
                                          config.finetune_images, config.seed)
            check_images(training.x, config.distill_settings())
            check_trainable(loaded.model)
    if loaded.baseline_onnx:  # a converted ONNX model must compute what the file computes, before compression
        with progress.stage("check conversion (ONNX Runtime vs PyTorch)"):
            check_conversion(loaded, data.x)
    example, compressed_example = loaded.example_inputs(2), shrunk.example_inputs(2)
    widths = config.width_rule()
    round_to = widths.round_to
    compression_name = "remove blocks" if config.drop_blocks else config.method
    with progress.stage(f"compress ({compression_name})", total=None) as advance:
        budget = plan_budget(loaded.model, compressed_example, config.method, config.target_macs,
                             config.target_latency, round_to, config.groups, config.protected, config.threads,
                             calibration, config.seed, config.repair, config.drop_blocks,
                             baseline_example=None if shrunk is loaded else example)
        result = compress_model(loaded.model, compressed_example, config.method, config.ratio, config.seed,
                                config.groups, budget.group_ratios() if budget else config.group_ratios, config.protected,
                                round_to, repair=config.repair,
                                calibration=calibration, device=config.device, progress=advance,
                                removed_blocks=budget.block_names() if budget else ())
    recovery = None if training is None else _recover(config, loaded, result.model, training, data, compressed_data,
                                                      progress)
    compressed = result.model.cpu().eval()
    try:  # the compressed model as data (width spec + safetensors), rebuilt by foldship.load_compressed
        spec = save_compressed(compressed, shrunk, folder.path(SPEC_NAME), {
            "method": config.method, "ratio": config.ratio, "seed": config.seed, "groups_policy": config.groups,
            "repair": config.repair, "round_to": round_to, "finetune": config.finetune}, result.removed_blocks)
        saved_model = {"spec": spec.name, "weights": spec.with_suffix(".safetensors").name}
    except NotDescribable as exc:  # the ONNX files still ship; the report says why the spec does not
        saved_model = {"skipped": str(exc)}
    export_options = config.export_options()
    with progress.stage("export (fuse, ONNX, shrink)", total=2) as advance:
        exported = []
        exported.append(export_baseline(loaded, example, folder.staging, export_options, data.x))
        advance()
        exported.append(export_model(compressed, compressed_example, folder.staging, "compressed", export_options,
                                     compressed_data.x))
        advance()
    base_onnx, comp_onnx = exported[0].onnx, exported[1].onnx
    artifacts = [torch_artifact("baseline.pytorch", loaded.model), torch_artifact("compressed.pytorch", compressed),
                 *run_folder_artifacts(folder.staging)]
    macs = {"baseline": count_macs(loaded.model, example), "compressed": count_macs(compressed, compressed_example)}
    fp16 = [e.fp16 for e in exported if e.fp16]
    validation = validate(artifacts, {"baseline": data.x, "compressed": compressed_data.x}, data.y,
                          loaded.num_classes, {side: m.input_shape for side, m in inputs.items()},
                          config.validation_settings(), config.gate_limits() | {
                              "min_fp16_agreement": config.min_fp16_agreement if fp16 else None},
                          macs, progress, {"fp16_agreement": min(f.top1_agreement for f in fp16) if fp16 else None})
    sides = {}
    for key, model, onnx_file in (("baseline", loaded.model, base_onnx), ("compressed", compressed, comp_onnx)):
        sides[key] = {"params": count_params(model), "macs": macs[key], **validation.report[key],
                      "onnx": asdict(onnx_file) | {"path": f"{key}.onnx"},
                      "input": input_entry(inputs[key].input_shape, inputs[key].preprocessing)}
    if recovery is not None:
        comp = validation.report["compressed"]
        recovery["after"] = {"backend": "onnxruntime-cpu", "artifact": "compressed.onnx", "accuracy": comp["accuracy"],
                             "correct": comp["correct"], "total": comp["total"],
                             "top1_agreement": validation.report["agreement"]["top1_agreement"]}
    compression = result.summary()
    compression["budget"] = budget.summary() if budget else None
    if budget:
        compression["budget"]["validated"] = validated_latency(compression["budget"], validation.report["speed"])
    compression["groups_compressed"] = sum(g["action"] in ("folded", "pruned") for g in compression["groups"])
    return {
        "foldship_version": metadata.version("foldship"),
        "model": {"name": loaded.name, "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.checkpoint_sha256,
                  "checkpoint_mapping": loaded.checkpoint_mapping, "source": loaded.source,
                  "random_weights": given is None and config.random_weights,
                  "input_shape": list(loaded.input_shape), "num_classes": loaded.num_classes,
                  "preprocessing": asdict(loaded.preprocessing)},
        "data": {"path": data.source, "images": len(data),
                 "calibration": None if chosen is None else chosen.summary()},
        "method": config.method,
        "ratio": config.ratio,
        "seed": config.seed,
        "groups_policy": config.groups,
        "repair": config.repair,
        "finetune": config.finetune,
        "recovery": recovery,
        "residual_streams": result.residual_streams,
        "round_to": round_to,
        "width_rule": widths.as_dict(),
        "device": config.device,
        "compression": compression,
        "saved_model": saved_model,
        **validation.report,
        **sides,
        "export": export_report(export_options, exported),
        "environment": fingerprint(),
        "stages": progress.timings[first_stage:],  # wall and CPU seconds of each stage, in order
    }, validation.samples


def _recover(config: BuildConfig, loaded: LoadedModel, compressed, images: CalibrationImages, data,
             compressed_data, progress: StageProgress) -> dict:
    """Distil the uncompressed model into ``compressed`` (in place) on unlabelled ``images``; returns the report's
    ``recovery`` section, with top-1 and agreement before recovery measured in PyTorch on the CPU (the model
    before recovery is never exported). The evaluation labels score that model here; ``distill`` never sees them.
    The teacher sees ``images`` as the student does (at the compressed input); the baseline's predictions
    that agreement compares with are its own, on ``data`` at its input."""
    compressed.cpu()
    base, before = evaluate_torch(loaded.model, data.x), evaluate_torch(compressed, compressed_data.x)
    scores = classification_scores(before, data.y, loaded.num_classes)
    settings = config.distill_settings()
    epochs = settings.planned_epochs
    steps = None if epochs is None else epochs * (len(images.x) // settings.batch)
    black = [-m / s for m, s in zip(loaded.preprocessing.mean, loaded.preprocessing.std)]  # crop padding
    with progress.stage("recover (distill)", total=steps) as advance:
        record = distill(compressed, loaded.model, images.x, settings, config.device, black, advance)
    return {**record.as_dict(), "calibration": images.summary(), "plot": "recovery.png",
            "before": {"backend": "torch-cpu", "artifact": "compressed model before recovery (PyTorch)",
                       "accuracy": scores["accuracy"], "correct": scores["correct"], "total": scores["total"],
                       "top1_agreement": float((before.top1 == base.top1).mean())}}

