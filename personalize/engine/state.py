"""Where a run stands (`RunState`): a fresh start, a resume from its checkpoint, and the checkpoint itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fedsens.personalize import runio
from fedsens.personalize.client import RunContext
from fedsens.personalize.clientstore import ClientStore
from fedsens.personalize.config import FREE_SETTINGS, RunConfig
from fedsens.personalize.engine.tensors import snapshot
from fedsens.personalize.errors import UserError
from fedsens.personalize.methods import Method


@dataclass
class RunState:
    """Where a run stands after `round`: what a checkpoint holds (not the history of its metrics)."""

    round: int
    seconds: float
    shared: dict[str, torch.Tensor]
    local: ClientStore  # the clients' local tensors, clients x shape per name
    extra: ClientStore  # the method's extra per-client state (init_client), the same way
    table_sizes: dict[str, int] = field(default_factory=dict)  # bytes of each CSV table at `round`

    def checkpoint(self) -> dict:
        return {
            "round": self.round,
            "seconds": self.seconds,
            "shared": self.shared,
            "local": self.local.checkpoint(),
            "extra": self.extra.checkpoint(),
            "table_sizes": self.table_sizes,
        }


def store_folder(ctx: RunContext, kind: str) -> Path | None:
    """Where the disk client store keeps `kind` (local | extra); None for the memory store."""
    return ctx.out / "clients" / kind if ctx.config.client_store == "disk" else None


def fresh_state(ctx: RunContext, method: Method) -> RunState:
    """Round 0: every client starts from the model as built, with the method's initial extra state."""
    clients = ctx.config.clients
    local = ClientStore.build(clients, snapshot(ctx.named, ctx.local_names), folder=store_folder(ctx, "local"))
    first = method.init_client(0, ctx.model)
    extra = ClientStore.build(
        clients, first, lambda c: method.init_client(c, ctx.model) if c else first, folder=store_folder(ctx, "extra")
    )
    return RunState(0, 0.0, snapshot(ctx.named, ctx.shared_names), local, extra)


def comparable_settings(config: RunConfig) -> dict:
    """The settings a continued run must share with the saved one."""
    d = dataclasses.asdict(config)
    for key in FREE_SETTINGS:  # these may differ when a run is continued
        d.pop(key)
    return d


# What a resumed run whose tables no longer match its checkpoint can do: its history is gone.
RESUME_FIX = "the run cannot be resumed from it: start over with --overwrite (or restore the file)"


def start_state(ctx: RunContext, method: Method, *, resume: bool, overwrite: bool) -> RunState:
    """A fresh state (the folder's old tables removed), or, with `resume`, the state of the folder's
    checkpoint, its tables cut back to the rows it recorded."""
    checkpoint = ctx.out / "checkpoint.pt"
    if not runio.has_checkpoint(checkpoint) or overwrite:
        for table in ctx.out.glob("*.csv"):
            if table.name != "parts.csv":
                table.unlink()
        for stale in runio.checkpoint_files(checkpoint):  # a start over must never fall back to them
            stale.unlink(missing_ok=True)
        return fresh_state(ctx, method)
    if not resume:
        raise UserError(f"{ctx.out} already holds a run; pass --resume to continue it or --overwrite to start over")
    fell_back: list[str] = []
    saved_state = runio.load_checkpoint(checkpoint, notify=fell_back.append)
    for line in fell_back:
        tqdm.write(line)
    # The checkpoint's own record of its settings: a damaged or edited config.json neither blocks nor fools this.
    saved = RunConfig.upgrade_saved(runio.saved_settings(saved_state, ctx.out / "config.json"))
    wanted = comparable_settings(ctx.config)
    differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if differ:
        raise UserError(
            f"{ctx.out} holds a run with other settings ({'; '.join(differ)}); "
            "use another --out, or --overwrite to start over"
        )
    if "table_sizes" not in saved_state:
        raise UserError(f"{checkpoint} was written by an older fedsens (per-client state); rerun with --overwrite")
    if int(saved_state["round"]) > ctx.config.rounds:  # its tables would report the longer run as this one
        raise UserError(
            f"{ctx.out} already holds {int(saved_state['round'])} rounds, more than the {ctx.config.rounds} asked; "
            "ask for at least that many (--rounds), use another --out, or --overwrite to start over"
        )
    if saved.get("rounds") is not None and ctx.config.rounds > saved["rounds"]:
        tqdm.write(f"{ctx.out}: extending the run from {saved['rounds']} to {ctx.config.rounds} rounds")
    local, extra = _resumed_stores(ctx, method, checkpoint, damaged=bool(fell_back))
    local.replay(saved_state["local"])
    extra.replay(saved_state["extra"])
    shared = {n: t.to(ctx.device) for n, t in saved_state["shared"].items()}
    sizes = dict(saved_state["table_sizes"])
    for table in ctx.out.glob("*.csv"):  # rows written after the checkpoint are written again
        if table.name != "parts.csv":
            runio.truncate(table, sizes.get(table.stem, 0))
    runio.check_resumed_tables(ctx.out, sizes, int(saved_state["round"]), RESUME_FIX)
    return RunState(int(saved_state["round"]), float(saved_state["seconds"]), shared, local, extra, sizes)


def _resumed_stores(ctx: RunContext, method: Method, checkpoint: Path, *, damaged: bool) -> tuple[ClientStore, ...]:
    """The client stores a resume replays the checkpoint's rows into."""
    if ctx.config.client_store != "disk":
        state = fresh_state(ctx, method)
        return state.local, state.extra
    if damaged:  # the mapped files may already hold rows written after the previous checkpoint
        raise UserError(
            f"{checkpoint} is damaged and the disk client store has moved past the previous checkpoint; "
            "start over with --overwrite"
        )
    # The mapped files already hold the clients' state up to the checkpoint, give or take the rows it
    # recorded (re-applied by the caller); nothing needs building.
    local_layout = {n: (tuple(t.shape), t.dtype) for n, t in snapshot(ctx.named, ctx.local_names).items()}
    extra_layout = {n: (tuple(t.shape), t.dtype) for n, t in method.init_client(0, ctx.model).items()}
    local_folder, extra_folder = store_folder(ctx, "local"), store_folder(ctx, "extra")
    assert local_folder is not None and extra_folder is not None  # the disk store has its folders
    return (
        ClientStore.open(ctx.config.clients, local_layout, local_folder),
        ClientStore.open(ctx.config.clients, extra_layout, extra_folder),
    )


def checkpoint_every(ctx: RunContext, state: RunState) -> int:
    """How often (in rounds) the checkpoint is written."""
    if ctx.config.checkpoint_every:
        return ctx.config.checkpoint_every
    # Measured: torch.save writes ~0.4 GB/s here; a whole memory store past 256 MB would cost
    # more than a small round, so it is written every 10th round (the disk store writes only changed rows).
    if ctx.config.client_store == "memory" and state.local.nbytes + state.extra.nbytes > 256 * 2**20:
        return 10
    return 1


def save_checkpoint(ctx: RunContext, state: RunState) -> None:
    """The checkpoint of `state`, then the client stores committed to it."""
    runio.save_checkpoint(ctx.out / "checkpoint.pt", {**state.checkpoint(), **runio.settings_record(ctx.config)})
    state.local.commit()
    state.extra.commit()
