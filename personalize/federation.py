"""The built-in round loop of one federated run: sample, train locally, aggregate the shared parts, evaluate.

ONE model lives on the device. The server keeps the shared tensors; each client keeps only its
local tensors (and whatever extra state its method needs), so 1,000 clients cost 1,000 x the local
part, not 1,000 models. Every random draw is seeded from (seed, round, client), which is what lets a
resumed run end exactly where an uninterrupted one would.

The loop alone lives here; the pieces it calls (context, state, one round, evaluation, tables) are the
public functions of `fedsens.personalize.engine`, which every engine shares.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fedsens.personalize import interrupts, runio, runlock, schema
from fedsens.personalize import model as model_lib
from fedsens.personalize.client import ClientContext, EvalResult, NonFiniteLoss, RunContext
from fedsens.personalize.config import FREE_SETTINGS, RunConfig
from fedsens.personalize.engine import together
from fedsens.personalize.engine.context import build_context, load_dataset, partition_options, resolve_device
from fedsens.personalize.engine.protocols import after_aggregation_rows, evaluate_both, previous_after_rows
from fedsens.personalize.engine.rounds import sample_clients, train_round
from fedsens.personalize.engine.state import RunState, checkpoint_every, save_checkpoint, start_state
from fedsens.personalize.engine.tables import TableWriter, accuracy_stats, protocol_accuracies, read_tables, round_row
from fedsens.personalize.engine.tables import summary as run_summary
from fedsens.personalize.engine.tensors import assign, snapshot
from fedsens.personalize.hooks import Hook, table_of
from fedsens.personalize.methods import Method, get_method

# Re-exported: the public names of one run, importable from the loop as before.
__all__ = [
    "FREE_SETTINGS",
    "ClientContext",
    "EvalResult",
    "NonFiniteLoss",
    "RunConfig",
    "RunContext",
    "RunResult",
    "RunState",
    "accuracy_stats",
    "assign",
    "load_dataset",
    "partition_options",
    "resolve_device",
    "run",
    "sample_clients",
    "snapshot",
]


@dataclass(frozen=True)
class RunResult:
    out: Path
    rounds: pd.DataFrame
    metrics: pd.DataFrame
    summary: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def run(
    config: RunConfig, hooks: Sequence[Hook] = (), *, resume: bool = False, overwrite: bool = False, quiet: bool = False
) -> RunResult:
    """One federated run into `config.out`; resumable from the checkpoint written after every round.

    The folder is locked for the run's duration: a second process on it is refused (RunInUse).
    """
    out = runlock.folder(config.out)
    with runlock.hold(out, what="train", notify=tqdm.write):
        return _run_locked(config, out, hooks, resume=resume, overwrite=overwrite, quiet=quiet)


def _run_locked(
    config: RunConfig, out: Path, hooks: Sequence[Hook], *, resume: bool, overwrite: bool, quiet: bool
) -> RunResult:
    method = get_method(config)
    ctx = build_context(config, method, out)
    state = start_state(ctx, method, resume=resume, overwrite=overwrite)
    runio.write_json(
        out / "config.json",
        {"config": dataclasses.asdict(config), "versions": runio.versions(), "git_revision": runio.git_revision()},
    )
    parts_columns = schema.STAGED_PARTS_COLUMNS if "stage" in ctx.parts.columns else schema.PARTS_COLUMNS
    runio.write_table(out / "parts.csv", ctx.parts.to_dict("records"), parts_columns)
    if not quiet:
        tqdm.write(f"{out}: {model_lib.describe(ctx.parts)}")
    one_at_a_time = together.sequential_reason(ctx, method) if config.client_batch > 1 else None
    if one_at_a_time:
        tqdm.write(f"{out}: --client-batch {config.client_batch}: {one_at_a_time}; its clients train one at a time")
    for hook in hooks:
        hook.on_run_start(ctx)
    diverged = _rounds(ctx, method, state, hooks, quiet=quiet)
    frames = read_tables(out, ("metrics", "rounds", *filter(None, map(table_of, hooks))))
    summary = run_summary(
        ctx, method, frames["rounds"], rounds_done=state.round, seconds=state.seconds, diverged=diverged
    )
    if diverged is not None:
        tqdm.write(f"{out}: diverged: {diverged['message']}; the tables hold the rounds before it")
    runio.write_json(out / "summary.json", summary)
    others = {k: v for k, v in frames.items() if k not in ("rounds", "metrics")}
    return RunResult(out, frames["rounds"], frames["metrics"], summary, others)


def _rounds(ctx: RunContext, method: Method, state: RunState, hooks: Sequence[Hook], *, quiet: bool) -> dict | None:
    """The rounds after `state.round`, each written to the tables and checkpointed; a diverged round's
    record (the tables and the checkpoint then stay at the last good round), else None."""
    config = ctx.config
    writer = TableWriter(ctx.out)
    every = checkpoint_every(ctx, state)
    previous = previous_after_rows(ctx.out, state.round)
    bar = tqdm(total=config.rounds, initial=state.round, desc=ctx.out.name, disable=quiet, unit="round")
    try:
        for round_ in range(state.round + 1, config.rounds + 1):
            interrupts.check()  # a Ctrl-C swallowed in the previous round (e.g. in a finalizer) stops here
            started = time.perf_counter()
            start_shared = state.shared
            evaluated = round_ % config.eval_every == 0 or round_ == config.rounds
            try:
                training = train_round(ctx, method, state, round_, hooks, evaluate=evaluated)
            except NonFiniteLoss as err:  # a result, not a crash
                return {"round": err.round, "client": err.client, "loss": err.loss, "message": str(err)}
            metrics = (
                evaluate_both(ctx, method, state, round_, training.trained, start_shared, previous) if evaluated else []
            )
            previous = after_aggregation_rows(metrics)
            del start_shared
            rows = {"metrics": metrics, **_hook_rows(hooks, round_)}
            accuracies = protocol_accuracies(metrics)
            exchanged, seconds = training.exchanged_bytes, time.perf_counter() - started
            headline = round_row(
                round_, accuracies, config.eval_protocol, up=exchanged, down=exchanged, seconds=seconds
            )
            writer.append(state, {**rows, "rounds": [headline]})
            state.round, state.seconds = round_, state.seconds + seconds
            if round_ % every == 0 or round_ == config.rounds:
                save_checkpoint(ctx, state)
            bar.update(1)
            if len(accuracies[config.eval_protocol]):
                bar.set_postfix(acc=f"{np.nanmean(accuracies[config.eval_protocol]):.3f}")
    finally:
        bar.close()
    return None


def _hook_rows(hooks: Sequence[Hook], round_: int) -> dict[str, list[dict]]:
    """Every hook's end-of-round call; the rows of those that write a table, by table name."""
    rows = {}
    for hook in hooks:
        hook_rows = list(hook.on_round_end(round_))
        table = table_of(hook)
        if table:
            rows[table] = hook_rows
    return rows
