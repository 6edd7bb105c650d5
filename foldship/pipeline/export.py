"""``foldship export``: the export stage alone, on a trained model or on a build's run folder.

On a model: fuse -> ONNX -> shrink -> FP16 -> TensorRT, written as ``model.*``. On a run folder:
its ``baseline.onnx`` and ``compressed.onnx`` are shrunk, converted and built again under the
same names. Either way into a new folder that appears whole or not at all, with ``export.json``.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from ..data import load_images
from ..errors import BadInput
from ..exporters import describe_onnx, export_model, export_report, ship_onnx
from ..models.spec import Preprocessing
from ..progress import StageProgress
from ..validators import evaluate_gates
from .build import BuildOutcome, load_from_config
from .config import BuildConfig
from .environment import fingerprint
from .inputs import load_side_images
from .report import side_inputs
from .run_folder import RunFolder

RUN_FOLDER_MODELS = ("baseline", "compressed")


def export(config: BuildConfig, run: str | Path | None = None, progress: StageProgress | None = None) -> BuildOutcome:
    """Export ``config.model`` (or the ONNX files of the run folder ``run``) into ``config.out``."""
    progress = progress or StageProgress(quiet=True)
    config.validate()
    sources = _run_folder_sources(Path(run)) if run is not None else None
    with RunFolder(config.out, config.overwrite) as folder:  # commits whole, or discards on any error or signal
        report = _export_stages(config, sources, folder, progress)
        folder.write_json("export.json", report)
    return BuildOutcome(report, str(folder.final))


def _run_folder_sources(run: Path) -> dict:
    onnx_files = [run / f"{name}.onnx" for name in RUN_FOLDER_MODELS if (run / f"{name}.onnx").is_file()]
    if not onnx_files:
        raise BadInput(f"{run} holds no baseline.onnx or compressed.onnx; pass a folder written by foldship build")
    report_path = run / "report.json"
    try:
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise BadInput(f"{report_path} is not valid JSON ({exc.msg}); rebuild the run folder") from None
    return {"run": str(run), "onnx": onnx_files, "model": report.get("model", {}), "inputs": side_inputs(report),
            "exporter": (report.get("export") or {}).get("exporter", "unknown")}


def _export_stages(config: BuildConfig, sources: dict | None, folder: RunFolder, progress: StageProgress) -> dict:
    options = config.export_options()
    if sources is None:
        with progress.stage("load model"):
            loaded = load_from_config(config)
            data = load_images(config.data, loaded.preprocessing, config.limit, loaded.num_classes)
        with progress.stage("export (fuse, ONNX, shrink)", total=1) as advance:
            exported = [export_model(loaded.model, loaded.example_inputs(2), folder.staging, "model", options,
                                     data.x)]
            advance()
        source = {"model": loaded.name, "checkpoint": loaded.checkpoint, "checkpoint_sha256": loaded.checkpoint_sha256}
    else:
        # each file checked on images of its own input (a compressed engine may take a smaller one); images of
        # another size than a file takes: one line, exit 2
        inputs = {}
        for path in sources["onnx"]:
            shape, recorded = sources["inputs"][path.stem]
            inputs[path.stem] = (shape, Preprocessing(**recorded) if recorded else Preprocessing())
        images = load_side_images(config.data, inputs, config.limit, sources["model"].get("num_classes"))
        data = images[sources["onnx"][0].stem]
        exported = []
        with progress.stage("export (shrink)", total=len(sources["onnx"])) as advance:
            for path in sources["onnx"]:
                artifact = describe_onnx(path, sources["exporter"])
                exported.append(ship_onnx(artifact, folder.staging, path.stem, options, images[path.stem].x))
                advance()
        source = {"run": sources["run"], "onnx": [p.name for p in sources["onnx"]]}
    fp16 = [e.fp16 for e in exported if e.fp16]
    gates = evaluate_gates({"fp16_agreement": min(f.top1_agreement for f in fp16) if fp16 else None},
                           {"min_fp16_agreement": config.min_fp16_agreement if fp16 else None})
    return {
        "foldship_version": metadata.version("foldship"),
        "source": source,
        "data": {"path": data.source, "images": len(data)},
        "export": export_report(options, exported),
        "environment": fingerprint(),
        "gates": {"passed": all(g.passed for g in gates), "results": [g.as_dict() for g in gates]},
    }
