"""``foldship validate`` and ``foldship bench``: the validation stage without compressing anything.

``validate`` takes a run folder (its baseline.onnx, compressed.onnx and any variants or engines,
re-validated with the preprocessing and data its report names) or two ONNX files (baseline,
then compressed) and writes a new folder with report.json, report.md and the latency plot.
Several run folders are compared instead (``sweep.md``, ``accuracy_vs_size.png``), without
re-measuring. ``bench`` times one artifact on every backend that can run it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import BadInput
from ..models.spec import Preprocessing
from ..progress import StageProgress
from ..validators import engine_artifact, onnx_artifact, onnx_macs, run_folder_artifacts
from ..validators.artifacts import ENGINE_SUFFIXES, Artifact, available_backends
from ..validators.stage import SIDES, select_backends, time_blocks, validate
from .build import BuildOutcome
from .config import BuildConfig
from .environment import fingerprint
from .inputs import SideInput, input_entry, load_side_images
from .report import load_run, side_inputs, write_report, write_sweep
from .run_folder import RunFolder


@dataclass
class Sources:
    artifacts: list[Artifact]
    # each side's input shape (None: the images') and preprocessing; a build may give its compressed engine a
    # smaller input than its baseline (pipeline/inputs.py)
    inputs: dict[str, SideInput]
    data: str
    num_classes: int | None
    model: dict  # what is known about the model (name, input_shape, ...) from a run's report


def is_sweep(paths: list[str | Path]) -> bool:
    return len(paths) >= 2 and all(Path(p).is_dir() for p in paths)


def sweep(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> dict:
    """Compare several run folders (accuracy vs size) into a new folder ``out``."""
    with RunFolder(out, overwrite) as folder:  # commits whole, or discards on any error or signal
        result = write_sweep(paths, folder.staging)
    return result


def resolve(paths: list[str | Path], config: BuildConfig, data: str | None) -> Sources:
    """The artifacts and the way to feed them: one run folder, or a baseline and a compressed file."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        run = load_run(paths[0])
        model = run.get("model", {})
        inputs = {side: (shape, Preprocessing(**p) if p else Preprocessing())
                  for side, (shape, p) in side_inputs(run).items()}
        return Sources(run_folder_artifacts(paths[0]), inputs, data or run.get("data", {}).get("path") or config.data,
                       model.get("num_classes"), model)
    if len(paths) != 2 or any(p.is_dir() for p in paths):
        raise BadInput("give one run folder, two model files (baseline, then compressed), or several run folders")
    artifacts = [_file_artifact(name, path) for name, path in zip(("baseline", "compressed"), paths)]
    base = Preprocessing()
    preprocessing = dataclasses.replace(base, mean=tuple(config.mean or base.mean), std=tuple(config.std or base.std))
    return Sources(artifacts, {side: (None, preprocessing) for side in SIDES}, data or config.data,
                   config.num_classes, {})


def _file_artifact(name: str, path: Path) -> Artifact:
    if not path.is_file():
        raise BadInput(f"{path} does not exist; give an .onnx file (or a TensorRT .engine/.plan)")
    if path.suffix in ENGINE_SUFFIXES:
        return engine_artifact(name, path)
    if path.suffix != ".onnx":
        raise BadInput(f"{path} is not an .onnx file; export the model first (foldship export)")
    return onnx_artifact(name, path)


def validate_artifacts(paths: list[str | Path], config: BuildConfig, data: str | None = None,
                       progress: StageProgress | None = None) -> BuildOutcome:
    """Validate a run folder's artifacts or a baseline/compressed pair into the folder ``config.out``."""
    progress = progress or StageProgress(quiet=True)
    config.validate()
    sources = resolve(paths, config, data)
    with RunFolder(config.out, config.overwrite) as folder:  # commits whole, or discards on any error or signal
        with progress.stage("load data"):
            loaded = load_side_images(sources.data, sources.inputs, config.limit, sources.num_classes)
        images = loaded["baseline"]
        onnx_files = {a.name: a for a in sources.artifacts if a.format == "onnx"}
        input_shape = {side: tuple(shape or loaded[side].x.shape[1:]) for side, (shape, _) in sources.inputs.items()}
        _check_input_shapes(onnx_files, input_shape)
        num_classes = sources.num_classes or int(images.y.max()) + 1
        macs = {side: onnx_macs(onnx_files[side].path) for side in SIDES if side in onnx_files}
        validation = validate(sources.artifacts, {side: loaded[side].x for side in SIDES}, images.y, num_classes,
                              input_shape, config.validation_settings(), config.gate_limits(), macs, progress)
        report = {
            "foldship_version": metadata.version("foldship"),
            "title": f"validate {' vs '.join(Path(p).name for p in paths)}",
            "sources": [str(p) for p in paths],
            "model": sources.model or {"input_shape": list(input_shape["baseline"]), "num_classes": num_classes,
                                       "preprocessing": dataclasses.asdict(sources.inputs["baseline"][1])},
            "data": {"path": images.source, "images": len(images)},
            **validation.report,
            "environment": fingerprint(),
        }
        for side in SIDES:
            report[side]["input"] = input_entry(input_shape[side], sources.inputs[side][1])
            if side in macs:
                report[side]["macs"] = macs[side]
        write_report(folder.staging, report, validation.samples)
    return BuildOutcome(report, str(folder.final))


def bench(path: str | Path, config: BuildConfig, input_shape: tuple[int, ...] | None = None,
          progress: StageProgress | None = None) -> dict:
    """Time one ONNX file or TensorRT engine on every backend that can run it (or ``config.backends``)."""
    progress = progress or StageProgress(quiet=True)
    path = Path(path)
    artifact = _file_artifact(path.name.split(".")[0], path)
    settings = config.validation_settings()
    shape = input_shape or _static_input_shape(artifact)
    backends = artifact.backends(select_backends(settings.backends))
    if not backends:
        raise BadInput(f"no backend for {artifact.format} on this machine (available: {', '.join(available_backends())})")
    latency = time_blocks([(artifact, b) for b in backends], shape, settings, progress)[artifact.name]
    return {
        "artifact": str(path), "format": artifact.format, "precision": artifact.precision,
        "size_bytes": artifact.size_bytes, "input_shape": list(shape),
        "latency": {b: {k: s.as_dict() for k, s in batches.items()} for b, batches in latency.items()},
        "latency_protocol": dataclasses.asdict(settings.protocol) | {
            "threads": settings.protocol.resolved_threads(), "onnxruntime": dataclasses.asdict(settings.ort)},
        "environment": fingerprint(),
    }


def _static_input_shape(artifact: Artifact) -> tuple[int, ...]:
    if artifact.format != "onnx":
        raise BadInput("give --input-shape (e.g. 3,224,224) to time a TensorRT engine")
    shape = _onnx_input_shape(artifact.path)
    if shape is None:
        raise BadInput(f"{artifact.path} has a dynamic input shape beyond the batch axis; give --input-shape "
                       f"(e.g. 3,224,224)")
    return shape


def _onnx_input_shape(path: str) -> tuple[int, ...] | None:
    """An ONNX file's input shape without the batch axis; None where it is dynamic."""
    import onnx

    dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    return shape if shape and all(d > 0 for d in shape) else None


def _check_input_shapes(onnx_files: dict[str, Artifact], input_shape: dict[str, tuple[int, ...]]) -> None:
    """Each side's ONNX file must take the images prepared for it (a build may give the compressed engine a
    smaller input than its baseline; only its run folder records how to prepare each side's)."""
    for side, artifact in onnx_files.items():
        takes = _onnx_input_shape(artifact.path)
        if side in input_shape and takes is not None and takes != input_shape[side]:
            raise BadInput(f"{Path(artifact.path).name} takes inputs of shape {takes} but its images are "
                           f"{input_shape[side]}; validate the run folder that holds it (its report says how each "
                           f"side's images are prepared), or give images of that size")
