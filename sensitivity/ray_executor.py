"""The Ray executor: one Ray task per run, reserving --cpus-per-cell / --gpus-per-cell.

A task on the driver's node trains in the run's folder (a retried task resumes from its checkpoint); on
another node it trains in a temporary folder and returns the finished run's files, so the cluster needs
no shared filesystem. Ray retries a task whose worker or node died (`max_retries`); the tasks report
their start and rounds to a small actor that the driver drains into its one progress bar and the logs.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsens.personalize import interrupts, runio
from fedsens.personalize.errors import UserError
from fedsens.sensitivity.executors import (
    Driver,
    ExecutorConfig,
    Job,
    train_job,
    train_portable,
    worker_location,
    write_returned,
)

RAY_CONNECT_TIMEOUT = 5.0  # seconds to wait for a Ray cluster's port to answer


def ray_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT (or ray://HOST:PORT) of --ray-address; a UserError when it is neither."""
    bare = address.split("://", 1)[-1]
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--ray-address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379) or auto")
    return host.strip("[]"), int(port)


def check_ray_address(address: str | None, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """A cluster address must answer within `timeout` seconds: Ray itself retries a dead address for
    minutes. None (start a cluster here) and auto (Ray finds it) are left to Ray."""
    if address is None or address == "auto":
        return
    host, port = ray_host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err)).lower()
        raise UserError(
            f"--ray-address {address}: nothing answers there within {timeout:g} s ({reason}); start the cluster "
            "(`ray start --head`) and pass the address it prints, or leave --ray-address out to start one here"
        ) from None


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
        interrupts.check()  # a Ctrl-C swallowed on its way still cancels the queued tasks (run_ray)
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
