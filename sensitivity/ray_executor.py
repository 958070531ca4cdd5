"""The Ray executor: one Ray task per run, reserving --cpus-per-cell / --gpus-per-cell.

A task on the driver's node trains in the run's folder (a retried task resumes from its checkpoint); on
another node it trains in a temporary folder and returns the finished run's files, so the cluster needs
no shared filesystem. Ray retries a task whose worker or node died (`max_retries`); the tasks report
their start and rounds to a small actor that the driver drains into its one progress bar and the logs.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsens.personalize import runio
from fedsens.personalize.errors import UserError
from fedsens.sensitivity.executors import (
    Driver,
    ExecutorConfig,
    Job,
    check_ray_address,
    ray_host_port,
    train_job,
    train_portable,
    worker_location,
    write_returned,
)


class _Events:
    """A Ray actor the tasks report to and the driver drains (the bar's and logs' only channel)."""

    def __init__(self):
        self.queue: list[tuple] = []

    def report(self, event: tuple) -> None:
        self.queue.append(event)

    def drain(self) -> list[tuple]:
        found, self.queue = self.queue, []
        return found


def _ray_job(job: Job, events, threads: int, driver_node: str, driver_cwd: str) -> tuple[str, dict]:
    """A Ray task: on the driver's node the run trains in its folder (a retry resumes from the checkpoint);
    elsewhere it trains from its start in a temporary folder and its files go back to the driver."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    events.report.remote(("start", job.name, f"{worker_location()} node {node[:8]}"))
    report = lambda event: events.report.remote(event)  # noqa: E731
    if node == driver_node and Path(driver_cwd).is_dir():
        os.chdir(driver_cwd)  # relative paths in the settings (a --data-root) mean what they mean on the driver
        return train_job(job, report, threads), {}
    return train_portable(job, report, threads)


def _connect_ray(executor: ExecutorConfig):
    """ray, connected to the cluster at `ray_address`, or to a new one on this machine bound to loopback
    only; also whether this call started the connection (and so shuts it down)."""
    if executor.ray_address is None:  # read when Ray is imported: a one-machine cluster binds 127.0.0.1 only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise UserError('--executor ray needs Ray: pip install "fedsens[ray]"') from None
    if ray.is_initialized():
        return ray, False
    options: dict[str, Any] = dict(log_to_driver=False, configure_logging=False)
    check_ray_address(executor.ray_address)  # Ray retries a dead address for minutes
    try:
        if executor.ray_address is None:
            ray.init(include_dashboard=False, **options)
        else:
            if executor.ray_address != "auto" and _is_loopback(ray_host_port(executor.ray_address)[0]):
                options["_node_ip_address"] = "127.0.0.1"  # else Ray swaps in the machine's interface address
            ray.init(address=executor.ray_address, **options)
    except ConnectionError as err:
        raise UserError(f"--ray-address {executor.ray_address}: no Ray cluster answered ({err})") from None
    return ray, True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_ray(todo: Sequence[Job], executor: ExecutorConfig, driver: Driver) -> dict[str, str]:
    if not todo:
        return {}
    ray, connected_here = _connect_ray(executor)
    try:
        gpus = executor.gpus_per_cell
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        events = ray.remote(num_cpus=0)(_Events).remote()
        task = ray.remote(_ray_job).options(
            num_cpus=executor.cpus_per_cell, num_gpus=gpus, max_retries=executor.max_retries, retry_exceptions=False
        )
        node, cwd = ray.get_runtime_context().get_node_id(), os.getcwd()
        refs = {task.remote(job, events, executor.threads, node, cwd): job for job in todo}
        outcome: dict[str, str] = {}
        try:
            _wait_all(ray, refs, events, driver, outcome)
        except BaseException:  # Ctrl-C, SIGTERM: no queued task may start; the runs resume from their checkpoints
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        driver.events(ray.get(events.drain.remote()))
        return outcome
    finally:
        if connected_here:
            ray.shutdown()


def _wait_all(ray, refs: dict, events, driver: Driver, outcome: dict[str, str]) -> None:
    """Collect each task's outcome as it finishes (`refs` shrinks as they do)."""
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.3)
        driver.events(ray.get(events.drain.remote()))
        for ref in ready:
            job = refs.pop(ref)
            note = ""
            try:
                outcome[job.name], files = ray.get(ref)
                write_returned(Path(job.config.out), files)
            except ray.exceptions.RayError as err:  # retries used up, or the task could not run
                note = f": {type(err).__name__} after {driver.attempts[job.name]} attempts"
                Path(job.config.out).mkdir(parents=True, exist_ok=True)
                runio.write_text(Path(job.config.out) / "error.txt", f"{err}\n")
                outcome[job.name] = "failed"
            driver.finish(job.name, outcome[job.name], note)
