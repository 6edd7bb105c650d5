"""The ``foldship`` command line. Each stage can run alone; ``build`` runs them all.

Exit codes: 0 success, 2 bad input (nothing written), 3 a validation gate failed (report written),
130 interrupted (nothing partial left behind).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import FoldshipError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Compress trained PyTorch models by folding or pruning channels, export them to ONNX "
                       "and validate accuracy and latency against the uncompressed baseline.")
# Wide enough for the summary table when output is piped (CI logs), as on a terminal.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
out = Console(width=None if sys.stdout.isatty() else 120)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run(fn) -> None:
    """Run a command body, turning foldship errors into one line and an exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        fn()
    except FoldshipError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted:[/] no partial output was kept")
        raise typer.Exit(130) from None


@app.command()
def build(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; CLI flags override its keys."),
    model: Optional[str] = typer.Option(None, help="cifar_resnet20..cifar_resnet110 or torchvision:<name>."),
    checkpoint: Optional[str] = typer.Option(None, help="Trained weights: .th/.pt/.pth state dict or .safetensors."),
    method: Optional[str] = typer.Option(None, help="fold (cluster and merge channels), prune-l1 or prune-l2."),
    ratio: Optional[float] = typer.Option(None, help="Fraction of channels removed per group, in (0, 1)."),
    groups: Optional[str] = typer.Option(None, help="all: every group (paper); inner: keep residual streams whole."),
    repair: Optional[str] = typer.Option(None, help="none (calibration-free), fold-ar (data-free variance correction) "
                                                   "or bn-recalibrate (needs --calibration-data)."),
    calibration_data: Optional[str] = typer.Option(None, help="Unlabelled images for bn-recalibrate; near-copies of "
                                                            "evaluation images are dropped."),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="Round kept widths down to a multiple (e.g. 8)."),
    data: Optional[str] = typer.Option(None, help="Labelled evaluation data: .npz (uint8 NHWC x, int y) or image folder."),
    limit: Optional[int] = typer.Option(None, help="Evaluate on the first N images only."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder to write (default runs/demo)."),
    seed: Optional[int] = typer.Option(None, help="Seed for clustering; same inputs and seed give the same bytes."),
    device: Optional[str] = typer.Option(None, help="Device for compression: cpu or cuda."),
    exporter: Optional[str] = typer.Option(None, help="ONNX exporter: dynamo (default) or legacy."),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="Gate: fail (exit 3) if top-1 drops by more (fraction)."),
    min_speedup: Optional[float] = typer.Option(None, help="Gate: fail (exit 3) if ONNX Runtime speedup at the largest batch is lower."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder (only once the new one is complete)."),
    trust_checkpoint: bool = typer.Option(False, help="Allow pickled objects in the checkpoint (runs its code!)."),
    quiet: bool = typer.Option(False, help="No progress bars or summary table."),
):
    """Load -> compress -> export baseline and compressed ONNX -> validate both -> write the run folder.

    With no arguments it builds the embedded default: the CIFAR-10 ResNet-20 checkpoint folded at
    ratio 0.3, evaluated on 1,000 real CIFAR-10 test images, into runs/demo.
    """
    def body():
        from .pipeline.build import build as run_build
        from .pipeline.config import load_config
        from .pipeline.progress import StageProgress

        cfg = load_config(config, model=model, checkpoint=checkpoint, method=method, ratio=ratio, groups=groups,
                          repair=repair, calibration_data=calibration_data, round_to=round_to, data=data, limit=limit, out=out, seed=seed, device=device,
                          exporter=exporter, max_accuracy_drop=max_accuracy_drop, min_speedup=min_speedup,
                          overwrite=overwrite or None, trust_checkpoint=trust_checkpoint or None)
        outcome = run_build(cfg, StageProgress(err, quiet=quiet))
        if not quiet:
            _print_summary(outcome.report, outcome.out)
        if not outcome.passed:
            failed = [g["name"] for g in outcome.report["gates"]["results"] if not g["passed"]]
            err.print(f"[bold red]gate failed:[/] {', '.join(failed)} (report in {outcome.out})")
            raise typer.Exit(3)

    _run(body)


@app.command()
def inspect(
    model: str = typer.Option("cifar_resnet20", help="Model name (see build --model)."),
    checkpoint: Optional[str] = typer.Option(None, help="Optional weights to load first."),
    num_classes: Optional[int] = typer.Option(None, help="Classifier width for torchvision models."),
    input_size: Optional[int] = typer.Option(None, help="Input height/width for the trace."),
):
    """List the coupled channel groups foldship finds (what fold and prune will compress)."""
    def body():
        from .compress.groups import channel_groups
        from .models.registry import load_model

        loaded = load_model(model, checkpoint, num_classes, input_size)
        table = Table(title=f"channel groups of {model}")
        for column in ("#", "group (root)", "kind", "channels", "coupled tensors"):
            table.add_column(column)
        for i, group in enumerate(channel_groups(loaded.model, loaded.example_inputs(2))):
            members = ", ".join(f"{name}:{axis}" for name, axis in group.members)
            table.add_row(str(i), group.name, group.kind, str(group.size), members)
        out.print(table)

    _run(body)


def _print_summary(report: dict, folder: str) -> None:
    from .pipeline.report import summary_rows

    table = Table(title=f"{report['model']['name']}: {report['method']} at ratio {report['ratio']} -> {folder}")
    for column, justify in (("metric", "left"), ("baseline", "right"), ("compressed", "right"), ("change", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for row in summary_rows(report):
        table.add_row(*row)
    out.print(table)
    out.print(f"top-1 agreement {100 * report['agreement']['top1_agreement']:.1f}%, speedup / MAC reduction "
              f"{report['speedup_vs_mac_ratio']:.2f}; residual streams {report['residual_streams']}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
