"""`fedsens train --engine flower`: one run on Flower's simulation engine, into the usual run folder.

`flwr.simulation.run_simulation` runs the ServerApp in a thread of this process and one virtual
SuperNode per fedsens client (its `partition-id` is the client id); messages go through Flower's
in-memory SuperLink state and grid as in any Flower simulation. What executes the ClientApps is the
simulation backend. Flower 1.42 ships one, Ray, and starting and stopping Ray costs about 110 s on this
loaded 2-core machine for a run whose rounds take 3 s; so `--engine flower` (backend "inprocess") runs
the ClientApps in this process through Flower's own `Backend` interface, one message at a time, and
`--engine flower-ray` uses Flower's Ray backend (one actor per CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch

from fedsens.personalize import runio
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunResult


def _quiet_services() -> None:
    # No telemetry or usage reports from a research run (and nothing outside this machine is reachable).
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


BACKENDS = ("inprocess", "ray")


def _inprocess_backend_class():
    from flwr.server.superlink.fleet.vce.backend import Backend

    class InProcessBackend(Backend):
        """Flower's simulation Backend interface, running each ClientApp call in this process, in turn."""

        def __init__(self, backend_config) -> None:
            self._lock = threading.Lock()
            self._app_fn: Callable | None = None

        def build(self, app_fn) -> None:
            self._app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return 1

        def is_worker_idle(self) -> bool:
            return not self._lock.locked()

        def terminate(self) -> None:
            self._app_fn = None

        def process_message(self, message, context):
            assert self._app_fn is not None, "build() comes before process_message()"
            with self._lock:
                return self._app_fn()(message, context), context

    return InProcessBackend


@contextlib.contextmanager
def _backend(name: str) -> Iterator[None]:
    """Flower 1.42's simulation engine builds its backend as `raybackend.RayBackend(config)`; for the
    in-process backend that name points at ours for the duration of one run and is always restored."""
    if name == "ray":
        yield
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = _inprocess_backend_class()  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]


@contextlib.contextmanager
def _flower_log_level(level: int) -> Iterator[None]:
    """Flower logs every round at INFO; the ServerApp's progress bar and the tables say the same."""
    logger = logging.getLogger("flwr")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def check_protocol(config: RunConfig) -> None:
    """Flower's strategy evaluates every client after aggregation; the paper's timing is the built-in loop's."""
    if config.eval_protocol != "after-aggregation":
        raise UserError(
            f"--eval-protocol {config.eval_protocol}: the Flower engine evaluates every client after aggregation "
            "only; pass --eval-protocol after-aggregation, or use the built-in engine for the paper's timing"
        )


def run_simulation(
    config: RunConfig, *, overwrite: bool = False, quiet: bool = False, backend: str = "inprocess"
) -> RunResult:
    """One federated run on Flower's simulation engine; the same tables as `federation.run`."""
    try:
        from flwr.simulation import run_simulation as flower_simulation
    except ImportError:
        raise UserError('--engine flower needs Flower: pip install "fedsens[flower]"') from None
    from fedsens.personalize.flower import records
    from fedsens.personalize.flower.client import build_client_app, release_runtimes
    from fedsens.personalize.flower.server import build_server_app

    check_protocol(config)
    out = Path(config.out)
    if (out / "summary.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a run; pass --overwrite to start over (--engine flower cannot resume)")
    _quiet_services()
    run_config = records.run_config_of(config, **{"torch-threads": torch.get_num_threads(), "quiet": quiet})
    if backend not in BACKENDS:
        raise UserError(f"unknown Flower simulation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    workers = min(config.clients, os.cpu_count() or 1)
    try:
        with _backend(backend), _flower_log_level(logging.WARNING):
            flower_simulation(
                server_app=build_server_app(run_config),
                client_app=build_client_app(run_config),
                num_supernodes=config.clients,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    # Ray: loopback only, no dashboard, an actor pool sized by num_cpus
                    "init_args": {"num_cpus": workers, "include_dashboard": False, "_node_ip_address": "127.0.0.1"},
                },
                verbose_logging=False,
            )
    finally:
        release_runtimes()
    return read_run(out)


def read_run(out: Path) -> RunResult:
    """The tables a finished Flower run wrote (the ServerApp may have run in another process)."""
    if not (out / "summary.json").exists():
        raise RuntimeError(f"the Flower run did not finish: {out / 'summary.json'} is missing")
    flower = pd.read_csv(out / "flower.csv")
    return RunResult(
        out,
        pd.read_csv(out / "rounds.csv"),
        pd.read_csv(out / "metrics.csv"),
        runio.read_json(out / "summary.json"),
        {"flower": flower},
    )


# `fedsens train --engine NAME` -> the simulation backend that runs the ClientApps
ENGINES = {"flower": "inprocess", "flower-ray": "ray"}


def run_on_flower(engine: str, config: RunConfig, *, resume: bool, overwrite: bool, quiet: bool) -> RunResult:
    if engine not in ENGINES:
        raise UserError(f"--engine must be builtin, {' or '.join(ENGINES)} (got {engine!r})")
    if resume:
        raise UserError(f"--resume needs --engine builtin; a {engine} run starts over (--overwrite)")
    return run_simulation(config, overwrite=overwrite, quiet=quiet, backend=ENGINES[engine])
