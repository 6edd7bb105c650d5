"""Pass/fail gates on a build's numbers; a failed gate makes the CLI exit with code 3."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GateResult:
    name: str
    value: float | None
    limit: float
    passed: bool
    rule: str  # "<=" or ">="

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_gates(measured: dict[str, float | None], limits: dict[str, float | None]) -> list[GateResult]:
    """Check each configured limit. Keys: max_accuracy_drop, min_speedup, min_agreement, ..."""
    results = []
    for name, limit in limits.items():
        if limit is None:
            continue
        rule = "<=" if name.startswith("max_") else ">="
        value = measured.get(name[4:])
        passed = value is not None and (value <= limit if rule == "<=" else value >= limit)
        results.append(GateResult(name, value, limit, passed, rule))
    return results
