"""The validation stage on its own: artifacts + labelled images -> the report's validation entries.

``foldship build`` calls it with the PyTorch modules and the ONNX files it exported;
``foldship validate`` with any pair of ONNX files (or a run folder's artifacts). Order:
inference of every artifact on every backend it can run on (accuracy and parity come from the
same outputs), then latency, the artifacts of each backend taking turns block by block
(``latency.interleave``), then the gates.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ..errors import BadInput
from .accuracy import Predictions, classification_scores
from .agreement import Tolerance, compare
from ..progress import StageProgress
from .artifacts import (BACKENDS, OPT_IN_BACKENDS, ORT_OPTIMIZATION, Artifact, OrtSettings, RunOutputs,
                        available_backends, run_outputs)
from .gates import evaluate_gates, summary
from .latency import LatencyProtocol, LatencyStats, time_artifacts
from .speed import measured_speedups, speed_summary, speedup_entries

if TYPE_CHECKING:
    import torch

PRIMARY = "onnxruntime-cpu"  # what ships and what the gates judge
SIDES = ("baseline", "compressed")
# How latency is taken and compared (report.json's latency_protocol; bench files say the same).
INTERLEAVED_ORDER = ("per backend and batch, the models take turns block by block (trials blocks each, the order "
                     "rotating every round: A B, B A, ...); min_runs and min_seconds are per model, split over its "
                     "blocks; samples pool, each block keeps its p50")
SPEEDUP_RULE = ("median over rounds of baseline block p50 / compressed block p50; interval: smallest and largest "
                "per-round ratio (3+ rounds); an interval holding 1.0 is no measurable difference; min_speedup "
                "judges the interval's lower end")


T = TypeVar("T")
# One value for both sides, or one per side: a compressed engine may take a smaller input than its baseline
# (pipeline/inputs.py), fed the same pictures at its own size.
PerSide = T | Mapping[str, T]


def for_side(value: PerSide, side: str):
    return value[side] if isinstance(value, Mapping) else value


@dataclass
class ValidationSettings:
    batches: list[int] = field(default_factory=lambda: [1, 64])
    protocol: LatencyProtocol = field(default_factory=LatencyProtocol)
    ort: OrtSettings = field(default_factory=OrtSettings)
    backends: list[str] | None = None  # None: every backend this machine has

    def validate(self) -> "ValidationSettings":
        """Refuse settings that cannot run (BadInput) before anything is loaded or timed."""
        p = self.protocol
        if not self.batches or any(int(b) < 1 for b in self.batches):
            raise BadInput(f"batches must be positive integers, got {self.batches}")
        if p.warmup < 0 or p.min_runs < 1 or p.max_runs < p.min_runs or p.trials < 1 or p.min_seconds < 0:
            raise BadInput(f"latency protocol needs warmup >= 0, 1 <= min_runs <= max_runs, trials >= 1 (3 or more "
                           f"for a speedup interval) and "
                           f"min_seconds >= 0; got warmup {p.warmup}, min_runs {p.min_runs}, max_runs {p.max_runs}, "
                           f"trials {p.trials}, min_seconds {p.min_seconds}")
        if p.threads < 0:
            raise BadInput(f"threads must be >= 0 (0: every core), got {p.threads}")
        if p.clock not in ("wall", "cpu"):
            raise BadInput(f"unknown latency clock {p.clock!r}; choose wall or cpu")
        if p.clock == "cpu" and p.resolved_threads() != 1:
            raise BadInput("the cpu latency clock counts the calling thread only; set threads to 1 with it")
        if self.ort.optimization not in ORT_OPTIMIZATION:
            raise BadInput(f"unknown ONNX Runtime optimization level {self.ort.optimization!r}; "
                           f"choose one of {', '.join(ORT_OPTIMIZATION)}")
        unknown = [b for b in self.backends or [] if b not in BACKENDS]
        if unknown:
            raise BadInput(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
        return self


@dataclass
class Validation:
    report: dict  # the report.json entries this stage owns
    samples: dict  # raw latency samples in ms: {artifact: {backend: {"batch<N>": [...]}}}


def select_backends(wanted: list[str] | None, available: list[str] | None = None) -> list[str]:
    """``wanted``, each checked against ``available`` (default: this machine's backends); None: all
    available ones except those used only when asked for (OPT_IN_BACKENDS)."""
    available = available_backends() if available is None else available
    if wanted is None:
        return [b for b in available if b not in OPT_IN_BACKENDS]
    missing = [b for b in wanted if b not in available]
    if missing:
        raise BadInput(f"backend(s) {', '.join(missing)} not available on this machine (available: "
                       f"{', '.join(available)})")
    return list(wanted)


def validate(artifacts: list[Artifact], images: PerSide[torch.Tensor], labels: torch.Tensor, num_classes: int,
             input_shape: PerSide[tuple[int, ...]], settings: ValidationSettings, limits: dict[str, float | None],
             macs: dict[str, int] | None = None, progress=None,
             extra_measured: dict[str, float | None] | None = None) -> Validation:
    """Accuracy, parity, agreement, latency and gates for a baseline/compressed set of artifacts.

    ``artifacts`` must hold an ONNX artifact named "baseline" and one named "compressed" (the
    files that ship); PyTorch modules, FP16 variants and TensorRT engines are optional. ``images``
    and ``input_shape`` are both sides', or each side's ({"baseline": ..., "compressed": ...}): the
    same labelled pictures, preprocessed for each side's input.
    ``macs`` ({"baseline": n, "compressed": m}) relates the speedup to the MAC reduction (``speed``);
    ``extra_measured`` adds values measured by earlier stages for gates in ``limits``.
    """
    progress = progress or StageProgress(quiet=True)
    settings.validate()
    # Report order: each side's ONNX file, its PyTorch module, then variants and engines.
    artifacts = sorted(artifacts, key=lambda a: (a.side != "baseline", a.name != a.side, a.format != "pytorch", a.name))
    backends = select_backends(settings.backends)
    if PRIMARY not in backends:
        raise BadInput(f"the {PRIMARY} backend is required: the gates and the summary judge the ONNX files on it")
    # An artifact no selected backend runs (a TensorRT engine on a machine without TensorRT) is listed, not judged.
    skipped = [{"name": a.name, "format": a.format, "reason": f"no {a.format} backend among {', '.join(backends)}"}
               for a in artifacts if not a.backends(backends)]
    artifacts = [a for a in artifacts if a.backends(backends)]
    main = {side: _main_onnx(artifacts, side) for side in SIDES}
    runs = [(a, b) for a in artifacts for b in a.backends(backends)]
    outputs: dict[tuple[str, str], RunOutputs] = {}
    with progress.stage("evaluate", total=len(runs)) as advance:
        for artifact, backend in runs:
            runner = artifact.runner(backend, for_side(input_shape, artifact.side), settings.protocol.threads,
                                     settings.ort)
            outputs[artifact.name, backend] = run_outputs(runner, for_side(images, artifact.side))
            advance()
    entries = {a.name: _artifact_entry(a, backends, outputs, labels, num_classes) for a in artifacts}
    for artifact in artifacts:
        entries[artifact.name]["parity"] = _parity(artifact, artifacts, backends, outputs)

    plan = [(a, b) for a in artifacts for b in _timed_backends(a, backends)]
    latency = time_blocks(plan, input_shape, settings, progress)
    for name, per_backend in latency.items():
        entries[name]["latency"] = {b: {k: s.as_dict() for k, s in batches.items()} for b, batches in per_backend.items()}

    sides = {side: _side(side, artifacts, entries, labels, num_classes, outputs) for side in SIDES}
    agreement = compare(outputs[main["compressed"].name, PRIMARY], outputs[main["baseline"].name, PRIMARY],
                        Tolerance.for_precisions(main["compressed"].precision, main["baseline"].precision))
    speedups = measured_speedups(sides["baseline"]["latency"], sides["compressed"]["latency"])
    largest, smallest = f"batch{max(settings.batches)}", f"batch{min(settings.batches)}"
    mac_ratio = macs["compressed"] / macs["baseline"] if macs and macs.get("baseline") else None
    primary_speedup = speedups.get(PRIMARY, {}).get(largest)
    compressed_primary = sides["compressed"]["latency"].get(PRIMARY, {})
    measured = {
        "accuracy_drop": sides["baseline"]["accuracy"] - sides["compressed"]["accuracy"],
        "agreement": agreement.top1_agreement,
        "speedup": primary_speedup.judged if primary_speedup else None,
        "p99_ms": compressed_primary[smallest]["p99_ms"] if smallest in compressed_primary else None,
        "size_mb": main["compressed"].size_bytes / 1e6,
    }
    gates = evaluate_gates(measured | (extra_measured or {}), limits)
    report = {
        **sides,
        "artifacts": list(entries.values()),
        "skipped_artifacts": skipped,
        "agreement": agreement.as_dict(),
        "onnx_parity": _onnx_parity(entries),
        "mac_ratio": mac_ratio,
        **speedup_entries(speedups),
        "speed": speed_summary(primary_speedup, PRIMARY, max(settings.batches), mac_ratio) if primary_speedup else None,
        "latency_protocol": asdict(settings.protocol) | {
            "threads": settings.protocol.resolved_threads(), "batches": list(settings.batches),
            "backends": [b for b in backends if any(b in a.backends(backends) for a in artifacts)],
            "onnxruntime": asdict(settings.ort),
            "order": INTERLEAVED_ORDER,
            "speedup": SPEEDUP_RULE,
            "peak_memory": "host resident memory added while loading and running a model's first block "
                           "(Linux VmHWM)",
        },
        "gates": summary(gates),
    }
    return Validation(report, raw_samples(latency))


def _main_onnx(artifacts: list[Artifact], side: str) -> Artifact:
    for artifact in artifacts:
        if artifact.name == side and artifact.format == "onnx":
            return artifact
    raise BadInput(f"no ONNX artifact named {side!r} to validate; give a baseline and a compressed .onnx")


def _reference(artifact: Artifact, artifacts: list[Artifact]) -> Artifact:
    """What an artifact must reproduce: its side's PyTorch module, else its side's FP32 ONNX file."""
    same_side = [a for a in artifacts if a.side == artifact.side]
    return next((a for a in same_side if a.format == "pytorch"), None) or _main_onnx(artifacts, artifact.side)


def _artifact_entry(artifact: Artifact, backends, outputs, labels, num_classes) -> dict:
    scores = {}
    for backend in artifact.backends(backends):
        s = classification_scores(Predictions(outputs[artifact.name, backend].logits), labels, num_classes)
        scores[backend] = {k: v for k, v in s.items() if k != "per_class"}
    return {"name": artifact.name, "side": artifact.side, "format": artifact.format,
            "file": None if artifact.path is None else artifact.path.rsplit("/", 1)[-1],
            "precision": artifact.precision, "size_bytes": artifact.size_bytes, "accuracy": scores}


def _parity(artifact: Artifact, artifacts: list[Artifact], backends, outputs) -> list[dict]:
    """This artifact on each backend against its reference on the CPU, at their precisions' tolerance."""
    reference = _reference(artifact, artifacts)
    ref_backend = reference.backends(backends)[0]
    checks = []
    for backend in artifact.backends(backends):
        if artifact is reference and backend == ref_backend:
            continue
        tolerance = Tolerance.for_precisions(artifact.compute_precision(backend),
                                             reference.compute_precision(ref_backend))
        result = compare(outputs[artifact.name, backend], outputs[reference.name, ref_backend], tolerance)
        checks.append(result.as_dict() | {"backend": backend, "reference_backend": ref_backend})
    return checks


def _timed_backends(artifact: Artifact, backends: list[str]) -> list[str]:
    """Low-precision ONNX variants pay only on their GPU backend: ONNX Runtime CPU runs FP16 slower
    than FP32 (ecosystem.md section 6), so timing them there says nothing about the artifact."""
    own = artifact.backends(backends)
    if artifact.format == "onnx" and artifact.name != artifact.side:
        return [b for b in own if b != "onnxruntime-cpu"]
    return own


def time_blocks(plan: list[tuple[Artifact, str]], input_shape: PerSide[tuple[int, ...]],
                settings: ValidationSettings, progress=None) -> dict[str, dict[str, dict[str, LatencyStats]]]:
    """Time each (artifact, backend) of ``plan`` at every batch size, each fed its side's ``input_shape``:
    per backend and batch, the artifacts on that backend take turns block by block (``latency.interleave``)."""
    progress = progress or StageProgress(quiet=True)
    by_backend: dict[str, list[Artifact]] = {}
    for artifact, backend in plan:
        by_backend.setdefault(backend, []).append(artifact)
    latency: dict[str, dict[str, dict[str, LatencyStats]]] = {}
    total = len(plan) * len(settings.batches) * settings.protocol.trials
    with progress.stage("time (interleaved blocks)", total=total) as advance:
        for backend, artifacts in by_backend.items():
            for batch in settings.batches:
                shapes = {a.name: for_side(input_shape, a.side) for a in artifacts}
                timed = time_artifacts(artifacts, backend, shapes, batch, settings.protocol, settings.ort, advance)
                for name, stats in timed.items():
                    latency.setdefault(name, {}).setdefault(backend, {})[f"batch{batch}"] = stats
    return latency


def raw_samples(latency: dict[str, dict[str, dict[str, LatencyStats]]]) -> dict:
    return {name: {b: {k: [round(v, 4) for v in s.samples_ms] for k, s in batches.items()}
                   for b, batches in per_backend.items()} for name, per_backend in latency.items()}


def _side(side: str, artifacts, entries, labels, num_classes, outputs) -> dict:
    """A side's headline numbers: accuracy of its ONNX file on ONNX Runtime CPU, and the latency of
    each backend's representative (ONNX for ONNX Runtime, the module for PyTorch, the engine for TensorRT)."""
    main = _main_onnx(artifacts, side)
    scores = classification_scores(Predictions(outputs[main.name, PRIMARY].logits), labels, num_classes)
    timed: dict[str, dict] = {}
    for artifact in artifacts:
        if artifact.side == side and (artifact.format != "onnx" or artifact is main):
            for backend, batches in entries[artifact.name].get("latency", {}).items():
                timed.setdefault(backend, batches)
    latency = {b: timed[b] for b in BACKENDS if b in timed}
    module = next((a for a in artifacts if a.side == side and a.format == "pytorch"), None)
    torch_scores = entries[module.name]["accuracy"].get("torch-cpu") if module else None
    return scores | {
        "torch_correct": torch_scores["correct"] if torch_scores else None,
        "size_bytes": main.size_bytes,
        "latency": latency,
    }


def _onnx_parity(entries: dict) -> dict:
    """ONNX Runtime vs PyTorch for each side's ONNX file (when the module is known)."""
    parity = {}
    for side in SIDES:
        check = next((p for p in entries[side]["parity"] if p["backend"] == PRIMARY), None)
        if check is None or check["reference_backend"] != "torch-cpu":
            continue
        parity[f"{side}_top1_match"] = round(check["top1_agreement"] * check["images"])
        parity[f"{side}_max_abs_error"] = check["max_abs_logit_error"]
        parity[f"{side}_within_tolerance"] = check["within_tolerance"]
    return parity
