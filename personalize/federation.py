"""The round loop of one federated run: sample, train locally, aggregate the shared parts, evaluate.

ONE model lives on the device. The server keeps the shared tensors; each client keeps only its
local tensors (and whatever extra state its method needs), so 1,000 clients cost 1,000 x the local
part, not 1,000 models. Every random draw is seeded from (seed, round, client), which is what lets a
resumed run end exactly where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from fedsens.personalize import datasets as dataset_lib
from fedsens.personalize import model as model_lib
from fedsens.personalize import partition as partition_lib
from fedsens.personalize import runio, runlock, schema
from fedsens.personalize.client import ClientContext, EvalResult, NonFiniteLoss, RunContext
from fedsens.personalize.clientstore import ClientStore
from fedsens.personalize.config import FREE_SETTINGS, RunConfig
from fedsens.personalize.datasets import synthetic
from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.errors import UserError
from fedsens.personalize.evaluation import RunningMean, evaluate_clients, uses_weighted_mean
from fedsens.personalize.hooks import Hook, table_of
from fedsens.personalize.inputs import BatchPreparer, seeded_generator
from fedsens.personalize.methods import Method, get_method

# Re-exported: the public names of one run, importable from the loop as before.
__all__ = ["ClientContext", "EvalResult", "NonFiniteLoss", "RunConfig", "RunContext", "RunResult", "RunState", "run"]


@dataclass(frozen=True)
class RunResult:
    out: Path
    rounds: pd.DataFrame
    metrics: pd.DataFrame
    summary: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but none is available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name} asks for a GPU this machine lacks; it has {torch.cuda.device_count()}")
    return device


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent floating buffer by name: what a client state is made of."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    named.update({n: b for n, b in model.named_buffers() if n not in named})
    return named


def _split_names(model: nn.Module, local_params: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Local tensors = the spec's parameters plus the buffers of modules that own a local parameter."""
    wanted = set(local_params)
    owners = {name.rsplit(".", 1)[0] for name in wanted}
    params = {name for name, _ in model.named_parameters()}
    local: list[str] = []
    shared: list[str] = []
    for name in _tensors(model):
        is_local = name in wanted or (name not in params and name.rsplit(".", 1)[0] in owners)
        (local if is_local else shared).append(name)
    return tuple(local), tuple(shared)


def snapshot(named: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the named tensors (`named`: the run's name -> tensor map, built once)."""
    return {n: named[n].detach().clone() for n in names}


@torch.no_grad()
def assign(named: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    for name, value in values.items():
        named[name].copy_(value)


def sample_clients(config: RunConfig, round_: int) -> list[int]:
    k = max(1, int(round(config.join_ratio * config.clients)))
    rng = np.random.default_rng([config.seed, round_, 1])
    return sorted(int(c) for c in rng.choice(config.clients, size=k, replace=False))


def accuracy_stats(acc: np.ndarray) -> dict[str, float]:
    acc = acc[~np.isnan(acc)]
    if len(acc) == 0:
        return {k: float("nan") for k in ("acc_mean", "acc_std", "acc_p10", "acc_min", "jain")}
    squares = float((acc**2).sum())
    return {
        "acc_mean": float(acc.mean()),
        "acc_std": float(acc.std()),
        "acc_p10": float(np.percentile(acc, 10)),
        "acc_min": float(acc.min()),
        "jain": float(acc.sum() ** 2 / (len(acc) * squares)) if squares else 1.0,
    }


def partition_options(config: RunConfig) -> dict[str, Any]:
    """The `partition.make` keywords a run's settings ask for (the run and the preflight draw the same)."""
    return dict(
        scheme=config.scheme,
        num_clients=config.clients,
        seed=config.seed,
        alpha=config.alpha,
        classes_per_client=config.classes_per_client,
        test_fraction=dataset_lib.test_fraction(config.dataset, config.test_fraction),
        min_samples=config.min_samples,
        rule=config.partition_rule,
    )


def _load_partition(config: RunConfig, dataset: ImageSet, out: Path) -> partition_lib.Partition:
    target = out / "partition.json"
    if config.scheme.endswith(".json"):
        source = Path(config.scheme)
        if not source.is_file():
            raise UserError(f"partition file {source} does not exist; write one with `fedsens data split`")
        part = partition_lib.load(source)
        if source.resolve() != target.resolve():
            target.write_text(source.read_text())
    else:
        part = partition_lib.load_or_make(
            target,
            dataset.labels,
            dataset.domains,
            **partition_options(config),
            dataset=config.dataset,
            classes=dataset.classes,
            domain_names=dataset.domain_names,
        )
    if part.num_clients != config.clients:
        raise UserError(f"the partition has {part.num_clients} clients but --clients is {config.clients}")
    return part


def load_dataset(config: RunConfig) -> ImageSet:
    """The run's dataset; one that decodes its images (Office-Home) decodes them at the model's input size."""
    spec = dataset_lib.get(config.dataset)
    input_size = None
    if spec.decodes_at is not None:
        # Without a fixed native size the images count as large: a small preset then caps its input at 32 px.
        native = spec.image_size or 1024
        input_size = model_lib.input_spec(config.model, data_channels=spec.channels or 3, data_size=native).img_size
    options = {}
    if config.dataset == "synthetic":  # a population of any size from the command line
        options = synthetic.population_options(
            config.clients, config.synthetic_per_client, config.synthetic_size, config.synthetic_classes
        )
    return dataset_lib.load_for_run(
        config.dataset, config.data_root, input_size=input_size, verify=config.verify, **options
    )


def _build_context(config: RunConfig, method: Method, out: Path) -> RunContext:
    device = resolve_device(config.device)
    dataset = load_dataset(config)
    part = _load_partition(config, dataset, out)
    spec = model_lib.input_spec(config.model, data_channels=dataset.channels, data_size=dataset.image_size)
    model = model_lib.build(
        config.model, dataset.num_classes, spec.in_chans, spec.img_size, patch_size=spec.patch_size, seed=config.seed
    )
    with torch.random.fork_rng(devices=[]):  # plugins are initialised from the run's seed too
        torch.manual_seed(config.seed + 1)
        method.prepare_model(model)
    model.to(device)
    table = model_lib.manifest(model, method.local_spec())
    local, shared = _split_names(model, table.loc[table["local"], "param"].tolist())
    prepare = BatchPreparer(spec, config.augment_shift, config.augment_scale)
    return RunContext(
        config,
        model,
        device,
        dataset,
        part,
        table,
        prepare,
        dataset.images.to(device),
        dataset.labels.to(device),
        local,
        shared,
        out,
        _tensors(model),
    )


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


def _store_folder(ctx: RunContext, kind: str) -> Path | None:
    return ctx.out / "clients" / kind if ctx.config.client_store == "disk" else None


def _fresh_state(ctx: RunContext, method: Method) -> RunState:
    clients = ctx.config.clients
    local = ClientStore.build(clients, snapshot(ctx.named, ctx.local_names), folder=_store_folder(ctx, "local"))
    first = method.init_client(0, ctx.model)
    extra = ClientStore.build(
        clients, first, lambda c: method.init_client(c, ctx.model) if c else first, folder=_store_folder(ctx, "extra")
    )
    return RunState(0, 0.0, snapshot(ctx.named, ctx.shared_names), local, extra)


def _comparable(config: RunConfig) -> dict:
    d = dataclasses.asdict(config)
    for key in FREE_SETTINGS:  # these may differ when a run is continued
        d.pop(key)
    return d


def _start_state(ctx: RunContext, method: Method, resume: bool, overwrite: bool) -> RunState:
    checkpoint = ctx.out / "checkpoint.pt"
    if not checkpoint.exists() or overwrite:
        for table in ctx.out.glob("*.csv"):
            if table.name != "parts.csv":
                table.unlink()
        return _fresh_state(ctx, method)
    if not resume:
        raise UserError(f"{ctx.out} already holds a run; pass --resume to continue it or --overwrite to start over")
    saved = runio.read_json(ctx.out / "config.json")["config"]
    wanted = _comparable(ctx.config)
    differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if differ:
        raise UserError(
            f"{ctx.out} holds a run with other settings ({'; '.join(differ)}); "
            "use another --out, or --overwrite to start over"
        )
    fell_back: list[str] = []
    saved_state = runio.load_checkpoint(checkpoint, notify=fell_back.append)
    for line in fell_back:
        tqdm.write(line)
    if "table_sizes" not in saved_state:
        raise UserError(f"{checkpoint} was written by an older fedsens (per-client state); rerun with --overwrite")
    if int(saved_state["round"]) > ctx.config.rounds:  # its tables would report the longer run as this one
        raise UserError(
            f"{ctx.out} already holds {int(saved_state['round'])} rounds, more than the {ctx.config.rounds} asked; "
            "ask for at least that many (--rounds), use another --out, or --overwrite to start over"
        )
    if saved.get("rounds") is not None and ctx.config.rounds > saved["rounds"]:
        tqdm.write(f"{ctx.out}: extending the run from {saved['rounds']} to {ctx.config.rounds} rounds")
    if ctx.config.client_store == "disk":
        if fell_back:  # the mapped files may already hold rows written after the previous checkpoint
            raise UserError(
                f"{checkpoint} is damaged and the disk client store has moved past the previous checkpoint; "
                "start over with --overwrite"
            )
        # The mapped files already hold the clients' state up to the checkpoint, give or take the
        # rows it recorded (re-applied below); nothing needs building.
        layout = {n: (tuple(t.shape), t.dtype) for n, t in snapshot(ctx.named, ctx.local_names).items()}
        local = ClientStore.open(ctx.config.clients, layout, _store_folder(ctx, "local"))  # type: ignore[arg-type]
        first = method.init_client(0, ctx.model)
        extra_layout = {n: (tuple(t.shape), t.dtype) for n, t in first.items()}
        extra = ClientStore.open(ctx.config.clients, extra_layout, _store_folder(ctx, "extra"))  # type: ignore[arg-type]
    else:
        state = _fresh_state(ctx, method)
        local, extra = state.local, state.extra
    local.replay(saved_state["local"])
    extra.replay(saved_state["extra"])
    shared = {n: t.to(ctx.device) for n, t in saved_state["shared"].items()}
    sizes = dict(saved_state["table_sizes"])
    for table in ctx.out.glob("*.csv"):  # rows written after the checkpoint are written again
        if table.name != "parts.csv":
            runio.truncate(table, sizes.get(table.stem, 0))
    return RunState(int(saved_state["round"]), float(saved_state["seconds"]), shared, local, extra, sizes)


def _client(ctx: RunContext, state: RunState, c: int, round_: int, stream: int) -> ClientContext:
    """Load client c's tensors into the model and give it its context for this round."""
    assign(ctx.named, state.local.client(c))
    extra = state.extra.client(c)
    return ClientContext(ctx, c, round_, extra, seeded_generator(ctx.config.seed, round_, c, stream))


def _metric_rows(
    round_: int, clients: Sequence[int], results: Sequence[EvalResult], participants: set[int], protocol: str
) -> list[dict]:
    return [
        {
            "round": round_,
            "client": c,
            "split": "test",
            "loss": result.loss,
            "accuracy": result.accuracy,
            "n": result.n,
            "participated": c in participants,
            "protocol": protocol,
        }
        for c, result in zip(clients, results)
    ]


def _evaluate_all(ctx: RunContext, method: Method, state: RunState, round_: int, participants: set[int]) -> list[dict]:
    """Every client with the round's aggregated shared tensors (the after-aggregation protocol), batched."""
    everyone = list(range(ctx.config.clients))
    results = evaluate_clients(ctx, method, round_, everyone, state.shared, state.local, state.extra)
    return _metric_rows(round_, everyone, results, participants, "after-aggregation")


def _evaluate_both(
    ctx: RunContext,
    method: Method,
    state: RunState,
    round_: int,
    trained: Mapping[int, EvalResult],
    start_shared: Mapping[str, torch.Tensor],
    previous: Mapping[int, dict],
) -> list[dict]:
    """Both evaluation protocols of one round (schema.EVAL_PROTOCOLS).

    after-aggregation: every client with the round's aggregated shared tensors (batched).
    paper (the public FedPerfix code's timing): each participant right after its local training, before
    aggregation (`trained`, evaluated in `_train_round`); every other client with the start-of-round
    shared tensors, i.e. the previous round's aggregated model, so its row is copied from the previous
    round's after-aggregation row (`previous`) when that round was evaluated (FedBABU's pre-evaluation
    fine-tuning then drew its batches with the previous round's seed) and evaluated otherwise. Only the
    participants cost an extra evaluation.
    """
    participants = set(trained)
    everyone = list(range(ctx.config.clients))
    after = _evaluate_all(ctx, method, state, round_, participants)
    waiting = [c for c in everyone if c not in participants]
    copied = [
        {**previous[c], "round": round_, "participated": False, "protocol": "paper"} for c in waiting if c in previous
    ]
    fresh = [c for c in waiting if c not in previous]
    fresh_results = (
        evaluate_clients(ctx, method, round_, fresh, start_shared, state.local, state.extra) if fresh else []
    )
    paper = [
        *_metric_rows(round_, list(trained), list(trained.values()), participants, "paper"),
        *_metric_rows(round_, fresh, fresh_results, participants, "paper"),
        *copied,
    ]
    return after + sorted(paper, key=lambda r: r["client"])


def _previous_after_rows(ctx: RunContext, round_: int) -> dict[int, dict]:
    """A resumed run's after-aggregation rows of its last finished round (from metrics.csv), which the
    paper protocol copies for the next round's non-participants, exactly as an uninterrupted run does."""
    path = ctx.out / "metrics.csv"
    if round_ < 1 or not path.exists() or path.stat().st_size == 0:
        return {}
    table = pd.read_csv(path)
    rows = table[(table["round"] == round_) & (table["protocol"] == "after-aggregation")]
    return {int(r["client"]): r for r in rows.to_dict("records")}


def _train_round(
    ctx: RunContext, method: Method, state: RunState, round_: int, hooks: Sequence, evaluate: bool = False
) -> tuple[list[int], int, dict[int, EvalResult]]:
    """Train the round's clients and aggregate; returns the participants, the bytes each way and, when the
    round is `evaluate`d, each participant's test result right after its local training (the paper protocol)."""
    participants = sample_clients(ctx.config, round_)
    weights = [len(ctx.partition.train[c]) for c in participants]
    running = RunningMean(weights) if uses_weighted_mean(method) else None
    collected: list[dict[str, torch.Tensor]] = []
    trained: dict[int, EvalResult] = {}
    for c in participants:
        assign(ctx.named, state.shared)
        client = _client(ctx, state, c, round_, 1)
        for hook in hooks:
            hook.on_client_start(round_, c, ctx.model)
        method.train_client(client)
        if client.nonfinite:
            raise NonFiniteLoss(c, round_, client.nonfinite_loss)
        for hook in hooks:
            hook.on_client_end(round_, c, ctx.model)
        state.local.put(c, {n: ctx.named[n] for n in ctx.local_names})
        state.extra.put(c, client.state)
        shared_now = {n: ctx.named[n] for n in ctx.shared_names}
        if running is not None:
            running.add(shared_now)
        else:
            collected.append(snapshot(ctx.named, ctx.shared_names))
        if evaluate:  # the paper protocol: this participant as its local training left it, before aggregation
            state_now = state.extra.client(c)
            probe = ClientContext(ctx, c, round_, state_now, seeded_generator(ctx.config.seed, round_, c, 2))
            trained[c] = method.evaluate_client(probe)
    if ctx.shared_names:
        state.shared = running.result() if running is not None else method.aggregate(collected, weights)
    shared_bytes = sum(t.numel() * t.element_size() for t in state.shared.values())
    return participants, shared_bytes * len(participants), trained


def _append_tables(ctx: RunContext, state: RunState, rows: Mapping[str, list[dict]], columns: dict) -> None:
    for name, new in rows.items():
        path = ctx.out / f"{name}.csv"
        if name not in columns:
            columns[name] = _columns(path, name, new)
        if columns[name] is None:  # a hook table with no rows yet and no declared columns
            continue
        state.table_sizes[name] = runio.append_rows(path, new, columns[name])


def _columns(path: Path, name: str, rows: list[dict]) -> list[str] | None:
    if name in runio.TABLE_COLUMNS:
        return runio.TABLE_COLUMNS[name]
    if path.exists() and path.stat().st_size:
        with open(path) as handle:
            return handle.readline().strip().split(",")
    return list(rows[0]) if rows else None


def _read_tables(ctx: RunContext, names: Iterable[str]) -> dict[str, pd.DataFrame]:
    frames = {}
    for name in names:
        path = ctx.out / f"{name}.csv"
        if path.exists() and path.stat().st_size:
            frames[name] = pd.read_csv(path)
        else:
            frames[name] = pd.DataFrame(columns=runio.TABLE_COLUMNS.get(name))
            frames[name].to_csv(path, index=False)
    return frames


def _checkpoint_every(ctx: RunContext, state: RunState) -> int:
    if ctx.config.checkpoint_every:
        return ctx.config.checkpoint_every
    # Measured: torch.save writes ~0.4 GB/s here; a whole memory store past 256 MB would cost
    # more than a small round, so it is written every 10th round (the disk store writes only changed rows).
    if ctx.config.client_store == "memory" and state.local.nbytes + state.extra.nbytes > 256 * 2**20:
        return 10
    return 1


def _summary(ctx: RunContext, method: Method, state: RunState, rounds: pd.DataFrame) -> dict:
    evaluated = rounds.dropna(subset=["acc_mean"])
    best = evaluated.loc[evaluated["acc_mean"].idxmax()] if len(evaluated) else None
    local = ctx.parts[ctx.parts["local"]]
    return {
        "protocol": ctx.config.eval_protocol,
        "acc_best": float(best["acc_mean"]) if best is not None else None,
        "round_best": int(best["round"]) if best is not None else None,
        "acc_last": float(evaluated["acc_mean"].iloc[-1]) if len(evaluated) else None,
        "rounds": int(state.round),
        "seconds": round(state.seconds, 2),
        "seconds_per_round": round(state.seconds / max(1, state.round), 3),
        "local_params": int(local["numel"].sum()) + method.personal_params(ctx.parts),
        "shared_params": int(ctx.parts["numel"].sum() - local["numel"].sum()),
        "comm_bytes_per_round": float((rounds["up_bytes"] + rounds["down_bytes"]).mean()) if len(rounds) else 0.0,
        "status": "done" if state.round >= ctx.config.rounds else "running",
    }


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
    config: RunConfig, out: Path, hooks: Sequence, *, resume: bool, overwrite: bool, quiet: bool
) -> RunResult:
    method = get_method(config)
    ctx = _build_context(config, method, out)
    state = _start_state(ctx, method, resume, overwrite)
    runio.write_json(
        out / "config.json",
        {"config": dataclasses.asdict(config), "versions": runio.versions(), "git_revision": runio.git_revision()},
    )
    runio.write_table(out / "parts.csv", ctx.parts.to_dict("records"), schema.PARTS_COLUMNS)
    if not quiet:
        tqdm.write(f"{out}: {model_lib.describe(ctx.parts)}")
    for hook in hooks:
        hook.on_run_start(ctx)
    names = ("metrics", "rounds", *filter(None, map(table_of, hooks)))
    columns: dict[str, list[str] | None] = {}
    every = _checkpoint_every(ctx, state)
    previous = _previous_after_rows(ctx, state.round)
    bar = tqdm(total=config.rounds, initial=state.round, desc=out.name, disable=quiet, unit="round")
    diverged: dict | None = None
    for round_ in range(state.round + 1, config.rounds + 1):
        started = time.perf_counter()
        start_shared = state.shared
        evaluated = round_ % config.eval_every == 0 or round_ == config.rounds
        try:
            participants, exchanged, trained = _train_round(ctx, method, state, round_, hooks, evaluated)
        except NonFiniteLoss as err:
            # A result, not a crash: the tables and the checkpoint stay at the last good round.
            diverged = {"round": err.round, "client": err.client, "loss": err.loss, "message": str(err)}
            break
        rows: dict[str, list[dict]] = {"metrics": []}
        accuracies: dict[str, np.ndarray] = {p: np.array([], dtype=float) for p in runio.EVAL_PROTOCOLS}
        if evaluated:
            rows["metrics"] = _evaluate_both(ctx, method, state, round_, trained, start_shared, previous)
            for protocol in accuracies:
                accuracies[protocol] = np.array(
                    [r["accuracy"] for r in rows["metrics"] if r["protocol"] == protocol], dtype=float
                )
        previous = {r["client"]: r for r in rows["metrics"] if r["protocol"] == "after-aggregation"}
        del trained, start_shared
        acc = accuracies[config.eval_protocol]
        for hook in hooks:
            hook_rows = list(hook.on_round_end(round_))
            hook_table = table_of(hook)
            if hook_table:
                rows[hook_table] = hook_rows
        seconds = time.perf_counter() - started
        rows["rounds"] = [
            {
                "round": round_,
                **accuracy_stats(acc),
                "protocol": config.eval_protocol,
                **{f"acc_mean_{p.replace('-', '_')}": accuracy_stats(a)["acc_mean"] for p, a in accuracies.items()},
                "up_bytes": exchanged,
                "down_bytes": exchanged,
                "seconds": round(seconds, 4),
            }
        ]
        _append_tables(ctx, state, rows, columns)
        state.round, state.seconds = round_, state.seconds + seconds
        if round_ % every == 0 or round_ == config.rounds:
            runio.save_checkpoint(out / "checkpoint.pt", state.checkpoint())
            state.local.commit()
            state.extra.commit()
        bar.update(1)
        if len(acc):
            bar.set_postfix(acc=f"{np.nanmean(acc):.3f}")
    bar.close()
    frames = _read_tables(ctx, names)
    summary = _summary(ctx, method, state, frames["rounds"])
    if diverged is not None:
        summary.update(status="diverged", diverged=diverged)
        tqdm.write(f"{out}: diverged: {diverged['message']}; the tables hold the rounds before it")
    runio.write_json(out / "summary.json", summary)
    return RunResult(
        out,
        frames["rounds"],
        frames["metrics"],
        summary,
        {k: v for k, v in frames.items() if k not in ("rounds", "metrics")},
    )
