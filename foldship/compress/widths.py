"""The width rule shared by folding and pruning, so both give identical architectures."""
from __future__ import annotations

import math

from ..errors import BadInput


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
