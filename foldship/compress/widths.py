"""The width rule shared by folding and pruning, so both give identical architectures, and the
channel multiple (``round_to``) that makes those widths pay off on the kernels the model ships to.

Why multiples: ONNX Runtime's CPU convolutions (MLAS) compute in channel blocks ("NCHWc") of 16
floats on a CPU with AVX-512F and of 8 otherwise on x86-64 (``NchwcBlockSize`` in MLAS's
platform.cpp). A convolution's output channels are padded up to the block; one whose input
channels (>= the block) are not a multiple of it, or a depthwise one whose channels are not, is
left out of NCHWc and runs the slower NCHW path between reorders (ORT's NCHWc transformer). So a
width between blocks buys nothing or costs time. FP16 tensor cores (TensorRT, cuDNN) want channel
multiples of 8. docs/speed.md has the measurements (benchmarks/conv_widths.py).

The width ledger checks every compressed tensor has the width its group records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import BadInput, FoldshipError
from ..models.cifar_resnet import PadShortcut

AUTO = "auto"
GPU_MULTIPLE = 8  # FP16 tensor cores take channel counts in multiples of 8 (TF32 in 4s: 8 serves both)


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or refuse a value outside (0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise BadInput(f"ratio {ratio!r} is not a number; pass a fraction of channels to remove, e.g. --ratio 0.3") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise BadInput(f"ratio {value} is outside (0, 1); it is the fraction of channels to remove, e.g. --ratio 0.3")
    return value


def check_round_to(round_to: int | str | None) -> None:
    """Refuse an alignment that is not a whole number >= 1 or "auto" (None: the default, see ``width_rule``)."""
    if round_to is None or round_to == AUTO:
        return
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise BadInput(f"round_to must be a whole number >= 1, got {round_to!r}; e.g. --round-to 8, or --round-to auto")


def round_to_from_text(text: str | None) -> int | str | None:
    """--round-to as typed: a whole number, or auto (anything else is left for check_round_to to refuse)."""
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


@dataclass(frozen=True)
class WidthRule:
    """The channel multiple every compressed width keeps (or the group stays whole), and why."""

    round_to: int
    rule: str  # how it was chosen, for the report
    requested: int | str | None = None  # what the user asked for (None: nothing)

    def as_dict(self) -> dict:
        return {"round_to": self.round_to, "rule": self.rule, "requested": self.requested}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of this CPU, from /proc/cpuinfo text (read when not given; none
    where there is no such file). x86 lists them under ``flags``, ARM under ``Features``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def ort_cpu_block(flags: set[str]) -> tuple[int, str]:
    """ONNX Runtime's CPU channel block for a CPU with ``flags``, and the reason: 16 with AVX-512F
    (MLAS's NCHWc block), else 8 (AVX2's NCHWc block; on ARM, NEON GEMM columns, no NCHWc)."""
    if "avx512f" in flags:
        return 16, "ONNX Runtime CPU, AVX-512: NCHWc block of 16 channels"
    if "avx2" in flags:
        return 8, "ONNX Runtime CPU, AVX2: NCHWc block of 8 channels"
    if "asimd" in flags or "neon" in flags:
        return 8, "ONNX Runtime CPU, ARM NEON: multiples of 8 (no NCHWc on ARM)"
    return 8, "ONNX Runtime CPU, no AVX-512/AVX2/NEON flag found: multiples of 8"


def width_rule(round_to: int | str | None = None, *, budget: bool = False, target: str = "onnx",
               gpu_backends: bool = False, cpuinfo: str | None = None) -> WidthRule:
    """The channel multiple a build uses: the one place that decides the default.

    An explicit whole number is used as given (1: raw widths). ``"auto"`` picks it from where the
    model ships: 8 for ``target`` tensorrt (FP16 tensor cores), else the ONNX Runtime CPU block of
    this CPU (16 on AVX-512, 8 on AVX2 or NEON; a GPU backend beside it is served too, as both are
    multiples of 8). None means "auto" whenever a budget target, TensorRT or a GPU backend is
    involved, and 1 for a plain ratio (the papers' widths). ``cpuinfo`` replaces /proc/cpuinfo.
    """
    check_round_to(round_to)
    if isinstance(round_to, int):
        return WidthRule(round_to, "as given" if round_to > 1 else "as given: raw widths", round_to)
    involved = [reason for reason, present in (("a budget target", budget), ("target tensorrt", target == "tensorrt"),
                                                ("a GPU backend", gpu_backends)) if present]
    if round_to is None and not involved:
        return WidthRule(1, "default for a plain ratio: raw widths (round_to auto aligns them to the kernels)")
    if target == "tensorrt":
        multiple, why = GPU_MULTIPLE, "TensorRT: FP16 tensor cores take multiples of 8 channels"
    else:
        multiple, why = ort_cpu_block(cpu_flags(cpuinfo))
    how = "auto" if round_to == AUTO else f"auto (default with {' and '.join(involved)})"
    return WidthRule(multiple, f"{how}: {why}", round_to)


def kept_width(n: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept in a group of ``n`` at compression ratio ``ratio``.

    ``k = max(int(n * (1 - ratio)), 1)`` in float64, as in the papers (so int(64 * 0.7) = 44 and
    1 - 0.9 = 0.0999... gives 6 of 64). ``round_to`` > 1 rounds k down to a multiple of it, never
    below one multiple: a product option for kernel-friendly widths, never used when reproducing
    paper numbers. A group no wider than ``round_to`` stays whole, since any narrower width would be
    padded back to the multiple by the runtime and save nothing, and so does a group the ratio
    leaves whole (ratio 0), whatever its width.
    """
    k = max(int(n * (1.0 - ratio)), 1)
    if k >= n or (round_to > 1 and n <= round_to):
        return n
    if round_to > 1:
        k = max((k // round_to) * round_to, round_to)
    return k


def ratio_for_width(n: int, width: int) -> float:
    """The ratio at which ``kept_width`` gives exactly ``width`` of ``n`` channels (0 keeps the group whole).

    int(n * (1 - r)) with r = (n - width - 0.5) / n is width + 0.5 floored: exact despite float rounding.
    """
    return (n - width - 0.5) / n if width < n else 0.0


class WidthMismatch(FoldshipError):
    """Internal error: a compressed tensor's real width differs from the width its group records.
    Never raised on a correct engine; it stops a build instead of shipping a width nobody recorded."""


def axis_width(holder, axis: str, dim: int = 0) -> int | None:
    """How many indices ``holder`` (a module or an unwrapped parameter) really has along a group
    item's axis; None for holders without channel tensors (e.g. LayerNorm, which groups keep whole)."""
    if isinstance(holder, nn.Parameter):
        return holder.shape[dim]
    if isinstance(holder, PadShortcut):
        return len(holder.gather_index) if axis == "out" else holder.in_channels
    if isinstance(holder, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return holder.weight.shape[0] if axis == "out" else holder.weight.shape[1] * getattr(holder, "groups", 1)
    if isinstance(holder, nn.modules.batchnorm._BatchNorm):
        return len(holder.running_mean if holder.running_mean is not None else holder.weight)
    return None


class WidthLedger:
    """Every coupled tensor's width as the group records say it must be, checked against the model.

    For each group, ``register`` before its edit (a tensor's width when a group first touches it)
    and ``narrow`` after, by the channels the group records as removed; ``check`` then compares
    every registered tensor with the compressed model.
    """

    def __init__(self):
        self.expected: dict[tuple[str, str], tuple[int, int]] = {}  # (holder name, axis) -> (width, dim)

    def register(self, items) -> None:
        for item in items:
            width = axis_width(item.module, item.axis, item.dim)
            if width is not None:
                self.expected.setdefault((item.name, item.axis), (width, item.dim))

    def narrow(self, items, removed: int) -> None:
        for key, item in {(item.name, item.axis): item for item in reversed(items)}.items():
            if key in self.expected and removed:
                width, dim = self.expected[key]
                self.expected[key] = (width - removed * item.table.shape[1], dim)

    def check(self, model) -> None:
        holders = dict(model.named_modules()) | dict(model.named_parameters())
        wrong = []
        for (name, axis), (width, dim) in self.expected.items():
            real = axis_width(holders[name], axis, dim) if name in holders else None
            if real != width:
                wrong.append(f"{name} ({axis}) is {real} wide, recorded {width}")
        if wrong:
            raise WidthMismatch(f"internal error: compressed widths differ from the recorded ones "
                                f"({'; '.join(wrong[:3])}); nothing was written, please report this as a bug")
