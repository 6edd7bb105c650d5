"""Latency on the machine a model ships to, not the machine that built it.

``foldship bench RUN_DIR --json FILE`` runs on the target: it times the run folder's baseline.onnx
and compressed.onnx with ONNX Runtime on that machine and writes the timings with a description of
the machine, with the build's protocol: the two models take turns block by block on every backend
(``validators.latency.interleave``), so drift on a busy board hits both alike, and each speedup
comes with its interval (``validators.speed``). ``foldship validate RUN_DIR --latency FILE...``
merges such files into a copy of the run's report, one entry per target
named by its machine, and judges the latency gates on each target's numbers.

Neither imports PyTorch: a target needs onnxruntime, numpy and the CLI's packages (docs/edge.md).
"""
from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from pathlib import Path

from ..errors import BadInput
from ..files import sha256_of
from ..progress import StageProgress
from ..validators.artifacts import ORT_BACKENDS, Artifact, OrtSettings, onnx_backends, onnx_session
from ..validators.gates import GATES, check_limits, evaluate_gates
from ..validators.latency import LatencyProtocol
from ..validators.speed import measured_speedups, recorded_speedup, speedup_entries
from ..validators.stage import (INTERLEAVED_ORDER, SIDES, SPEEDUP_RULE, ValidationSettings, select_backends,
                                time_blocks)
from .environment import fingerprint
from .report import load_run, render_markdown, run_title, side_inputs
from .run_folder import RunFolder

BENCH_FORMAT = "foldship-bench/2"  # 2: interleaved blocks on every backend, speedup intervals
LATENCY_GATES = ("min_speedup", "max_p99_ms")  # the gates a target's timings can judge
# Files of a run folder that a merged report refers to (report.md shows latency.png).
CARRIED_FILES = ("latency.png", "latency_samples.json")


def run_onnx_files(run: Path) -> dict[str, Path]:
    """The run folder's baseline.onnx and compressed.onnx; BadInput when one is missing."""
    if not run.is_dir():
        raise BadInput(f"{run} is not a folder; give a run folder written by foldship build")
    files = {side: run / f"{side}.onnx" for side in SIDES}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise BadInput(f"{run} holds no {' or '.join(missing)}; give a run folder written by foldship build")
    return files


def bench_run(run: str | Path, name: str | None = None, batches: list[int] | None = None, threads: int = 0,
              min_seconds: float | None = None, trials: int | None = None, backends: list[str] | None = None,
              input_shape: tuple[int, ...] | None = None, progress: StageProgress | None = None) -> dict:
    """Time a run folder's baseline and compressed ONNX files on this machine (the bench JSON).

    Defaults: the batch sizes and ONNX Runtime options the run was validated with, one thread per
    physical core, every ONNX Runtime backend this machine has (the TensorRT provider when asked).
    """
    progress = progress or StageProgress(quiet=True)
    run = Path(run)
    files = run_onnx_files(run)
    report = load_run(run)
    recorded = report.get("latency_protocol", {})
    ort = OrtSettings(**recorded.get("onnxruntime", {})) if recorded.get("onnxruntime") else OrtSettings()
    if trials is not None and trials < 1:
        raise BadInput(f"--trials must be >= 1, got {trials}")
    protocol = LatencyProtocol(threads=threads, **({} if min_seconds is None else {"min_seconds": min_seconds}),
                               **({} if trials is None else {"trials": trials}))
    settings = ValidationSettings(list(batches or recorded.get("batches") or [1, 64]), protocol,
                                  dataclasses.replace(ort, spinning=False), backends).validate()
    other = [b for b in settings.backends or [] if b not in ORT_BACKENDS]
    if other:
        raise BadInput(f"a run folder's ONNX files run on ONNX Runtime backends ({', '.join(ORT_BACKENDS)}), "
                       f"not {', '.join(other)}")
    chosen = select_backends(settings.backends, onnx_backends())
    shapes = _input_shapes(report, files, input_shape)
    artifacts = [Artifact(side, "onnx", side, str(path)) for side, path in files.items()]
    timed = time_blocks([(a, backend) for backend in chosen for a in artifacts], shapes, settings, progress)
    latency = {backend: {side: {k: s.as_dict() for k, s in timed[side][backend].items()} for side in SIDES}
               for backend in chosen}
    machine = fingerprint()
    return {
        "format": BENCH_FORMAT,
        "target": name or platform.node() or "target",
        "run": {"title": run_title(report), "folder": run.name,
                "files": {side: {"file": path.name, "sha256": sha256_of(path), "size_bytes": path.stat().st_size}
                          for side, path in files.items()}},
        "machine": machine | {"hostname": platform.node(), "onnxruntime_providers": _providers()},
        "input_shape": list(shapes["baseline"]),
        "compressed_input_shape": list(shapes["compressed"]),  # smaller where the build shrank the input
        "batches": list(settings.batches),
        "latency": latency,
        **speedup_entries(measured_speedups({b: sides["baseline"] for b, sides in latency.items()},
                                            {b: sides["compressed"] for b, sides in latency.items()})),
        "latency_protocol": dataclasses.asdict(protocol) | {
            "threads": protocol.resolved_threads(), "onnxruntime": dataclasses.asdict(settings.ort),
            "providers": {b: ORT_BACKENDS[b][1] for b in chosen}, "order": INTERLEAVED_ORDER,
            "speedup": SPEEDUP_RULE},
    }


def _input_shapes(report: dict, files: dict[str, Path],
                  given: tuple[int, ...] | None) -> dict[str, tuple[int, ...]]:
    """Each side's input: ``given`` for both, else as the run recorded it, else the ONNX file's static shape."""
    recorded = {side: shape for side, (shape, _) in side_inputs(report).items()}
    if given is not None and recorded["baseline"] != recorded["compressed"]:
        raise BadInput(f"this run's engines take different inputs ({recorded['baseline']} and "
                       f"{recorded['compressed']}, recorded in its report); leave --input-shape out")
    return {side: tuple(given or recorded[side] or _static_input_shape(files[side])) for side in SIDES}


def _static_input_shape(path: Path) -> tuple[int, ...]:
    dims = onnx_session(str(path)).get_inputs()[0].shape[1:]
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise BadInput(f"{path} has a dynamic input shape beyond the batch axis and the run's report names none; "
                       f"give --input-shape (e.g. 3,224,224)")
    return tuple(dims)


def _providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def merge_latency(run: str | Path, bench_files: list[str | Path], out: str | Path,
                  limits: dict[str, float | None] | None = None, overwrite: bool = False) -> tuple[dict, str]:
    """A copy of the run's report with each bench file as a target entry, judged by the latency gates,
    written into the new folder ``out`` (report.json, report.md and the run's latency plot).

    ``limits`` ({"min_speedup": .., "max_p99_ms": ..}) override the limits the run was built with.
    Returns the report and the folder written.
    """
    run = Path(run)
    files = run_onnx_files(run)
    report = load_run(run)
    unknown = sorted(set(limits or {}) - set(LATENCY_GATES))
    if unknown:
        raise BadInput(f"{', '.join(unknown)} cannot judge a target's timings; latency gates: "
                       f"{', '.join(LATENCY_GATES)}")
    recorded = {g["name"]: g["limit"] for g in report["gates"]["results"] if g["name"] in LATENCY_GATES}
    chosen = recorded | {k: v for k, v in check_limits(dict(limits or {})).items() if v is not None}
    digests = {side: sha256_of(path) for side, path in files.items()}
    benches = [_read_bench(Path(path), digests) for path in bench_files]
    names = [bench["target"] for bench in benches]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BadInput(f"two --latency files name the target {repeated[0]!r}; give each machine its own "
                       f"foldship bench --name")
    targets = {}
    for path, bench in zip(bench_files, benches):
        targets[bench["target"]] = {
            "source": Path(path).name, "machine": bench["machine"], "input_shape": bench["input_shape"],
            "compressed_input_shape": bench.get("compressed_input_shape", bench["input_shape"]),
            "latency": bench["latency"], "speedup": bench["speedup"], "speedup_interval": bench["speedup_interval"],
            "latency_protocol": bench["latency_protocol"],
            "gates": _target_gates(bench, chosen),
        }
    # A run folder's own gates (build machine), then each target's; targets given now replace any earlier.
    results = [g for g in report["gates"]["results"] if "target" not in g] + [g for t in targets.values()
                                                                               for g in t["gates"]]
    report = report | {"targets": targets, "gates": {"passed": all(g["passed"] for g in results), "results": results},
                       "latency_sources": [str(p) for p in bench_files]}
    with RunFolder(out, overwrite) as folder:  # commits whole, or discards on any error or signal
        folder.write_json("report.json", report)
        folder.path("report.md").write_text(render_markdown(report))
        for name in CARRIED_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, folder.path(name))
    return report, str(folder.final)


def _read_bench(path: Path, digests: dict[str, str]) -> dict:
    """A bench file of this run's two ONNX files; BadInput for anything else."""
    if not path.is_file():
        raise BadInput(f"--latency {path} does not exist; write it with foldship bench RUN_DIR --json {path.name}")
    try:
        bench = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"--latency {path} is not valid JSON ({getattr(exc, 'msg', exc)}); write it with "
                       f"foldship bench RUN_DIR --json FILE") from None
    if not isinstance(bench, dict) or bench.get("format") != BENCH_FORMAT:
        raise BadInput(f"--latency {path} is not a run folder's bench file ({BENCH_FORMAT}); write it with "
                       f"foldship bench RUN_DIR --json FILE")
    for side in SIDES:
        timed = bench["run"]["files"][side]["sha256"]
        if timed != digests[side]:
            raise BadInput(f"--latency {path} timed another {side}.onnx (sha256 {timed[:12]}, this run's is "
                           f"{digests[side][:12]}); run foldship bench on this run folder")
    return bench


def _target_gates(bench: dict, limits: dict[str, float]) -> list[dict]:
    """The latency gates on each backend a target timed: speedup at its largest batch, compressed p99
    at its smallest (as on the build machine), each result naming the target and backend."""
    largest, smallest = f"batch{max(bench['batches'])}", f"batch{min(bench['batches'])}"
    results = []
    for backend, sides in bench["latency"].items():
        speedup = recorded_speedup(bench, backend, largest) if largest in bench["speedup"][backend] else None
        measured = {"speedup": speedup.judged if speedup else None,
                    "p99_ms": sides["compressed"].get(smallest, {}).get("p99_ms")}
        for result in evaluate_gates(measured, limits):
            results.append(result.as_dict() | {
                "measures": GATES[result.name].replace("ONNX Runtime CPU", f"{backend} on {bench['target']}"),
                "target": bench["target"], "backend": backend})
    return results
