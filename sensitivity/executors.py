"""Where a grid's runs train: in this process, in a pool of worker processes, or as Ray tasks.

`sensitivity.sweep` and `sensitivity.compare` decide WHAT runs exist (a list of `Job`s); an executor
decides WHERE they run. Every executor trains a job with the same function, `runs.run_resumable`,
so a table never depends on where it ran. The driver (this process) skips finished runs, clears a
run's folder for --fresh, shows one progress bar over runs and rounds fed by the workers, and keeps
each run's `log.txt`: where each attempt started, and whether it was retried after a worker died.
This module holds the in-process and process-pool executors; `ray_executor` the Ray one.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedsens.personalize import interrupts, runio
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.sensitivity import runs

KINDS = ("local", "ray")
# Files a worker without the driver's folder sends back: everything but the (large) checkpoints.
NOT_RETURNED = ("checkpoint.pt", "checkpoint.prev.pt")


def _no_hooks() -> tuple:
    return ()


@dataclass(frozen=True)
class Job:
    """One run of a grid: its name (shown in the bar and logs), its settings (`config.out` is its folder
    on the driver) and a picklable factory of its hooks, built where it trains (hooks hold state)."""

    name: str
    config: RunConfig
    hooks: Callable[[], Sequence] = _no_hooks


@dataclass(frozen=True)
class ExecutorConfig:
    """kind: local (`jobs` runs at a time; 1 = in this process) or ray (one task per run with
    `cpus_per_cell` / `gpus_per_cell`; `ray_address` None starts a cluster on this machine, loopback only).
    gpus_per_cell None: 1 where GPUs are present, else 0. A run whose worker dies is tried again, at most
    `max_retries` times."""

    kind: str = "local"
    jobs: int = 1
    threads: int = 1
    cpus_per_cell: float = 1.0
    gpus_per_cell: float | None = None
    ray_address: str | None = None
    max_retries: int = 2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"--executor {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.jobs < 1:
            raise UserError(f"--jobs must be at least 1 (got {self.jobs})")
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1 (got {self.threads})")
        if self.cpus_per_cell <= 0:
            raise UserError(f"--cpus-per-cell must be > 0 (got {self.cpus_per_cell})")
        if self.gpus_per_cell is not None and self.gpus_per_cell < 0:
            raise UserError(f"--gpus-per-cell must be >= 0 (got {self.gpus_per_cell})")
        if self.ray_address is not None and self.kind != "ray":
            raise UserError("--ray-address needs --executor ray")
        if self.max_retries < 0:
            raise UserError(f"max_retries must be >= 0 (got {self.max_retries})")


def from_options(
    kind: str,
    jobs: int | None,
    default_jobs: int,
    cpus_per_cell: float,
    gpus_per_cell: float | None,
    ray_address: str | None,
) -> ExecutorConfig:
    """The CLI's executor options; workers get the torch threads this process was given (--threads)."""
    import torch

    config = ExecutorConfig(
        kind=kind,
        jobs=default_jobs if jobs is None else jobs,
        threads=torch.get_num_threads(),
        cpus_per_cell=cpus_per_cell,
        gpus_per_cell=gpus_per_cell,
        ray_address=ray_address,
    )
    from fedsens.sensitivity.ray_executor import check_ray_address  # Ray itself is imported only to run

    check_ray_address(config.ray_address)  # before any cell trains (the FedAvg reference comes first)
    return config


def clamp_jobs(jobs: int, cells: int, cores: int) -> tuple[int, str | None]:
    """Worker processes for `jobs` asked, `cells` to train and `cores` on this machine: never more than
    either (more processes than cores only share the cores, and each costs a start-up); the notice says so."""
    workers = max(1, min(jobs, cells, cores))
    if jobs > cores and cells > cores:
        return workers, f"--jobs {jobs}: this machine has {cores} cores; training {workers} at a time"
    return workers, None


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- the cell, wherever it runs -------------------------------------------------------------------


class _RoundReporter:
    """A hook that tells the driver each finished round. Its table is "rounds" and it adds no rows,
    so it writes no table of its own."""

    table = "rounds"

    def __init__(self, name: str, report: Callable[[tuple], None]):
        self.name, self.report = name, report

    def on_run_start(self, ctx) -> None:
        pass

    def on_client_start(self, round: int, client: int, model) -> None:
        pass

    def on_client_end(self, round: int, client: int, model) -> None:
        pass

    def on_round_end(self, round: int) -> list[dict]:
        self.report(("round", self.name, round))
        return []


def train_job(job: Job, report: Callable[[tuple], None], threads: int | None = None) -> str:
    """Train (or continue) the job in its folder; 'done' or 'failed' (the error is in error.txt)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return runs.run_resumable(job.config, (*job.hooks(), _RoundReporter(job.name, report)), quiet=True)


def train_portable(job: Job, report: Callable[[tuple], None], threads: int | None = None) -> tuple[str, dict]:
    """Train the job from its start in a local temporary folder, for a worker that cannot see the driver's
    folder; returns the status and the finished folder's files (relative path -> bytes), checkpoint aside."""
    with tempfile.TemporaryDirectory(prefix="fedsens-run-") as tmp:
        folder = Path(tmp) / Path(job.config.out).name
        status = train_job(dataclasses.replace(job, config=job.config.replace(out=str(folder))), report, threads)
        files = {
            path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in NOT_RETURNED and not path.name.endswith(".tmp")
        }
    return status, files


def write_returned(folder: Path, files: dict[str, bytes]) -> None:
    """The files a worker sent back, written into the run's folder on the driver."""
    for name, content in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        runio.write_bytes(target, content)


# ---- the driver: bar, logs, skipping ------------------------------------------------------------


def _log(folder: Path, line: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with runio.writing(folder / "log.txt"), open(folder / "log.txt", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


class Driver:
    """One bar over every job's rounds, and the jobs' logs; fed by events from wherever the jobs run:
    ('start', name, where) when an attempt begins, ('round', name, round) when a round ends."""

    def __init__(self, jobs: Sequence[Job], desc: str, quiet: bool, executor: str):
        self.folders = {job.name: Path(job.config.out) for job in jobs}
        self.rounds_total = {job.name: job.config.rounds for job in jobs}
        self.rounds_done = dict.fromkeys(self.folders, 0)
        self.attempts = dict.fromkeys(self.folders, 0)
        self.finished: set[str] = set()
        self.executor = executor
        total = sum(self.rounds_total.values())
        self.bar = tqdm(total=total, desc=desc, unit="round", disable=quiet, dynamic_ncols=True)

    def event(self, event: tuple) -> None:
        kind, name, value = event
        if kind == "start":
            self.attempts[name] += 1
            attempt = self.attempts[name]
            retried = " (retried: an earlier attempt's worker died)" if attempt > 1 else ""
            _log(self.folders[name], f"attempt {attempt} started on {value} [{self.executor}]{retried}")
        elif kind == "round" and name not in self.finished:  # a late report must not move the bar back
            self.rounds_done[name] = value
            self._refresh()

    def events(self, events: Iterable[tuple]) -> None:
        for event in events:
            self.event(event)

    def finish(self, name: str, status: str, note: str = "") -> None:
        self.rounds_done[name] = self.rounds_total[name]
        self.finished.add(name)
        if status != "skipped":
            _log(self.folders[name], f"{status}{note}")
        self._refresh()

    def _refresh(self) -> None:
        self.bar.n = sum(self.rounds_done.values())
        self.bar.set_postfix_str(f"{len(self.finished)}/{len(self.folders)} runs", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def worker_location() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def run_jobs(jobs: Sequence[Job], executor: ExecutorConfig, *, fresh: bool = False, quiet: bool = False, desc="runs"):
    """Run every job not finished yet; returns each job's outcome: 'done', 'skipped' or 'failed'."""
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError("two jobs share a name")
    driver = Driver(jobs, desc, quiet, _describe(executor))
    outcome: dict[str, str] = {}
    todo = []
    for job in jobs:
        folder = Path(job.config.out)
        if fresh and folder.exists():
            shutil.rmtree(folder)
        if runs.is_finished(folder, job.config):
            outcome[job.name] = "skipped"
            driver.finish(job.name, "skipped")
        else:
            todo.append(job)
    try:
        if executor.kind == "ray":
            from fedsens.sensitivity.ray_executor import run_ray  # Ray is an optional dependency

            outcome.update(run_ray(todo, executor, driver))
        elif executor.jobs > 1 and len(todo) > 1:
            outcome.update(_run_pool(todo, executor, driver))
        else:
            outcome.update(_run_serial(todo, driver))
    finally:
        driver.close()
    return {name: outcome[name] for name in names}


def _describe(executor: ExecutorConfig) -> str:
    if executor.kind == "ray":
        return f"ray {executor.ray_address or 'local'}"
    return "in-process" if executor.jobs == 1 else f"process pool of {executor.jobs}"


def _run_serial(todo: Sequence[Job], driver: Driver) -> dict[str, str]:
    """Today's behaviour: one run after another in this process (the CLI has set torch's threads)."""
    outcome = {}
    for job in todo:
        interrupts.check()  # a Ctrl-C swallowed inside the previous run starts no other
        driver.event(("start", job.name, worker_location()))
        outcome[job.name] = train_job(job, driver.event)
        driver.finish(job.name, outcome[job.name])
    return outcome


# ---- a pool of worker processes on this machine ---------------------------------------------------

# Set once per worker process by the pool's initializer: the queue back to the driver and its threads.
_worker: dict[str, Any] = {}


def gpu_groups(gpus: int, per_cell: float) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker slot, round-robin over the machine's GPUs ([] without GPUs).
    A fraction packs cells on a GPU: 0.25 gives each GPU four slots (a small model leaves a GPU mostly idle)."""
    if gpus < 1 or per_cell <= 0:
        return []
    if per_cell < 1:
        shares = int(1 / per_cell + 1e-9)  # whole cells a GPU holds: 0.3 -> 3
        return [str(slot % gpus) for slot in range(gpus * shares)]
    whole = int(per_cell)
    slots = max(1, gpus // whole)
    return [",".join(str((slot * whole + i) % gpus) for i in range(whole)) for slot in range(slots)]


def _note_interrupt(signum, frame) -> None:
    """A worker's Ctrl-C: the run it trains goes on until the driver ends the worker, but it starts no other."""
    _worker["interrupted"] = True


def _init_worker(events, threads: int, groups: list[str], counter) -> None:
    # Ctrl-C reaches the whole process group: the driver answers it (cancels the queue, ends the workers). A
    # worker only notes it: a run the pool had already handed to the worker (its call queue cannot be
    # cancelled) could otherwise start before the driver, slowed by a loaded machine, ends the worker.
    signal.signal(signal.SIGINT, _note_interrupt)
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    if groups:  # before torch touches CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = groups[slot % len(groups)]
    _worker.update(events=events, threads=threads)


def _pool_job(job: Job) -> str:
    if _worker.get("interrupted"):
        raise KeyboardInterrupt(f"Ctrl-C reached the worker before {job.name} started")
    events = _worker["events"]
    events.put(("start", job.name, worker_location()))
    return train_job(job, events.put, _worker["threads"])


def _local_gpus(executor: ExecutorConfig) -> list[str]:
    if executor.gpus_per_cell == 0:
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpu_groups(count, executor.gpus_per_cell or 1)


def _drain(queue) -> list[tuple]:
    found = []
    while True:
        try:
            found.append(queue.get_nowait())
        except Exception:  # noqa: BLE001 - empty (or a pipe a killed worker broke): nothing more to read
            return found


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel every queued run and end the workers: a worker survives the KeyboardInterrupt of its run
    (the pool catches it) and would take the next queued run. The runs resume from their checkpoints."""
    pool.shutdown(wait=False, cancel_futures=True)
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout=10)


def _run_pool(todo: Sequence[Job], executor: ExecutorConfig, driver: Driver) -> dict[str, str]:
    """`jobs` runs at a time in spawned worker processes; a run whose worker died is re-submitted (it
    resumes from its checkpoint) up to `max_retries` times, then recorded as failed."""
    context = multiprocessing.get_context("spawn")
    groups = _local_gpus(executor)
    workers, notice = clamp_jobs(executor.jobs, len(todo), max(1, cores() // executor.threads))
    if notice:
        tqdm.write(notice)
    if groups:
        workers = min(workers, len(groups))
    outcome: dict[str, str] = {}
    pending = list(todo)
    while pending:
        events, counter = context.Queue(), context.Value("i", 0)
        lost = []
        with ProcessPoolExecutor(
            max_workers=min(workers, len(pending)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(events, executor.threads, groups, counter),
        ) as pool:
            futures = {pool.submit(_pool_job, job): job for job in pending}
            try:
                while futures:
                    interrupts.check()  # a Ctrl-C swallowed on its way still stops the pool
                    done, _ = wait(futures, timeout=0.3, return_when=FIRST_COMPLETED)
                    driver.events(_drain(events))
                    for future in done:
                        job = futures.pop(future)
                        try:
                            outcome[job.name] = future.result()
                        except BrokenProcessPool:
                            lost.append(job)
                            continue
                        driver.finish(job.name, outcome[job.name])
            except BaseException:  # Ctrl-C, SIGTERM: no queued run may start; the running ones stop now
                _stop_pool(pool)
                raise
        driver.events(_drain(events))
        if lost and not any(driver.attempts[job.name] for job in lost) and not driver.finished:
            raise RuntimeError("the worker processes died before starting any run; see the errors above")
        pending = []
        for job in lost:
            if driver.attempts[job.name] > executor.max_retries:
                message = f"its worker process died on each of {driver.attempts[job.name]} attempts"
                runio.write_text(Path(job.config.out) / "error.txt", message + "\n")
                outcome[job.name] = "failed"
                driver.finish(job.name, "failed", f": {message}")
            else:
                if driver.attempts[job.name]:
                    _log(Path(job.config.out), "a worker process of the pool died; re-submitted")
                pending.append(job)
    return outcome
