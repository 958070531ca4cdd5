"""The ClientApp: one fedsens client per Flower node, trained and evaluated by the method's own hooks.

A node learns which client it is from its node config (`partition-id`, which Flower's simulation
engine sets and `flower-supernode --node-config "partition-id=3"` gives). The method's local tensors
and per-client extra state live in the node's `Context.state` between rounds and are never sent: a
reply carries only the shared tensors and the train size that weights them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsens.personalize.client import ClientContext, RunContext
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import EVAL_STREAM, TRAIN_STREAM, client_context
from fedsens.personalize.engine.tensors import assign, snapshot
from fedsens.personalize.errors import UserError
from fedsens.personalize.flower import records
from fedsens.personalize.methods import Method, get_method

LOCAL_KEY = "fedsens.local"  # Context.state keys: stay on the node
EXTRA_KEY = "fedsens.extra"


@dataclass
class ClientRuntime:
    """What a node builds once per run configuration: the model, its data and the method."""

    run: RunContext
    method: Method
    initial: dict[str, torch.Tensor]  # every tensor as built: where a client's local state starts


# One runtime per configuration and process: a node process serves many messages of one run, and
# rebuilding the dataset and model for each would dominate a tiny round. Read-only after building.
_RUNTIMES: dict[str, ClientRuntime] = {}


def runtime(run_config: Mapping[str, Any]) -> ClientRuntime:
    config = records.config_of(run_config)
    key = json.dumps(records.run_config_of(config), sort_keys=True)
    if key not in _RUNTIMES:
        torch.set_num_threads(int(records.engine_option(run_config, "torch-threads")))
        method = get_method(config)
        # A seeded partition is rebuilt identically on every node; it is written to a scratch folder
        # named by the configuration, so nodes never touch the server's run folder.
        scratch = Path(tempfile.gettempdir()) / "fedsens-flower" / hashlib.sha256(key.encode()).hexdigest()[:16]
        scratch.mkdir(parents=True, exist_ok=True)
        run = build_context(config, method, scratch)
        _RUNTIMES[key] = ClientRuntime(run, method, snapshot(run.named, [*run.local_names, *run.shared_names]))
    return _RUNTIMES[key]


def release_runtimes() -> None:
    """Drop the built runtimes (a simulation in this process is over; a later run rebuilds its own)."""
    _RUNTIMES.clear()


def client_id(context: Context, clients: int) -> int:
    value = context.node_config.get("partition-id")
    if value is None:
        raise UserError('this SuperNode has no client id; start it with --node-config "partition-id=N"')
    cid = int(value)
    if not 0 <= cid < clients:
        raise UserError(f"partition-id {cid} is outside the run's {clients} clients")
    return cid


def _client_state(rt: ClientRuntime, context: Context, cid: int) -> tuple[dict, dict]:
    """The client's local tensors and extra state; on first use exactly what the built-in loop starts from."""
    if LOCAL_KEY in context.state.array_records:
        device = rt.run.device
        local = records.from_record(context.state.array_records[LOCAL_KEY], device)
        return local, records.from_record(context.state.array_records[EXTRA_KEY], device)
    assign(rt.run.named, rt.initial)
    return snapshot(rt.run.named, rt.run.local_names), rt.method.init_client(cid, rt.run.model)


def _keep(context: Context, local: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor]) -> None:
    context.state.array_records[LOCAL_KEY] = records.to_record(local)
    context.state.array_records[EXTRA_KEY] = records.to_record(extra)


def _enter(
    message: Message, context: Context, run_config: Mapping[str, Any], stream: int
) -> tuple[ClientRuntime, ClientContext, dict]:
    """Load the server's shared tensors and this client's own, as the built-in loop does before a client."""
    rt = runtime(run_config)
    cid = client_id(context, rt.run.config.clients)
    round_ = int(records.scalar(message.content, "config", "round"))
    local, extra = _client_state(rt, context, cid)
    assign(rt.run.named, records.from_record(message.content.array_records["arrays"], rt.run.device))
    assign(rt.run.named, local)
    return rt, client_context(rt.run, cid, round_, extra, stream), local


def train(message: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    rt, client, _ = _enter(message, context, run_config, TRAIN_STREAM)
    rt.method.train_client(client)
    if client.nonfinite:  # a result, not a crash: the server stops the run as the built-in loop does
        diverged = MetricRecord({"client": client.client, records.NONFINITE_KEY: client.nonfinite_loss})
        return Message(RecordDict({"metrics": diverged}), reply_to=message)
    _keep(context, snapshot(rt.run.named, rt.run.local_names), client.state)
    content = RecordDict(
        {
            "arrays": records.to_record(snapshot(rt.run.named, rt.run.shared_names)),
            "metrics": MetricRecord({"num-examples": client.train_size, "client": client.client}),
        }
    )
    return Message(content, reply_to=message)


def evaluate(message: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    rt, client, local = _enter(message, context, run_config, EVAL_STREAM)
    result = rt.method.evaluate_client(client)
    _keep(context, local, client.state)  # the built-in loop keeps what evaluation does to the extra state
    metrics = MetricRecord({"client": client.client, "loss": result.loss, "accuracy": result.accuracy, "n": result.n})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def query(message: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """Which fedsens client this node is: the server maps clients to nodes with it."""
    clients = int(run_config.get("clients", 0)) or 1 << 30
    return Message(RecordDict({"node": ConfigRecord({"client": client_id(context, clients)})}), reply_to=message)


def build_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; `run_config` (simulation) is laid under the run config Flower delivers."""
    app = ClientApp()
    base = dict(run_config or {})

    def with_config(handler):
        def handle(message: Message, context: Context) -> Message:
            return handler(message, context, {**base, **context.run_config})

        return handle

    app.train()(with_config(train))
    app.evaluate()(with_config(evaluate))
    app.query()(with_config(query))
    return app
