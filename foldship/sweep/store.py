"""The results store: ``results.jsonl`` in the sweep folder, one JSON line per finished job.

Only the sweep's driver process writes it. Each row goes down in one ``write`` on an append-only
descriptor and is synced before the next job counts as done, so a killed sweep leaves whole rows
and at most one torn last line, which the next run cuts off (that job simply runs again). A lock
file keeps two sweeps from writing one folder at once.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..validators.gates import evaluate_gates
from .grid import Job

RESULTS = "results.jsonl"
LOCK = ".lock"
WORK = ".work"  # run folders of jobs in flight on this machine; removed after each row is stored


@dataclass
class Row:
    """One finished job: what it was, where and how long it ran, and the numbers of its build report."""

    key: str
    model: str
    checkpoint: str
    checkpoint_sha256: str
    method: str
    ratio: float
    repair: str
    node: dict  # hostname, and on Ray the node id and address: latency belongs to this machine
    threads: int
    seconds: float
    report: dict  # the job's report.json, whole
    finetune: str = "none"  # the job's recovery (Job.finetune); rows of sweeps without recovery have none

    @classmethod
    def from_build(cls, job: Job, report: dict, node: dict, threads: int, seconds: float) -> "Row":
        c = job.checkpoint
        return cls(job.key, c.model, c.path, c.sha256, job.method, job.ratio, job.repair, node, threads, seconds, report,
                   job.finetune)

    @property
    def treatment(self) -> str:
        """What followed compression: the repair, then the recovery when there is one."""
        return self.repair if self.finetune == "none" else f"{self.repair} + {self.finetune}"

    @property
    def accuracy_before_recovery(self) -> float | None:
        recovery = self.report.get("recovery")
        return recovery["before"]["accuracy"] if recovery else None

    # The numbers the plots, the table and the selection read, from the report.
    @property
    def accuracy(self) -> float:
        return self.report["compressed"]["accuracy"]

    @property
    def baseline_accuracy(self) -> float:
        return self.report["baseline"]["accuracy"]

    @property
    def size_bytes(self) -> int:
        return self.report["compressed"]["size_bytes"]

    @property
    def latency_batch(self) -> str:
        """The largest batch timed: where the MAC reduction shows (the min_speedup gate reads it too)."""
        return max(self.report["compressed"]["latency"]["onnxruntime-cpu"], key=lambda k: int(k[len("batch"):]))

    def latency_ms(self, side: str = "compressed") -> float:
        return self.report[side]["latency"]["onnxruntime-cpu"][self.latency_batch]["p50_ms"]

    @property
    def measurably_slower(self) -> bool:
        """The job's engine ran slower than its baseline: its speed interval lies wholly below 1."""
        return (self.report.get("speed") or {}).get("verdict") == "slower"

    def passes(self, limits: dict[str, float | None]) -> bool:
        """Judged again under ``limits`` from the values its build measured, so a resumed sweep may move a
        limit without rebuilding; a gate the build did not measure fails, as in ``foldship build``."""
        measured = {g["name"][4:]: g["value"] for g in self.report["gates"]["results"]}  # drop max_/min_
        return all(g.passed for g in evaluate_gates(measured, limits))


class ResultStore:
    """Open (and lock) the store of ``folder``; ``rows`` holds every whole row already written."""

    def __init__(self, folder: str | Path, fresh: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.folder / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise BadInput(f"another sweep is writing to {self.folder}; wait for it to finish or choose another "
                           f"--out") from None
        self.path = self.folder / RESULTS
        if fresh:
            self.path.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)  # left by a killed run: those jobs run again
        self.rows = self._read_whole_rows()
        self._fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)

    @property
    def work(self) -> Path:
        return self.folder / WORK

    def _read_whole_rows(self) -> dict[str, Row]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):  # a row torn by a kill mid-write: cut it, its job runs again
            os.truncate(self.path, len(whole))
        rows: dict[str, Row] = {}
        for number, line in enumerate(whole.decode().splitlines(), 1):
            try:
                row = Row(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                raise BadInput(f"{self.path} line {number} is not a sweep row ({exc}); move the file away or pass "
                               f"--overwrite to start the sweep again") from None
            rows.setdefault(row.key, row)
        return rows

    def append(self, row: Row) -> None:
        if row.key in self.rows:  # a job finished twice (a retried Ray task): the store keeps one row
            return
        data = (json.dumps(row.__dict__, separators=(",", ":")) + "\n").encode()
        written = 0
        while written < len(data):  # a regular file takes it in one write; loop for the rare short write
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        self.rows[row.key] = row

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        os.close(self._fd)
        os.close(self._lock)

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
