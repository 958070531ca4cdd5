"""Executors: the same sweep in this process, in a pool of worker processes and on a real Ray cluster
(loopback only) writes the same tables, also when a worker is killed in the middle of a cell."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.sensitivity import executors
from fedsens.sensitivity.executors import ExecutorConfig, gpu_groups
from fedsens.sensitivity.sweep import SweepConfig, cell_job, grid, run_sweep

# A single-machine Ray cluster binds 127.0.0.1 only; read by Ray when it is imported.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
os.environ.update(LOOPBACK_ENV)

TINY_RUN = RunConfig(
    dataset="synthetic", model="vit-nano", clients=4, join_ratio=0.5, rounds=3, local_epochs=1, device="cpu"
)
SWEEP_TABLES = ("sensitivity", "ranking", "divergence", "rounds", "metrics")
TIMING = ["seconds"]


def tiny(out) -> SweepConfig:
    return SweepConfig(run=TINY_RUN, parts=("none", "attn", "head"), seeds=(0,), out=str(out), quiet=True)


def tables(out) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(Path(out) / f"{name}.csv").drop(columns=TIMING, errors="ignore") for name in SWEEP_TABLES}


def assert_same_tables(out, reference) -> None:
    expected = tables(reference)
    for name, table in tables(out).items():
        pd.testing.assert_frame_equal(table, expected[name], check_exact=True, obj=name)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The reference: the tiny sweep in this process, one cell after another."""
    return run_sweep(tiny(tmp_path_factory.mktemp("serial") / "sweep"))


class WorkerKiller(threading.Thread):
    """Watches the cells' logs for a worker that has finished a round of its cell (its checkpoint
    exists, its summary does not say done) and SIGKILLs that worker process once."""

    def __init__(self, out: Path, timeout: float):
        super().__init__(daemon=True)
        self.out, self.deadline = out, time.monotonic() + timeout
        self.killed: tuple[str, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline and self.killed is None:
            for log in sorted(self.out.glob("cells/*/log.txt")):
                folder = log.parent
                lines = log.read_text().splitlines()
                if len(lines) != 1 or not (folder / "checkpoint.pt").exists():
                    continue  # not started, finished, or not one round in yet
                summary = folder / "summary.json"
                if summary.exists() and '"done"' in summary.read_text():
                    continue
                pid = int(lines[0].split(" pid ")[1].split()[0])
                if pid == os.getpid():
                    continue  # an in-process cell: never the test itself
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed = (folder.name, pid)
                return
            time.sleep(0.02)


# ---- pieces -------------------------------------------------------------------------------------


def test_gpu_groups_are_round_robin():
    assert gpu_groups(0, 1) == []
    assert gpu_groups(4, 1) == ["0", "1", "2", "3"]
    assert gpu_groups(4, 2) == ["0,1", "2,3"]
    assert gpu_groups(3, 2) == ["0,1"]


def test_a_fraction_of_a_gpu_per_cell_packs_cells_on_each_gpu():
    assert gpu_groups(1, 0.25) == ["0", "0", "0", "0"]  # four workers share the one GPU
    assert gpu_groups(2, 0.5) == ["0", "1", "0", "1"]
    assert gpu_groups(1, 0.3) == ["0", "0", "0"]
    assert gpu_groups(2, 0) == []


def test_bad_executor_options_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--jobs"):
        ExecutorConfig(jobs=0)
    with pytest.raises(UserError, match="--executor"):
        ExecutorConfig(kind="dask")
    with pytest.raises(UserError, match="--ray-address needs --executor ray"):
        ExecutorConfig(ray_address="auto")
    result = CliRunner().invoke(app, ["sweep", "--jobs", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error: --jobs must be at least 1" in result.output


def test_a_worker_without_the_drivers_folder_sends_back_the_same_run(serial, tmp_path):
    """train_portable: trained in a temporary folder, the files (no checkpoint) written on the driver."""
    config = tiny(tmp_path / "sweep")
    job = cell_job(config, grid(config)[1])
    rounds: list[int] = []
    status, files = executors.train_portable(job, lambda event: rounds.append(event[2]), threads=1)
    assert status == "done" and rounds == [1, 2, 3]
    assert "checkpoint.pt" not in files and {"rounds.csv", "divergence.csv", "summary.json"} <= set(files)
    folder = Path(job.config.out)
    executors.write_returned(folder, files)
    reference = serial.out / "cells" / folder.name
    for name in ("metrics", "divergence"):
        pd.testing.assert_frame_equal(pd.read_csv(folder / f"{name}.csv"), pd.read_csv(reference / f"{name}.csv"))


# ---- a pool of worker processes ----------------------------------------------------------------


def test_a_worker_that_saw_ctrl_c_starts_no_other_run(tmp_path, monkeypatch):
    """A run the pool already handed to a worker cannot be cancelled: once the worker has seen Ctrl-C (which
    reaches the whole process group) it refuses it, even before the driver, slowed by load, ends the worker."""
    config = tiny(tmp_path / "sweep")
    job = cell_job(config, grid(config)[0])
    monkeypatch.setattr(executors, "_worker", {})
    executors._note_interrupt(signal.SIGINT, None)  # what the worker's SIGINT handler does: note, not raise
    with pytest.raises(KeyboardInterrupt, match="before .* started"):
        executors._pool_job(job)
    assert not (Path(job.config.out) / "config.json").exists()  # the run never started


def test_the_pool_writes_the_same_tables_and_resubmits_a_killed_worker(serial, tmp_path):
    out = tmp_path / "sweep"
    killer = WorkerKiller(out, timeout=240)
    killer.start()
    try:
        result = run_sweep(tiny(out), ExecutorConfig(jobs=2, threads=1))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no worker was caught in the middle of a cell"
    assert result.failed == () and len(result.ran) == 3
    assert_same_tables(out, serial.out)
    log = (out / "cells" / killer.killed[0] / "log.txt").read_text()
    assert "re-submitted" in log and "attempt 2 started" in log and "retried" in log
    again = run_sweep(tiny(out))  # a finished sweep, run again in this process, trains nothing
    assert again.ran == () and len(again.skipped) == 3


# ---- a Ray cluster on loopback -----------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """`ray start --head --block` bound to 127.0.0.1 with 2 CPUs, in its own temp dir and process group;
    stopped at the end (also on failure) by signalling that group, never by `ray stop` (which would
    stop every Ray on the machine)."""
    pytest.importorskip("ray")
    port, client, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = _free_ports(8)
    temp_dir = tempfile.mkdtemp(prefix="fs-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_bin = Path(sys.executable).with_name("ray")
    command = [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--include-log-monitor=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **LOOPBACK_ENV}, start_new_session=True
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (Path(temp_dir) / "head.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)  # --block: the head stops the processes it started
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of its group is left
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_writes_the_same_tables_and_retries_a_killed_worker(serial, ray_head, tmp_path):
    out = tmp_path / "sweep"
    first = grid(tiny(out))[0].name  # finished by the serial executor: Ray must not train it again
    shutil.copytree(serial.out / "cells" / first, out / "cells" / first)
    killer = WorkerKiller(out, timeout=240)
    killer.start()
    try:
        result = run_sweep(tiny(out), ExecutorConfig(kind="ray", ray_address=ray_head, threads=1))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no Ray worker was caught in the middle of a cell"
    assert result.skipped == (first,) and result.failed == () and len(result.ran) == 2
    assert_same_tables(out, serial.out)
    log = (out / "cells" / killer.killed[0] / "log.txt").read_text()
    assert "attempt 1 started" in log and "attempt 2 started" in log and "retried" in log, log
    assert f"pid {killer.killed[1]}" in log
    print(f"\nkilled Ray worker pid {killer.killed[1]} in {killer.killed[0]}; its log:\n{log}")
