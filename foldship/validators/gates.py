"""Pass/fail gates on a validation's numbers; a failed gate makes the CLI exit with code 3."""
from __future__ import annotations

from dataclasses import asdict, dataclass

# Gate name -> what its value measures. A ``max_`` gate fails above its limit, a ``min_`` gate below.
GATES = {
    "max_accuracy_drop": "baseline top-1 minus compressed top-1 (fraction), ONNX Runtime CPU",
    "min_agreement": "fraction of images where compressed and baseline agree on the top-1 class, ONNX Runtime CPU",
    "min_speedup": "baseline p50 / compressed p50, ONNX Runtime CPU, largest batch: the lower end of its interval "
                   "over the interleaved blocks (the point estimate with fewer than 3 blocks)",
    "max_p99_ms": "compressed p99 latency in ms, ONNX Runtime CPU, smallest batch",
    "max_size_mb": "compressed ONNX file size in MB (10^6 bytes)",
}


@dataclass
class GateResult:
    name: str
    value: float | None
    limit: float
    passed: bool
    rule: str  # "<=" or ">="
    measures: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_gates(measured: dict[str, float | None], limits: dict[str, float | None]) -> list[GateResult]:
    """Check each configured limit (None: not configured) against ``measured[name without max_/min_]``.

    A gate whose value could not be measured fails: a CI gate must never pass by default.
    """
    results = []
    for name, limit in limits.items():
        if limit is None:
            continue
        rule = "<=" if name.startswith("max_") else ">="
        value = measured.get(name[4:])
        passed = value is not None and (value <= limit if rule == "<=" else value >= limit)
        results.append(GateResult(name, value, limit, passed, rule, GATES.get(name, "")))
    return results


def summary(results: list[GateResult]) -> dict:
    """The report's ``gates`` entry."""
    return {"passed": all(g.passed for g in results), "results": [g.as_dict() for g in results]}


def check_limits(limits: dict[str, float | None]) -> dict[str, float | None]:
    """Refuse limits that cannot mean anything (BadInput), before any work is done."""
    from ..errors import BadInput

    flag = {name: "--" + name.replace("_", "-") for name in limits}
    for name, limit in limits.items():
        if limit is None:
            continue
        if name in ("max_accuracy_drop", "min_agreement") and not 0 <= limit <= 1:
            raise BadInput(f"{flag[name]} is a fraction in [0, 1] (0.02 = 2 points), got {limit}")
        if name in ("min_speedup", "max_p99_ms", "max_size_mb") and limit <= 0:
            raise BadInput(f"{flag[name]} must be positive, got {limit}")
    return limits
