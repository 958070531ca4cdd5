"""The ServerApp: seeded client sampling, aggregation of the shared tensors by name, evaluation of every
client, and the same run folder the built-in engine writes.

The strategy is a `flwr.serverapp.strategy.Strategy` driven by Flower's own `Strategy.start` loop. It
samples with `federation.sample_clients` and aggregates with the method's `aggregate`, in client order,
so a round sees exactly what the built-in loop's round sees. Bytes are counted from the ArrayRecords
that the train messages and replies actually carry (`ArrayRecord.count_bytes`: array data plus names).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from tqdm import tqdm

from fedsens.personalize import runio, schema
from fedsens.personalize.client import EvalResult, NonFiniteLoss, RunContext
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import Aggregation, sample_clients
from fedsens.personalize.engine.tables import metric_rows, protocol_accuracies, round_row, summary
from fedsens.personalize.engine.tensors import snapshot
from fedsens.personalize.errors import UserError
from fedsens.personalize.flower import records
from fedsens.personalize.methods import Method, get_method

# Per-round bytes of every exchange, beside rounds.csv (whose up/down columns count the training exchange
# as the built-in engine does); evaluation sends the shared tensors to every client as well.
FLOWER_COLUMNS = ["round", "train_down_bytes", "train_up_bytes", "eval_down_bytes", "messages"]


class FedsensStrategy(Strategy):
    """One fedsens method as a Flower strategy; `nodes` maps each fedsens client to its Flower node."""

    def __init__(self, run: RunContext, method: Method, nodes: Mapping[int, int], *, quiet: bool = True):
        self.run, self.method, self.nodes = run, method, dict(nodes)
        self.config: RunConfig = run.config
        self.metrics: list[dict] = []
        self.rounds: list[dict] = []
        self.traffic: list[dict] = []
        self.seconds = 0.0
        self._round: dict[str, Any] = {}
        self._bar = tqdm(total=self.config.rounds, desc=Path(self.config.out).name, disable=quiet, unit="round")

    def close(self) -> None:
        self._bar.close()

    def summary(self) -> None:
        """Flower logs this at start; the run folder's config.json says the rest."""

    def _messages(self, grid: Grid, round_: int, arrays: ArrayRecord, clients: Iterable[int], kind: str) -> list:
        return [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({"round": round_})}),
                dst_node_id=self.nodes[c],
                message_type=kind,
                group_id=str(round_),
            )
            for c in clients
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        participants = sample_clients(self.config, server_round)
        self._round = {
            "started": time.perf_counter(),
            "participants": set(participants),
            "train_down_bytes": arrays.count_bytes() * len(participants),
            "messages": len(participants),
        }
        return self._messages(grid, server_round, arrays, participants, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, None]:
        contents = sorted(_contents(replies, "train"), key=lambda c: records.scalar(c, "metrics", "client"))
        for content in contents:  # the first diverged client in client order, as the built-in loop stops at
            metrics = content.metric_records["metrics"]
            if records.NONFINITE_KEY in metrics:
                loss = records.number(metrics, records.NONFINITE_KEY)
                raise NonFiniteLoss(int(records.number(metrics, "client")), server_round, loss)
        if len(contents) != len(self._round["participants"]):
            raise RuntimeError(f"round {server_round}: {len(contents)} of {len(self._round['participants'])} replied")
        self._round["train_up_bytes"] = sum(c.array_records["arrays"].count_bytes() for c in contents)
        self._round["messages"] += len(contents)
        if not self.run.shared_names:
            return None, None
        aggregation = Aggregation(self.method, [int(records.scalar(c, "metrics", "num-examples")) for c in contents])
        for content in contents:  # in client order, as the built-in loop adds them
            aggregation.add(records.from_record(content.array_records["arrays"]))
        return records.to_record(aggregation.result()), None

    def _evaluates(self, round_: int) -> bool:
        return round_ % self.config.eval_every == 0 or round_ == self.config.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        if not self._evaluates(server_round):
            self._round["eval_down_bytes"] = 0
            return []
        clients = range(self.config.clients)
        self._round["eval_down_bytes"] = arrays.count_bytes() * self.config.clients
        self._round["messages"] += 2 * self.config.clients
        return self._messages(grid, server_round, arrays, clients, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results: dict[int, EvalResult] = {}
        for content in _contents(replies, "evaluate"):
            m = content.metric_records["metrics"]
            loss, accuracy, n = (records.number(m, key) for key in ("loss", "accuracy", "n"))
            results[int(records.number(m, "client"))] = EvalResult(loss, accuracy, int(n))
        if self._evaluates(server_round) and len(results) != self.config.clients:
            raise RuntimeError(f"round {server_round}: {len(results)} of {self.config.clients} clients evaluated")
        clients = sorted(results)
        # Flower evaluates every client after aggregation only (check_protocol refuses the paper's timing)
        rows = metric_rows(
            server_round, clients, [results[c] for c in clients], self._round["participants"], "after-aggregation"
        )
        self.metrics.extend(rows)
        accuracies = protocol_accuracies(rows)
        seconds = time.perf_counter() - self._round["started"]
        self.seconds += seconds
        up, down = self._round["train_up_bytes"], self._round["train_down_bytes"]
        self.rounds.append(
            round_row(server_round, accuracies, self.config.eval_protocol, up=up, down=down, seconds=seconds)
        )
        acc = accuracies["after-aggregation"]
        self.traffic.append({"round": server_round, **{k: self._round[k] for k in FLOWER_COLUMNS[1:]}})
        self._bar.update(1)
        if len(acc):
            self._bar.set_postfix(acc=f"{np.nanmean(acc):.3f}")
        return MetricRecord({"acc_mean": float(np.nanmean(acc))}) if len(acc) else None


def _contents(replies: Iterable[Message], what: str) -> list[RecordDict]:
    contents = []
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"a client failed in {what}: {reply.error.reason or ''}")
        contents.append(reply.content)
    return contents


def map_clients(grid: Grid, clients: int, timeout: float) -> dict[int, int]:
    """Wait for the nodes to connect, then ask each which fedsens client it is (its `partition-id`)."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < clients:
        if time.monotonic() > deadline:
            raise UserError(f"only {len(list(grid.get_node_ids()))} of {clients} SuperNodes connected in {timeout} s")
        time.sleep(0.5)
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in grid.get_node_ids()]
    nodes: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise UserError(f"node {reply.metadata.src_node_id} could not say its client id: {reply.error.reason}")
        c = int(records.scalar(reply.content, "node", "client"))
        if c in nodes:
            raise UserError(f"two SuperNodes claim partition-id {c}; give each node its own")
        nodes[c] = reply.metadata.src_node_id
    missing = sorted(set(range(clients)) - set(nodes))
    if missing:
        raise UserError(f"no SuperNode serves clients {missing}; start one per client with partition-id=N")
    return nodes


def serve(grid: Grid, run_config: Mapping[str, Any]) -> dict:
    """One federated run over `grid` into the run config's `out`; returns the summary."""
    config = records.config_of(run_config)
    timeout = float(records.engine_option(run_config, "reply-timeout"))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    method = get_method(config)
    run = build_context(config, method, out)
    runio.write_json(
        out / "config.json",
        {
            "config": dataclasses.asdict(config),
            "engine": "flower",
            "versions": {**runio.versions(), "flwr": _flwr_version()},
            "git_revision": runio.git_revision(),
        },
    )
    columns = schema.STAGED_PARTS_COLUMNS if "stage" in run.parts.columns else schema.PARTS_COLUMNS
    runio.write_table(out / "parts.csv", run.parts.to_dict("records"), columns)
    nodes = map_clients(grid, config.clients, timeout)
    strategy = FedsensStrategy(run, method, nodes, quiet=bool(records.engine_option(run_config, "quiet")))
    diverged: dict | None = None
    try:
        strategy.start(grid, records.to_record(snapshot(run.named, run.shared_names)), config.rounds, timeout=timeout)
    except NonFiniteLoss as err:  # a result, not a crash: the tables hold the rounds before it
        diverged = {"round": err.round, "client": err.client, "loss": err.loss, "message": str(err)}
    finally:
        strategy.close()
    runio.write_table(out / "metrics.csv", strategy.metrics, runio.TABLE_COLUMNS["metrics"])
    rounds = runio.write_table(out / "rounds.csv", strategy.rounds, runio.TABLE_COLUMNS["rounds"])
    runio.write_table(out / "flower.csv", strategy.traffic, FLOWER_COLUMNS)
    record = summary(run, method, rounds, rounds_done=len(strategy.rounds), seconds=strategy.seconds, diverged=diverged)
    runio.write_json(out / "summary.json", {**record, "engine": "flower"})
    return record


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def build_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; `run_config` (simulation) is laid under the run config Flower delivers."""
    app = ServerApp()
    base = dict(run_config or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, {**base, **context.run_config})

    return app
