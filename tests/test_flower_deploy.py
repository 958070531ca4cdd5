"""The generated Flower app on a real SuperLink with two SuperNodes (loopback, insecure), run by `flwr run`.

Every wait has a deadline and the fixture always stops the process groups it started, also on failure.
Each message starts a fresh `flwr-clientapp` process (Flower 1.42's subprocess isolation) that imports
torch and builds the tiny run, so on this loaded 2-core machine the test takes minutes, not seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("flwr")

from fedsens.cli import app  # noqa: E402
from fedsens.personalize import federation  # noqa: E402
from fedsens.personalize.config import RunConfig  # noqa: E402

BIN = Path(sys.executable).parent
RUN_DEADLINE_S = 540  # the whole federated run, from `flwr run` to summary.json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, deadline_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args[0]} exited with {process.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


@pytest.fixture
def services(tmp_path):
    """Start Flower processes in their own process groups; stop every group at the end, whatever happened."""
    started: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> subprocess.Popen:
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # they spawn flower-superexec etc. by name
            "FLWR_HOME": str(tmp_path / f"home-{name}"),
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        with open(logs / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(process)
        return process

    yield start
    for process in started:
        with _suppress_gone():
            os.killpg(process.pid, signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with _suppress_gone():
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        with _suppress_gone():  # children of a group leader that already exited
            os.killpg(process.pid, signal.SIGKILL)


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is ProcessLookupError


@pytest.mark.deploy
def test_generated_app_runs_on_a_superlink_with_two_supernodes(tmp_path, services):
    out, app_dir = tmp_path / "run", tmp_path / "app"
    options = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "2", "--rounds", "2"]
    options += ["--local-steps", "1", "--join-ratio", "0.5", "--eval-every", "2", "--device", "cpu", "--seed", "1"]
    written = CliRunner().invoke(app, ["flower", "app", str(app_dir), *options, "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert (app_dir / "pyproject.toml").is_file() and (app_dir / "fedsens_app.py").is_file()

    link_port = _free_port()
    link = services(
        "superlink",
        "flower-superlink",
        "--insecure",
        "--disable-runtime-dependency-installation",  # the app's dependencies are this environment's
        "--host",
        "127.0.0.1",
        "--port",
        str(link_port),
    )
    _wait_for_port(link_port, 90, link)
    for client in (0, 1):
        services(
            f"supernode{client}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={client} num-partitions=2",
        )
    cli_home = tmp_path / "home-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(cli_home), "FLWR_TELEMETRY_ENABLED": "0"}
    submitted = subprocess.run(
        [str(BIN / "flwr"), "run", str(app_dir), "loopback"], env=env, capture_output=True, text=True, timeout=180
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    deadline = time.monotonic() + RUN_DEADLINE_S
    while not (out / "summary.json").exists():
        assert link.poll() is None, "the SuperLink exited during the run"
        assert time.monotonic() < deadline, f"no summary.json after {RUN_DEADLINE_S} s; logs in {tmp_path / 'logs'}"
        time.sleep(2)

    rounds, metrics = pd.read_csv(out / "rounds.csv"), pd.read_csv(out / "metrics.csv")
    assert rounds["round"].tolist() == [1, 2]
    assert sorted(metrics["client"]) == [0, 1] and (metrics["round"] == 2).all()
    assert (rounds["up_bytes"] > 0).all() and rounds["acc_mean"].notna().iloc[-1]
    # the deployed run is the built-in run: same seed, partition and initial weights
    config = RunConfig(
        dataset="synthetic", model="vit-nano", clients=2, rounds=2, local_steps=1, join_ratio=0.5, eval_every=2
    )
    builtin = federation.run(config.replace(device="cpu", seed=1, out=str(tmp_path / "builtin")), quiet=True)
    after = builtin.metrics[builtin.metrics["protocol"] == "after-aggregation"]  # what Flower's strategy evaluates
    assert np.abs(np.sort(after["accuracy"]) - np.sort(metrics["accuracy"])).max() <= 1e-5
