"""The width rule shared by folding and pruning, so both give identical architectures, and the
ledger that checks every compressed tensor has the width its group records."""
from __future__ import annotations

import math

from torch import nn

from ..errors import BadInput, FoldshipError
from ..models.cifar_resnet import PadShortcut


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or refuse a value outside (0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise BadInput(f"ratio {ratio!r} is not a number; pass a fraction of channels to remove, e.g. --ratio 0.3") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise BadInput(f"ratio {value} is outside (0, 1); it is the fraction of channels to remove, e.g. --ratio 0.3")
    return value


def check_round_to(round_to: int | None) -> None:
    """Refuse an alignment that is not a whole number >= 1 (None: the caller's default)."""
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise BadInput(f"round_to must be a whole number >= 1, got {round_to!r}; e.g. --round-to 8")


def kept_width(n: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept in a group of ``n`` at compression ratio ``ratio``.

    ``k = max(int(n * (1 - ratio)), 1)`` in float64, as in the papers (so int(64 * 0.7) = 44 and
    1 - 0.9 = 0.0999... gives 6 of 64). ``round_to`` > 1 rounds k down to a multiple of it
    (never below one multiple, never above n): a product option for hardware-friendly widths,
    never used when reproducing paper numbers.
    """
    k = max(int(n * (1.0 - ratio)), 1)
    if round_to > 1 and n > round_to:
        k = max((k // round_to) * round_to, round_to)
    return min(k, n)


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
