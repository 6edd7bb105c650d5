"""The ``foldship`` command line. Each stage can run alone; ``build`` runs them all.

Exit codes: 0 success, 2 bad input (nothing written), 3 a validation gate failed (report written),
130 interrupted (nothing partial left behind).
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import BadInput, FoldshipError
from .files import atomic_write
from .progress import StageProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Compress trained PyTorch models by folding or pruning channels, export them to ONNX "
                       "and validate accuracy and latency against the uncompressed baseline.")
# Wide enough for the summary table when output is piped (CI logs), as on a terminal.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out = Console(width=None if sys.stdout.isatty() else 120)
out_console = out  # for commands whose --out option shadows the name

GATE_OPTIONS = {  # shared by build and validate; each fails the run with exit 3
    "max_accuracy_drop": typer.Option(None, help="Gate: fail if top-1 drops by more than this fraction (0.02 = 2 pt)."),
    "min_agreement": typer.Option(None, help="Gate: fail if compressed and baseline agree on fewer top-1 (fraction)."),
    "min_speedup": typer.Option(None, help="Gate: fail if ONNX Runtime CPU p50 speedup at the largest batch is lower."),
    "max_p99_ms": typer.Option(None, help="Gate: fail if the compressed p99 on ONNX Runtime CPU at batch 1 is higher."),
    "max_size_mb": typer.Option(None, help="Gate: fail if the compressed ONNX file is larger (MB, 10^6 bytes)."),
}


TARGET_HELP = {
    "macs": "Budget: choose per-group widths so MACs are at most this fraction of the baseline (instead of "
            "--ratio; replaces a config file's ratio, other target and group_ratios).",
    "latency": "Budget: choose per-group widths so ONNX Runtime CPU latency (batch 16, this machine) is at most "
               "this fraction of the baseline's (instead of --ratio; replaces a config file's ratio, other "
               "target and group_ratios).",
}
DROP_BLOCKS_HELP = ("With --target-macs or --target-latency: meet it by removing whole residual blocks (x + f(x) "
                    "-> x), the least damaging per MAC first, every channel kept (a latency target is timed after "
                    "each removal past the MAC estimate); with few calibration images this keeps more accuracy than "
                    "narrowing channels on EfficientNet-Lite0 (docs/budget.md).")
COMPRESSED_INPUT_HELP = ("Give the compressed engine a smaller square input, e.g. 200 for a 224 px model: the same part of "
                         "each image (crop fraction kept), fewer MACs. Baseline timed and scored at its own input; "
                         "--target-macs/--target-latency stay fractions of it. Needs images resized on loading "
                         "(an image folder, not .npz) (docs/budget.md).")
RATIO_HELP = ("Fraction of channels removed per group, in (0, 1). Given here it replaces a config file's "
              "target_macs/target_latency; with --target-macs/--target-latency it is refused (exit 2).")
REPAIR_HELP = ("none (default); or steps joined by '+', in this order: fold-ar (data-free variance correction of "
               "merged clusters; the identity for pruning), reconstruct (each layer's weights re-solved in closed form "
               "so its outputs on --calibration-data match the uncompressed model's), bn-recalibrate (BN statistics "
               "re-measured on --calibration-data; only the change compression made is applied). "
               "E.g. reconstruct+bn-recalibrate.")
CALIBRATION_HELP = ("Unlabelled images for reconstruct, bn-recalibrate and --finetune distill (.npz or image "
                    "folder); near-copies of evaluation images are dropped.")
ROUND_TO_HELP = ("Kept widths a multiple of this, or auto: the kernel block of the target (ONNX Runtime CPU: 16 on "
                 "AVX-512, 8 on AVX2/ARM; TensorRT: 8). Default: auto with --target-macs/--target-latency, "
                 "--target tensorrt or a GPU backend, else 1 (raw widths).")
FINETUNE_HELP = {  # shared by build and sweep (docs/recovery.md)
    "finetune": "Recovery after compression: none (default) or distill (train the compressed model to match the "
                "uncompressed model's outputs on --calibration-data; no labels are read).",
    "epochs": "Distillation epochs over the calibration images (default 2); or --finetune-minutes, not both.",
    "minutes": "Distillation wall-clock budget in minutes instead of epochs (not byte-reproducible).",
    "lr": "Distillation learning rate: AdamW, warm-up then cosine decay (default 0.0005).",
    "batch": "Distillation batch size (default 64).",
    "images": "Calibration images distillation trains on (default: all left after dropping near-copies of the "
              "evaluation images).",
}
MODEL_HELP = ("cifar_resnet20..cifar_resnet110, torchvision:<name>, timm:<name>, hf:<id>; your own code as "
              "path/to/file.py:factory or package.module:factory (this imports and RUNS that code; model_args in the "
              "config go to the factory); exported:<program.pt2> (torch.export) or onnx:<model.onnx>. "
              "See docs/models.md.")
CHECKPOINT_MAP_HELP = ("How checkpoint names meet the model's: names (default) or by-order (i-th tensor to i-th, "
                       "every shape checked); a rename table goes in the config.")


# Packages of the full install that the timing-only install leaves out.
HEAVY_PACKAGES = ("torch", "torchvision", "torch_pruning", "onnx", "onnxscript", "onnxslim", "onnxsim",
                  "onnxconverter_common", "onnx_graphsurgeon", "polygraphy", "scipy", "safetensors", "yaml",
                  "matplotlib")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run(fn) -> None:
    """Run a command body, turning foldship errors into one line and an exit code."""
    from .pipeline.environment import keep_freed_memory

    signal.signal(signal.SIGTERM, _terminate)
    keep_freed_memory()  # forward passes reuse freed activations instead of page-faulting them in again
    try:
        fn()
    except FoldshipError as exc:
        # Escaped: messages hold literal brackets (pip install 'foldship[trt]') that rich would eat as markup.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted:[/] no partial output was kept")
        raise typer.Exit(130) from None
    except ModuleNotFoundError as exc:
        if exc.name not in HEAVY_PACKAGES:
            raise
        # The timing-only install (requirements-edge.lock) has no PyTorch: say which commands it runs.
        err.print(f"[bold red]error:[/] this command needs {exc.name}, which this environment lacks; the timing-only "
                  f"install runs foldship bench RUN_DIR and foldship validate RUN_DIR --latency (docs/edge.md), "
                  f"everything else needs requirements.lock", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _warn_if_trusted(cfg) -> None:
    """Say out loud that a trusted checkpoint is unpickled in full: any code inside it runs."""
    if cfg.trust_checkpoint and cfg.checkpoint and not str(cfg.checkpoint).endswith(".safetensors"):
        err.print(f"[bold yellow]warning:[/] --trust-checkpoint: {escape(str(cfg.checkpoint))} is loaded with full "
                  f"pickle, which runs any code inside it; use it only for files from a source you trust",
                  highlight=False, soft_wrap=True)


@app.command()
def build(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; CLI flags override its keys."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    checkpoint: Optional[str] = typer.Option(None, help="Trained weights: .th/.pt/.pth state dict or .safetensors "
                                                        "(needed except for cifar_resnet20/56, whose shared-data "
                                                        "files are the default, and exported:/onnx: models)."),
    random_weights: bool = typer.Option(False, help="Build without trained weights: a smoke test of the pipeline "
                                                    "only (the report says so; accuracy gates are refused)."),
    input_shape: Optional[str] = typer.Option(None, help="One sample's input shape, e.g. 3,32,32 (needed for a "
                                                         "model of your own code)."),
    method: Optional[str] = typer.Option(None, help="fold (cluster and merge channels), prune-l1 or prune-l2."),
    ratio: Optional[float] = typer.Option(None, help=RATIO_HELP),
    groups: Optional[str] = typer.Option(None, help="all: every group (paper); inner: keep residual streams whole."),
    repair: Optional[str] = typer.Option(None, help=REPAIR_HELP),
    calibration_data: Optional[str] = typer.Option(None, help=CALIBRATION_HELP),
    finetune: Optional[str] = typer.Option(None, help=FINETUNE_HELP["finetune"]),
    finetune_epochs: Optional[int] = typer.Option(None, help=FINETUNE_HELP["epochs"]),
    finetune_minutes: Optional[float] = typer.Option(None, help=FINETUNE_HELP["minutes"]),
    finetune_lr: Optional[float] = typer.Option(None, help=FINETUNE_HELP["lr"]),
    finetune_batch: Optional[int] = typer.Option(None, help=FINETUNE_HELP["batch"]),
    finetune_images: Optional[int] = typer.Option(None, help=FINETUNE_HELP["images"]),
    round_to: Optional[str] = typer.Option(None, "--round-to", help=ROUND_TO_HELP),
    target_macs: Optional[float] = typer.Option(None, help=TARGET_HELP["macs"]),
    target_latency: Optional[float] = typer.Option(None, help=TARGET_HELP["latency"]),
    drop_blocks: bool = typer.Option(False, help=DROP_BLOCKS_HELP),
    compressed_input_size: Optional[int] = typer.Option(None, help=COMPRESSED_INPUT_HELP),
    checkpoint_map: Optional[str] = typer.Option(None, help=CHECKPOINT_MAP_HELP),
    preprocess: Optional[str] = typer.Option(None, help="Preprocessing preset, e.g. inception-bicubic-224 "
                                                        "(default: the model family's)."),
    data: Optional[str] = typer.Option(None, help="Labelled evaluation data: .npz (uint8 NHWC x, int y) or image folder."),
    limit: Optional[int] = typer.Option(None, help="Evaluate on the first N images only."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder to write (default runs/demo)."),
    seed: Optional[int] = typer.Option(None, help="Seed for clustering; same inputs and seed give the same bytes."),
    device: Optional[str] = typer.Option(None, help="Where compression and distillation run: auto (default: the GPU "
                                                    "when there is one), cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for distillation, ONNX Runtime and timing "
                                                     "(default 0: every core)."),
    exporter: Optional[str] = typer.Option(None, help="ONNX exporter: dynamo (default) or legacy."),
    shrinker: Optional[str] = typer.Option(None, help="Graph shrinker: onnxslim (default), onnxsim or none."),
    precision: Optional[str] = typer.Option(None, help="fp32 (default) or fp16 (also writes <name>.fp16.onnx)."),
    target: Optional[str] = typer.Option(None, help="onnx (default) or tensorrt (also builds engines; needs "
                                                    "TensorRT and an NVIDIA GPU)."),
    batch: Optional[int] = typer.Option(None, help="The larger batch size timed besides batch 1 (default 64)."),
    max_accuracy_drop: Optional[float] = GATE_OPTIONS["max_accuracy_drop"],
    min_agreement: Optional[float] = GATE_OPTIONS["min_agreement"],
    min_speedup: Optional[float] = GATE_OPTIONS["min_speedup"],
    max_p99_ms: Optional[float] = GATE_OPTIONS["max_p99_ms"],
    max_size_mb: Optional[float] = GATE_OPTIONS["max_size_mb"],
    overwrite: bool = typer.Option(False, help="Replace an existing run folder (only once the new one is complete)."),
    trust_checkpoint: bool = typer.Option(False, help="Allow pickled objects in the checkpoint (runs its code!)."),
    quiet: bool = typer.Option(False, help="No progress bars or summary table."),
):
    """Load -> compress -> export baseline and compressed ONNX -> validate both -> write the run folder.

    With no arguments it builds the embedded default: the CIFAR-10 ResNet-20 checkpoint folded at
    ratio 0.3, evaluated on 1,000 real CIFAR-10 test images, into runs/demo. --model file.py:factory
    imports that file and runs its code; exported: and onnx: models load without running any.
    """
    def body():
        from .compress.widths import round_to_from_text
        from .pipeline.build import build as run_build
        from .pipeline.config import load_config

        cfg = load_config(config, model=model, checkpoint=checkpoint, method=method, ratio=ratio, groups=groups,
                          repair=repair, calibration_data=calibration_data, finetune=finetune,
                          finetune_epochs=finetune_epochs, finetune_minutes=finetune_minutes, finetune_lr=finetune_lr,
                          finetune_batch=finetune_batch, finetune_images=finetune_images,
                          round_to=round_to_from_text(round_to),
                          target_macs=target_macs, target_latency=target_latency, drop_blocks=drop_blocks or None,
                          compressed_input_size=compressed_input_size, checkpoint_map=checkpoint_map, preprocess=preprocess, data=data, limit=limit, out=out, seed=seed, device=device,
                          threads=threads,
                          exporter=exporter, shrinker=shrinker, precision=precision, target=target,
                          batches=None if batch is None else [1, batch], max_accuracy_drop=max_accuracy_drop,
                          min_agreement=min_agreement, min_speedup=min_speedup, max_p99_ms=max_p99_ms,
                          max_size_mb=max_size_mb, overwrite=overwrite or None,
                          trust_checkpoint=trust_checkpoint or None, random_weights=random_weights or None,
                          input_shape=_ints(input_shape, "--input-shape"))
        _warn_if_trusted(cfg)
        outcome = run_build(cfg, StageProgress(err, quiet=quiet))
        if not quiet:
            _print_summary(outcome.report, outcome.out)
        _exit_on_failed_gates(outcome.report, outcome.out)

    _run(body)


@app.command()
def sweep(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config: build's keys, where checkpoint, "
                                                                       "method, ratio, repair, finetune and the "
                                                                       "finetune_* keys may be lists."),
    model: Optional[str] = typer.Option(None, help="Model of checkpoints given without MODEL= (see build --model)."),
    checkpoint: Optional[list[str]] = typer.Option(None, help="[MODEL=]PATH: a checkpoint or a folder of them; "
                                                               "repeat for more."),
    max_accuracy_drop: Optional[float] = GATE_OPTIONS["max_accuracy_drop"],
    min_agreement: Optional[float] = GATE_OPTIONS["min_agreement"],
    min_speedup: Optional[float] = GATE_OPTIONS["min_speedup"],
    max_p99_ms: Optional[float] = GATE_OPTIONS["max_p99_ms"],
    max_size_mb: Optional[float] = GATE_OPTIONS["max_size_mb"],
    method: Optional[list[str]] = typer.Option(None, help="fold, prune-l1, prune-l2; repeat for more."),
    ratio: Optional[list[float]] = typer.Option(None, help="Fraction of channels removed, in (0, 1); repeat for more."),
    groups: Optional[str] = typer.Option(None, help="all: every group (paper); inner: keep residual streams whole."),
    round_to: Optional[str] = typer.Option(None, "--round-to", help=ROUND_TO_HELP),
    repair: Optional[list[str]] = typer.Option(None, help="A repair as in build --repair (e.g. none, fold-ar, "
                                                           "reconstruct+bn-recalibrate); repeat for more."),
    calibration_data: Optional[str] = typer.Option(None, help=CALIBRATION_HELP),
    finetune: Optional[list[str]] = typer.Option(None, help="Recovery: none, distill; repeat for more."),
    finetune_epochs: Optional[list[int]] = typer.Option(None, help="Distillation epochs; repeat for more."),
    finetune_minutes: Optional[list[float]] = typer.Option(None, help="Distillation minutes instead of epochs; "
                                                                      "repeat for more."),
    finetune_lr: Optional[list[float]] = typer.Option(None, help="Distillation learning rate; repeat for more."),
    finetune_batch: Optional[list[int]] = typer.Option(None, help="Distillation batch size; repeat for more."),
    finetune_images: Optional[list[int]] = typer.Option(None, help="Calibration images distillation trains on "
                                                                   "(default all); repeat for more."),
    data: Optional[str] = typer.Option(None, help="Labelled evaluation data: .npz (uint8 NHWC x, int y) or image folder."),
    limit: Optional[int] = typer.Option(None, help="Evaluate on the first N images only."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Sweep folder (default runs/sweep); a sweep "
                                                                "already there resumes."),
    seed: Optional[int] = typer.Option(None, help="Seed for clustering; same inputs and seed give the same numbers."),
    exporter: Optional[str] = typer.Option(None, help="ONNX exporter: dynamo (default) or legacy."),
    shrinker: Optional[str] = typer.Option(None, help="Graph shrinker: onnxslim (default), onnxsim or none."),
    batch: Optional[int] = typer.Option(None, help="The larger batch size timed besides batch 1 (default 64)."),
    threads: Optional[int] = typer.Option(None, help="Threads per job (default 1); local workers get that many cores each."),
    executor: Optional[str] = typer.Option(None, help="local (worker processes on this machine) or ray."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray instance)."),
    workers: Optional[int] = typer.Option(None, help="Local parallel jobs (default: usable cores / threads)."),
    select: bool = typer.Option(False, help="Build the job that passes every gate with the lowest latency (or size) "
                                            "into <out>/selected; by latency, without --min-speedup, a job measurably "
                                            "slower than its baseline is never chosen."),
    select_by: Optional[str] = typer.Option(None, help="What --select minimises: latency (default) or size."),
    overwrite: bool = typer.Option(False, help="Drop the rows stored in --out and start the sweep again."),
    trust_checkpoint: bool = typer.Option(False, help="Allow pickled objects in the checkpoints (runs their code!)."),
    quiet: bool = typer.Option(False, help="No progress bars or summary."),
):
    """Compress, export and validate every checkpoint x method x ratio x repair x recovery, as foldship build does
    each one.

    Rows go to <out>/results.jsonl as jobs finish; a restarted sweep skips the jobs done. Writes the
    paired fold - prune table (sweep.md), accuracy_vs_ratio.png and pareto.png.
    """
    def body():
        from .compress.widths import round_to_from_text
        from .errors import GateFailed
        from .sweep import load_sweep_config, run_sweep

        cfg = load_sweep_config(config, model=model, checkpoint=checkpoint or None, method=method or None,
                                ratio=ratio or None, groups=groups, round_to=round_to_from_text(round_to),
                                repair=repair or None,
                                finetune=finetune or None, finetune_epochs=finetune_epochs or None,
                                finetune_minutes=finetune_minutes or None, finetune_lr=finetune_lr or None,
                                finetune_batch=finetune_batch or None, finetune_images=finetune_images or None,
                                calibration_data=calibration_data, data=data, limit=limit, out=out, seed=seed,
                                exporter=exporter, shrinker=shrinker, batches=None if batch is None else [1, batch],
                                threads=threads, executor=executor, address=address, workers=workers,
                                select=select or None, select_by=select_by, max_accuracy_drop=max_accuracy_drop,
                                min_agreement=min_agreement, min_speedup=min_speedup, max_p99_ms=max_p99_ms,
                                max_size_mb=max_size_mb, overwrite=overwrite or None,
                                trust_checkpoint=trust_checkpoint or None)
        _warn_if_trusted(cfg.base)
        outcome = run_sweep(cfg, StageProgress(err, quiet=quiet))
        if not quiet:
            cost = outcome.summary["cost"]
            out_console.print(f"{len(outcome.rows)} jobs ({outcome.summary['ran_now']} run now, "
                              f"{cost['job_seconds_mean']:.1f} s per job) -> {outcome.out}/sweep.md")
        if outcome.selection is not None:
            if outcome.selection.outcome is None:
                raise GateFailed(f"{outcome.selection.reason}; nothing selected (rows in {outcome.out})")
            if not quiet:
                _print_summary(outcome.selection.outcome.report, outcome.selection.outcome.out)
            _exit_on_failed_gates(outcome.selection.outcome.report, outcome.selection.outcome.out)

    _run(body)


@app.command()
def validate(
    artifacts: list[Path] = typer.Argument(..., help="A run folder; or baseline.onnx compressed.onnx; or several "
                                                     "run folders to compare (accuracy vs size, nothing re-run)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; CLI flags override its keys."),
    data: Optional[str] = typer.Option(None, help="Labelled images (default: the run's data, else CIFAR-10 test)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate on the first N images only."),
    mean: Optional[str] = typer.Option(None, help="Normalisation mean for two ONNX files, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, help="Normalisation std for two ONNX files, e.g. 0.229,0.224,0.225."),
    out: str = typer.Option("runs/validate", "--out", "-o", help="Folder to write (default runs/validate)."),
    batch: Optional[int] = typer.Option(None, help="The larger batch size timed besides batch 1 (default 64)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads for ONNX Runtime and PyTorch (0: all cores)."),
    trials: Optional[int] = typer.Option(None, help="Blocks per model, the models taking turns (A B, B A, ...; default "
                                                    "6); 3 or more give the speedup an interval."),
    min_seconds: Optional[float] = typer.Option(None, help="Minimum time per latency measurement (default 1 s)."),
    backend: Optional[list[str]] = typer.Option(None, help="Backend(s) to use (default: every one available)."),
    max_accuracy_drop: Optional[float] = GATE_OPTIONS["max_accuracy_drop"],
    min_agreement: Optional[float] = GATE_OPTIONS["min_agreement"],
    min_speedup: Optional[float] = GATE_OPTIONS["min_speedup"],
    max_p99_ms: Optional[float] = GATE_OPTIONS["max_p99_ms"],
    max_size_mb: Optional[float] = GATE_OPTIONS["max_size_mb"],
    latency: Optional[list[Path]] = typer.Option(None, "--latency", help="JSON written by `foldship bench RUN_DIR "
                                                 "--json FILE` on a target machine (more may follow): merged into "
                                                 "the run's report, one entry per target, and judged by "
                                                 "--min-speedup/--max-p99-ms (default: the run's own limits); "
                                                 "nothing is re-measured."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder (only once the new one is complete)."),
    quiet: bool = typer.Option(False, help="No progress bars or summary table."),
):
    """Run the validation stage alone: accuracy, parity, agreement, latency and gates of a baseline and a
    compressed model, written as report.json, report.md and latency.png.

    With --latency, merge timings taken on target machines into a copy of a run folder's report instead.
    """
    def body():
        if latency:
            measuring = {"--config": config, "--data": data, "--limit": limit, "--mean": mean, "--std": std,
                         "--batch": batch, "--threads": threads, "--trials": trials, "--min-seconds": min_seconds,
                         "--backend": backend or None, "--max-accuracy-drop": max_accuracy_drop,
                         "--min-agreement": min_agreement, "--max-size-mb": max_size_mb}
            given = [flag for flag, value in measuring.items() if value is not None]
            if given:
                raise BadInput(f"--latency merges timings taken elsewhere, so {', '.join(given)} have nothing to "
                               f"act on; validate without --latency to re-measure here")
            # `--latency a.json b.json` leaves b.json among the arguments: an option takes one value each.
            run_dir, *more = artifacts
            if not run_dir.is_dir() or any(p.suffix != ".json" for p in more):
                raise BadInput("--latency merges into one run folder: give foldship validate RUN_DIR --latency "
                               "FILE.json [FILE.json ...]")
            from .pipeline.targets import merge_latency

            report, folder = merge_latency(run_dir, [*latency, *more], out, {"min_speedup": min_speedup,
                                                                            "max_p99_ms": max_p99_ms}, overwrite)
            if not quiet:
                _print_targets(report, folder)
            _exit_on_failed_gates(report, folder)
            return
        from .pipeline.config import load_config
        from .pipeline.validate import is_sweep, sweep, validate_artifacts

        if is_sweep(artifacts):
            result = sweep(artifacts, out, overwrite)
            if not quiet:
                out_console.print(f"compared {len(result['runs'])} runs -> {out}/sweep.md, {out}/accuracy_vs_size.png")
            return
        cfg = load_config(config, limit=limit, out=out, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                          batches=None if batch is None else [1, batch], threads=threads, latency_trials=trials,
                          latency_min_seconds=min_seconds, backends=backend or None,
                          max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, min_speedup=min_speedup,
                          max_p99_ms=max_p99_ms, max_size_mb=max_size_mb, overwrite=overwrite or None)
        outcome = validate_artifacts(artifacts, cfg, data, StageProgress(err, quiet=quiet))
        if not quiet:
            _print_summary(outcome.report, outcome.out)
        _exit_on_failed_gates(outcome.report, outcome.out)

    _run(body)


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="A run folder (its baseline.onnx and compressed.onnx, timed against "
                                              "each other on this machine), an .onnx file or a TensorRT "
                                              ".engine/.plan."),
    batch: Optional[int] = typer.Option(None, help="The larger batch size timed besides batch 1 (default 64; run "
                                                   "folder: the batches it was validated with)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads for ONNX Runtime (0: all cores)."),
    trials: Optional[int] = typer.Option(None, help="Blocks per model, backend and batch (default 6), the models "
                                                    "taking turns block by block; samples pool, each block keeps "
                                                    "its p50."),
    min_seconds: Optional[float] = typer.Option(None, help="Minimum time per measurement (default 1 s)."),
    backend: Optional[list[str]] = typer.Option(None, help="Backend(s) to use (default: every one that can run it; "
                                                           "onnxruntime-tensorrt only when named)."),
    input_shape: Optional[str] = typer.Option(None, help="Input shape without the batch axis, e.g. 3,224,224 "
                                                         "(default: the run's or the ONNX file's)."),
    name: Optional[str] = typer.Option(None, help="Run folder: the target's name in the JSON and in the merged "
                                                  "report (default: this machine's host name)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here (a run "
                                                                 "folder's merges with validate --latency)."),
    quiet: bool = typer.Option(False, help="No progress bar or table."),
):
    """Time one artifact with the latency protocol: p50/p90/p99, throughput and peak memory per backend and batch.

    On a run folder: time its baseline and compressed ONNX files against each other on this machine (the
    target), taking turns block by block as the build does, and describe the machine; `foldship validate RUN_DIR --latency FILE`
    merges the --json file into the run's report. This needs only onnxruntime, numpy and the CLI's own
    packages, no PyTorch (docs/edge.md).
    """
    def body():
        if json_out is not None and not json_out.parent.is_dir():
            raise BadInput(f"--json {json_out}: folder {json_out.parent} does not exist; create it or choose "
                           f"another path")
        shape = _floats(input_shape, "--input-shape")
        shape = tuple(int(v) for v in shape) if shape else None
        if artifact.is_dir():
            from .pipeline.targets import bench_run

            result = bench_run(artifact, name, None if batch is None else [1, batch], threads or 0, min_seconds,
                               trials, backend or None, shape, StageProgress(err, quiet=quiet))
            if json_out is not None:
                atomic_write(json_out, json.dumps(result, indent=2) + "\n")
            if not quiet:
                _print_bench_run(result, json_out)
            return
        from .pipeline.config import load_config
        from .pipeline.validate import bench as run_bench

        cfg = load_config(None, batches=None if batch is None else [1, batch], threads=threads, latency_trials=trials,
                          latency_min_seconds=min_seconds, backends=backend or None)
        result = run_bench(artifact, cfg, shape, StageProgress(err, quiet=quiet))
        if json_out is not None:
            atomic_write(json_out, json.dumps(result, indent=2) + "\n")
        if not quiet:
            table = Table(title=f"{artifact} ({result['precision']}, {result['size_bytes'] / 1024:.0f} KiB)")
            for column in ("backend", "batch", "runs", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "peak MB"):
                table.add_column(column, justify="left" if column == "backend" else "right", no_wrap=True)
            for backend_name, batches in result["latency"].items():
                for key, s in batches.items():
                    table.add_row(backend_name, str(s["batch"]), str(s["runs"]), f"{s['p50_ms']:.2f}",
                                  f"{s['p90_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['throughput_per_s']:,.0f}", str(s["peak_memory_mb"]))
            out.print(table)

    _run(body)


@app.command()
def export(
    run: Optional[Path] = typer.Option(None, "--run", help="A run folder from foldship build: re-export its "
                                                           "baseline.onnx and compressed.onnx."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; CLI flags override its keys."),
    model: Optional[str] = typer.Option(None, help="Model to export when no --run is given (see build --model)."),
    checkpoint: Optional[str] = typer.Option(None, help="Trained weights for --model."),
    data: Optional[str] = typer.Option(None, help="Real images for the checks (default: the CIFAR-10 test images)."),
    limit: Optional[int] = typer.Option(None, help="Check on the first N images only."),
    out: str = typer.Option("runs/export", "--out", "-o", help="Folder to write (default runs/export)."),
    exporter: Optional[str] = typer.Option(None, help="ONNX exporter: dynamo (default) or legacy."),
    shrinker: Optional[str] = typer.Option(None, help="Graph shrinker: onnxslim (default), onnxsim or none."),
    precision: Optional[str] = typer.Option(None, help="fp32 (default) or fp16 (also writes <name>.fp16.onnx)."),
    target: Optional[str] = typer.Option(None, help="onnx (default) or tensorrt (also builds engines)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder (only once the new one is complete)."),
    trust_checkpoint: bool = typer.Option(False, help="Allow pickled objects in the checkpoint (runs its code!)."),
    quiet: bool = typer.Option(False, help="No progress bars or summary table."),
):
    """Run the export stage alone: fuse -> ONNX -> shrink -> FP16 -> TensorRT, every step verified."""
    def body():
        from .errors import BadInput
        from .pipeline.config import load_config
        from .pipeline.export import export as run_export

        if run is not None and (model or checkpoint):
            raise BadInput("give either --run (a run folder) or --model/--checkpoint, not both")
        cfg = load_config(config, model=model, checkpoint=checkpoint, data=data, limit=limit, out=out,
                          exporter=exporter, shrinker=shrinker, precision=precision, target=target,
                          overwrite=overwrite or None, trust_checkpoint=trust_checkpoint or None)
        _warn_if_trusted(cfg)
        outcome = run_export(cfg, run, StageProgress(err, quiet=quiet))
        if not quiet:
            _print_export_summary(outcome.report, outcome.out)
        _exit_on_failed_gates(outcome.report, outcome.out)

    _run(body)


@app.command()
def compress(
    model: str = typer.Option(..., help="Model name: cifar_resnet20..110, torchvision:<name>, timm:<name> or hf:<id>."),
    checkpoint: Optional[str] = typer.Option(None, help="Trained weights (.th/.pt/.pth state dict or .safetensors)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for compressed.json (widths) + compressed.safetensors."),
    method: str = typer.Option("fold", help="fold, prune-l1 or prune-l2."),
    ratio: Optional[float] = typer.Option(None, help="Fraction of channels removed per group, in (0, 1) "
                                                     "(default 0.3); not with --target-macs/--target-latency."),
    groups: str = typer.Option("all", help="all: every group (paper); inner: keep residual streams whole."),
    repair: str = typer.Option("none", help=REPAIR_HELP),
    calibration_data: Optional[str] = typer.Option(None, help="Unlabelled images for reconstruct, bn-recalibrate and "
                                                            "the budget survey; near-copies of the --data images are "
                                                            "dropped."),
    data: Optional[str] = typer.Option(None, help="The evaluation images the model will be judged on, kept out of "
                                                  "the calibration images (default: build's default data, the "
                                                  "1,000 CIFAR-10 test images); read only with --calibration-data."),
    round_to: Optional[str] = typer.Option(None, "--round-to", help=ROUND_TO_HELP),
    target_macs: Optional[float] = typer.Option(None, help=TARGET_HELP["macs"]),
    target_latency: Optional[float] = typer.Option(None, help=TARGET_HELP["latency"]),
    drop_blocks: bool = typer.Option(False, help=DROP_BLOCKS_HELP),
    checkpoint_map: Optional[str] = typer.Option(None, help=CHECKPOINT_MAP_HELP),
    seed: int = typer.Option(0, help="Clustering seed."),
    device: str = typer.Option("auto", help="Where compression runs: auto (the GPU when there is one), cpu or cuda."),
    num_classes: Optional[int] = typer.Option(None, help="Classifier width for torchvision models."),
    input_size: Optional[int] = typer.Option(None, help="Input height/width for the trace."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Run the compression stage alone: write the compressed model as a width spec plus safetensors.

    Reload it with foldship.load_compressed(OUT), or export and validate it with `foldship export`.
    """
    def body():
        import json

        from .compress import compress_model
        from .compress.widths import round_to_from_text, width_rule
        from .data import calibration_images, load_images
        from .models import load_model
        from .compress.budget import check_drop_blocks
        from .pipeline.config import BuildConfig, refuse_ratio_with_target
        from .models.saved import SPEC_NAME, save_compressed
        from .pipeline.budget import plan_budget
        from .pipeline.run_folder import RunFolder

        refuse_ratio_with_target({"ratio": ratio, "target_macs": target_macs, "target_latency": target_latency})
        check_drop_blocks(drop_blocks, target_macs, target_latency)
        uniform = 0.3 if ratio is None else ratio
        with RunFolder(out, overwrite) as folder:  # commits whole, or discards on any error or signal
            loaded = load_model(model, checkpoint, num_classes, input_size, checkpoint_map=checkpoint_map)
            chosen = None
            if calibration_data:  # kept apart from the images the model will be judged on, as in build
                evaluation = load_images(data or BuildConfig.data, loaded.preprocessing, require_labels=False)
                chosen = calibration_images(calibration_data, loaded.preprocessing, evaluation)
            calibration = None if chosen is None else chosen.x
            example = loaded.example_inputs(2)
            widths = width_rule(round_to_from_text(round_to),
                                budget=target_macs is not None or target_latency is not None)
            budget = plan_budget(loaded.model, example, method, target_macs, target_latency, widths.round_to, groups,
                                 calibration=calibration, seed=seed, repair=repair, drop_blocks=drop_blocks)
            result = compress_model(loaded.model, example, method, uniform, seed, groups,
                                    budget.group_ratios() if budget else None, round_to=widths.round_to,
                                    repair=repair, calibration=calibration, device=device,
                                    removed_blocks=budget.block_names() if budget else ())
            summary = result.summary() | {"budget": budget.summary() if budget else None,
                                          "width_rule": widths.as_dict(),
                                          "calibration": None if chosen is None else chosen.summary()}
            save_compressed(result.model.cpu(), loaded, folder.path(SPEC_NAME), summary, result.removed_blocks)
            folder.path("compression.json").write_text(json.dumps(summary, indent=2) + "\n")
        done = sum(g.action in ("folded", "pruned") for g in result.groups)
        out_console = Console()
        setting = f"{budget.mac_fraction:.3f}x MACs (budget)" if budget else f"ratio {uniform}"
        removed = f"{len(result.removed_blocks)} residual block(s) removed, " if result.removed_blocks else ""
        label = "block removal" if result.removed_blocks else method
        out_console.print(f"{label} at {setting}: {removed}{done} of {len(result.groups)} groups compressed in "
                          f"{result.seconds:.2f} s; residual streams {result.residual_streams} -> {folder.final}")
        if chosen is not None:
            out_console.print(f"calibration: {len(chosen)} of {chosen.read} images ({chosen.near_copies} near-copies "
                              f"of the {chosen.evaluation} images dropped)")

    _run(body)


@app.command()
def inspect(
    model: str = typer.Option("cifar_resnet20", help="Model name (see build --model)."),
    checkpoint: Optional[str] = typer.Option(None, help="Optional weights to load first."),
    num_classes: Optional[int] = typer.Option(None, help="Classifier width for torchvision models."),
    input_size: Optional[int] = typer.Option(None, help="Input height/width for the trace."),
    checkpoint_map: Optional[str] = typer.Option(None, help=CHECKPOINT_MAP_HELP),
):
    """List the coupled channel groups foldship finds (what fold and prune will compress) and the residual
    blocks a --drop-blocks budget can remove."""
    def body():
        from .compress.groups import channel_groups
        from .models.blocks import removable_blocks
        from .models.registry import load_model

        loaded = load_model(model, checkpoint, num_classes, input_size, checkpoint_map=checkpoint_map)
        table = Table(title=f"channel groups of {model}")
        for column in ("#", "group (root)", "kind", "channels", "foldable", "coupled tensors"):
            table.add_column(column)
        groups = channel_groups(loaded.model, loaded.example_inputs(2))
        for i, group in enumerate(groups):
            members = ", ".join(f"{name}:{axis}" for name, axis in group.members)
            table.add_row(str(i), group.name, group.kind, str(group.size), group.foldable, members)
        out.print(table)
        kept = [g for g in groups if g.foldable != "yes"]
        out.print(f"{len(groups)} groups; {len(groups) - len(kept)} foldable"
                  + (f"; {len(kept)} stay whole under fold and prune alike (see 'foldable')" if kept else ""))
        blocks = removable_blocks(loaded.model, loaded.example_inputs(2))
        out.print(f"{len(blocks)} residual blocks --drop-blocks can remove" + (f": {', '.join(blocks)}" if blocks else ""))

    _run(body)


def _print_summary(report: dict, folder: str) -> None:
    from .pipeline.report import run_title, summary_rows, validated_sentence

    table = Table(title=f"{run_title(report)} -> {folder}")
    for column, justify in (("metric", "left"), ("baseline", "right"), ("compressed", "right"), ("change", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for row in summary_rows(report):
        table.add_row(*row)
    out.print(table)
    out.print(f"top-1 agreement {100 * report['agreement']['top1_agreement']:.1f}%"
              + (f"; residual streams {report['residual_streams']}" if "residual_streams" in report else ""))
    speed = report.get("speed")
    if speed:  # what the compression bought on the shipped runtime, a slowdown named as one
        out.print(f"speed on ONNX Runtime CPU: {speed['sentence']}", highlight=False, soft_wrap=True)
    latency_goal = validated_sentence((report.get("compression") or {}).get("budget"))
    if latency_goal:
        out.print(latency_goal, highlight=False, soft_wrap=True)


def _print_bench_run(result: dict, json_out: Path | None) -> None:
    from .validators.speed import change_text, recorded_speedup

    machine = result["machine"]
    table = Table(title=f"{result['run']['title']} on {result['target']} ({machine['cpu']}, "
                        f"{machine['physical_cores']} cores)" + (f" -> {json_out}" if json_out else ""))
    for column in ("backend", "batch", "runs", "baseline p50 ms", "compressed p50 ms", "compressed p99 ms", "speed"):
        table.add_column(column, justify="left" if column == "backend" else "right", no_wrap=True)
    for backend, sides in result["latency"].items():
        for key, base in sides["baseline"].items():
            comp = sides["compressed"][key]
            table.add_row(backend, str(base["batch"]), str(base["runs"]), f"{base['p50_ms']:.3f}",
                          f"{comp['p50_ms']:.3f}", f"{comp['p99_ms']:.3f}",
                          change_text(recorded_speedup(result, backend, key)))
    out.print(table)


def _print_targets(report: dict, folder: str) -> None:
    from .pipeline.report import run_title
    from .validators.speed import change_text, recorded_speedup

    table = Table(title=f"{run_title(report)}: latency on targets -> {folder}")
    for column in ("target", "backend", "batch", "baseline p50 ms", "compressed p50 ms", "speed"):
        table.add_column(column, justify="left" if column in ("target", "backend") else "right", no_wrap=True)
    for target, entry in report["targets"].items():
        for backend, sides in entry["latency"].items():
            for key, base in sides["baseline"].items():
                table.add_row(target, backend, str(base["batch"]), f"{base['p50_ms']:.3f}",
                              f"{sides['compressed'][key]['p50_ms']:.3f}",
                              change_text(recorded_speedup(entry, backend, key)))
    out.print(table)


def _exit_on_failed_gates(report: dict, folder: str) -> None:
    failed = [g["name"] + (f" ({g['target']}, {g['backend']})" if g.get("target") else "")
              for g in report["gates"]["results"] if not g["passed"]]
    if failed:
        err.print(f"[bold red]gate failed:[/] {', '.join(failed)} (report in {folder})")
        raise typer.Exit(3)


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BadInput(f"{flag} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


def _ints(text: str | None, flag: str) -> list[int] | None:
    values = _floats(text, flag)
    if values is not None and not all(v == int(v) for v in values):
        raise BadInput(f"{flag} takes comma-separated whole numbers, e.g. 3,32,32; got {text!r}")
    return None if values is None else [int(v) for v in values]


def _print_export_summary(report: dict, folder: str) -> None:
    section = report["export"]
    table = Table(title=f"export ({section['exporter']}, {section['shrinker']}, {section['precision']}, "
                        f"{section['target']}) -> {folder}")
    for column in ("model", "nodes", "size", "fp16 top-1 agreement", "engine"):
        table.add_column(column, no_wrap=True)
    for name, entry in section["models"].items():
        fp16, engine = entry["fp16"], entry["engine"]
        table.add_row(name, f"{entry['shrink']['nodes_before']} -> {entry['shrink']['nodes_after']}",
                      f"{entry['onnx']['size_bytes'] / 1024:.0f} KiB",
                      f"{100 * fp16['top1_agreement']:.1f}%" if fp16 else "-", engine["path"] if engine else "-")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
