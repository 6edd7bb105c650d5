"""What a speedup is worth: its spread over the interleaved blocks, the gain its MACs made possible,
and the words every summary uses for it (report.md, the console, sweep tables, gates).

The speedup of a compressed model over its baseline is the median, over the rounds of interleaved
blocks (``latency.block_order``), of baseline block p50 / compressed block p50. The smallest and
largest per-round ratio bound it: with k rounds, the median of the per-round ratios' distribution
lies outside [min, max] only if all k fall on one side of it, so the interval holds with
probability 1 - 2 ** (1 - k) (75 % for 3 rounds, 97 % for 6), whatever that distribution is. An
interval that contains 1.0 is "no measurable difference", not a number.

The possible gain of a model with ``mac_ratio`` of the baseline's MACs is 1 / mac_ratio - 1 (a
0.5x-MAC model can at best run 2x as fast: a gain of 1); the share realised is
(speedup - 1) / (1 / mac_ratio - 1). Pure Python: no torch, no ONNX Runtime.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

MIN_BLOCKS = 3  # fewer rounds give no interval


@dataclass(frozen=True)
class Speedup:
    value: float  # median over rounds of baseline block p50 / compressed block p50
    low: float | None  # smallest per-round ratio (None with fewer than MIN_BLOCKS rounds)
    high: float | None  # largest per-round ratio
    blocks: int  # rounds paired
    confidence: float | None  # probability that [low, high] holds the median per-round ratio

    @classmethod
    def from_blocks(cls, baseline_p50_ms: Sequence[float], compressed_p50_ms: Sequence[float]) -> "Speedup":
        """Pair the two models' block p50s round by round (both lists in the order they were timed)."""
        if len(baseline_p50_ms) != len(compressed_p50_ms) or not baseline_p50_ms:
            raise ValueError(f"need the same number of blocks on both sides, got {len(baseline_p50_ms)} and "
                             f"{len(compressed_p50_ms)}")
        ratios = [b / c for b, c in zip(baseline_p50_ms, compressed_p50_ms)]
        k = len(ratios)
        if k < MIN_BLOCKS:
            return cls(statistics.median(ratios), None, None, k, None)
        return cls(statistics.median(ratios), min(ratios), max(ratios), k, 1.0 - 2.0 ** (1 - k))

    @classmethod
    def from_dict(cls, entry: dict) -> "Speedup":
        """Back from ``as_dict`` (a report's ``speed`` or ``speedup_interval`` entry)."""
        return cls(entry["value"], entry["low"], entry["high"], entry["blocks"], entry["confidence"])

    @property
    def verdict(self) -> str:
        """faster, slower, or no measurable difference (the interval holds 1.0); without an
        interval, the point estimate's direction."""
        if self.low is not None and self.low <= 1.0 <= self.high:
            return "no measurable difference"
        return "faster" if self.value > 1.0 else "slower" if self.value < 1.0 else "no measurable difference"

    @property
    def judged(self) -> float:
        """The figure the min_speedup gate judges: the interval's lower end (what the measurement
        supports), or the point estimate when there are too few blocks for an interval."""
        return self.value if self.low is None else self.low

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()} | {
            "verdict": self.verdict}


def realised_share(speedup: float, mac_ratio: float | None) -> float | None:
    """(speedup - 1) / (1 / mac_ratio - 1): the share of the gain the MACs made possible that showed
    up (1.0 all of it, 0 none, negative a slowdown); None without a MAC reduction."""
    if mac_ratio is None or not 0 < mac_ratio < 1:
        return None
    return (speedup - 1.0) / (1.0 / mac_ratio - 1.0)


def change_text(speedup: Speedup) -> str:
    """The speed change alone: ``1.38x faster (1.30-1.45)``, ``1.04x slower (1.02-1.08)``, ``no
    measurable difference (0.97-1.05)``; the parenthesis is the per-round interval of the factor
    named (a slowdown's is 1/high-1/low of the speedup's; no difference shows the speedup's)."""
    factor, low, high = speedup.value, speedup.low, speedup.high
    if speedup.verdict == "slower":
        factor, low, high = 1.0 / factor, (None if high is None else 1.0 / high), (None if low is None else 1.0 / low)
    spread = "" if low is None else f" ({low:.2f}-{high:.2f})"
    if speedup.verdict == "no measurable difference":
        return f"no measurable difference{spread}"
    return f"{factor:.2f}x {speedup.verdict}{spread}"


def speed_sentence(speedup: Speedup, batch: int, mac_ratio: float | None) -> str:
    """One line: ``1.02x faster (1.01-1.04) at batch 64 for 0.69x MACs: 5 % of the possible gain``;
    a slowdown or no measurable difference realises none of it, and says so."""
    line = f"{change_text(speedup)} at batch {batch}"
    share = realised_share(speedup.value, mac_ratio)
    if share is None:
        return line if mac_ratio is None else f"{line} for {mac_ratio:.2f}x MACs (no MAC reduction)"
    line += f" for {mac_ratio:.2f}x MACs"
    if speedup.verdict == "faster":
        return f"{line}: {100 * share:.0f} % of the possible gain"
    return f"{line}: none of the possible {1 / mac_ratio:.2f}x shows up"


def measured_speedups(baseline: dict, compressed: dict) -> dict[str, dict[str, Speedup]]:
    """Per backend and batch, the speedup of two sides' latency entries (``{backend: {"batch<N>":
    stats}}``, stats holding ``block_p50_ms`` in the order timed), where both sides were timed."""
    return {backend: {key: Speedup.from_blocks(stats["block_p50_ms"], compressed[backend][key]["block_p50_ms"])
                      for key, stats in batches.items() if key in compressed.get(backend, {})}
            for backend, batches in baseline.items()}


def speedup_entries(speedups: dict[str, dict[str, Speedup]]) -> dict:
    """The ``speedup`` (value per backend and batch) and ``speedup_interval`` entries of a report or
    bench file."""
    return {"speedup": {b: {k: round(v.value, 4) for k, v in batches.items()} for b, batches in speedups.items()},
            "speedup_interval": {b: {k: v.as_dict() for k, v in batches.items()} for b, batches in speedups.items()}}


def recorded_speedup(entry: dict, backend: str, batch: str) -> Speedup:
    """The speedup a report or bench entry records at one backend and batch (``speedup_interval``,
    or the ``speedup`` value alone where an entry has no interval)."""
    interval = (entry.get("speedup_interval") or {}).get(backend, {}).get(batch)
    if interval is None:
        return Speedup(entry["speedup"][backend][batch], None, None, 1, None)
    return Speedup.from_dict(interval)


def speed_summary(speedup: Speedup, backend: str, batch: int, mac_ratio: float | None) -> dict:
    """The report's ``speed`` entry: the headline comparison with everything behind its sentence.
    The sentence is worded from the stored (rounded) figures, so text re-rendered from the entry
    (``speed_cell`` in sweep tables) reads the same: 1.05504 prints 1.06, stored as 1.055 it prints 1.05."""
    speedup = Speedup.from_dict(speedup.as_dict())
    share = realised_share(speedup.value, mac_ratio)
    return {"backend": backend, "batch": batch, **speedup.as_dict(),
            "mac_ratio": None if mac_ratio is None else round(mac_ratio, 4),
            "possible_speedup": None if share is None else round(1 / mac_ratio, 4),
            "realised_share": None if share is None else round(share, 4),
            "sentence": speed_sentence(speedup, batch, mac_ratio)}
