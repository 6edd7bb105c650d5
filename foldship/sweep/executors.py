"""Where the jobs run: parallel worker processes on this machine, or tasks on a Ray cluster.

Either way a job is one call of ``foldship.pipeline.build.build`` (the same code path as
``foldship build``) into a throw-away run folder, and comes back as a ``Row``; only the driver
writes rows. The job's thread count is part of its config, so ONNX Runtime, PyTorch and the
k-means see the same threads on every executor and the accuracy numbers agree.

Latency on the local executor: every worker is pinned (CPU affinity) to its own share of the
cores and runs with that many threads, so a job's timing never shares a core with another job's
compression or export; a separate serial latency phase would have to split ``build`` in two.
"""
from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import BadInput
from ..pipeline.build import build
from ..pipeline.config import BuildConfig
from .grid import Job
from .store import Row

PR_SET_PDEATHSIG = 1  # linux prctl: signal a worker gets when its parent dies


@dataclass(frozen=True)
class JobSpec:
    """A job and the exact build config it runs (``threads`` already resolved)."""

    job: Job
    config: BuildConfig


@dataclass(frozen=True)
class ExecutorPlan:
    name: str
    workers: int | None  # local worker processes; None on Ray
    threads: int  # per job
    address: str | None = None


def run_job(spec: JobSpec, work_root: str | None, node: dict) -> Row:
    """Build one job into a temporary run folder and keep its report as a row (the folder goes)."""
    torch.set_num_threads(spec.config.threads)  # compression too, not only the timed runs
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="job.", dir=work_root) as tmp:
        outcome = build(dataclasses.replace(spec.config, out=str(Path(tmp) / "run")))
    return Row.from_build(spec.job, outcome.report, node, spec.config.threads, round(time.perf_counter() - start, 3))


def plan(executor: str, address: str | None, workers: int | None, threads: int, jobs: int) -> ExecutorPlan:
    """Workers sized to the machine: its usable cores split into shares of ``threads`` (default 1)."""
    if executor == "ray":
        return ExecutorPlan("ray", None, threads or 1, address)  # Ray places tasks by free CPUs
    cores = len(os.sched_getaffinity(0))
    per_job = threads or (max(cores // workers, 1) if workers else 1)
    count = max(min(workers or cores // per_job, cores // per_job, jobs), 1)
    return ExecutorPlan("local", count, per_job)


def execute(specs: list[JobSpec], plan_: ExecutorPlan, work_root: Path) -> Iterator[Row]:
    """Rows in the order jobs finish."""
    if plan_.name == "ray":
        yield from _run_ray(specs, plan_)
    else:
        yield from _run_local(specs, plan_, work_root)


# ---- local: a pool of pinned worker processes ----

def _local_node() -> dict:
    return {"hostname": socket.gethostname()}


def _pin_worker(shares: list[list[int]], work_root: str) -> None:
    """Worker start: claim a free share of cores (an exclusive-create file per share), use that many threads.

    Ctrl-C is the driver's to handle; a worker dies with its driver.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # a SIGKILLed driver must not leave jobs running
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for i, cores in enumerate(shares):
        try:
            os.close(os.open(Path(work_root) / f"share{i}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
        return


def _local_job(args: tuple[JobSpec, str]) -> Row:
    spec, work_root = args
    return run_job(spec, work_root, _local_node() | {"cpus": sorted(os.sched_getaffinity(0))})


def _run_local(specs: list[JobSpec], plan_: ExecutorPlan, work_root: Path) -> Iterator[Row]:
    work_root.mkdir(parents=True, exist_ok=True)
    available = sorted(os.sched_getaffinity(0))
    # spawn, not fork: the driver already ran PyTorch (OpenMP) and a forked OpenMP runtime can hang.
    context = multiprocessing.get_context("spawn")
    shares = [available[i * plan_.threads:(i + 1) * plan_.threads] for i in range(plan_.workers)]
    with context.Pool(plan_.workers, _pin_worker, (shares, str(work_root))) as pool:
        # The pool's exit terminates the workers, also when the driver is interrupted.
        yield from pool.imap_unordered(_local_job, [(spec, str(work_root)) for spec in specs])


# ---- Ray: one task per job, on whatever node has a free share of CPUs ----

def _ray_job(spec: JobSpec) -> Row:
    import ray

    context = ray.get_runtime_context()
    return run_job(spec, None, _local_node() | {"ray_node_id": context.get_node_id(),
                                                 "ip": ray.util.get_node_ip_address()})


def _run_ray(specs: list[JobSpec], plan_: ExecutorPlan) -> Iterator[Row]:
    import ray

    started = not ray.is_initialized()
    if started:
        # Without an address, a local instance with this machine's cores; with one, join the cluster. Ray
        # runs workers at niceness 15 by default: on a busy machine they would starve and time badly.
        options = {"address": plan_.address} if plan_.address else {
            "num_cpus": len(os.sched_getaffinity(0)), "_system_config": {"worker_niceness": 0}}
        try:
            ray.init(**options, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise BadInput(f"cannot reach the Ray cluster at {plan_.address} ({exc}); start it with ray start "
                           f"--head or fix --address") from None
    task = ray.remote(num_cpus=plan_.threads, max_retries=1)(_ray_job)
    pending = [task.remote(spec) for spec in specs]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()

