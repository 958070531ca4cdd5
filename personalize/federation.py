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

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from fedsens.personalize import data as data_lib
from fedsens.personalize import model as model_lib
from fedsens.personalize import partition as partition_lib
from fedsens.personalize import runio, runlock
from fedsens.personalize.client import ClientContext, EvalResult, NonFiniteLoss, RunContext
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError
from fedsens.personalize.inputs import BatchPreparer, seeded_generator
from fedsens.personalize.methods import Method, get_method

# Re-exported: the public names of one run, importable from the loop as before.
__all__ = ["ClientContext", "EvalResult", "NonFiniteLoss", "RunConfig", "RunContext", "RunResult", "run"]


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


def snapshot(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    tensors = _tensors(model)
    return {n: tensors[n].detach().clone() for n in names}


@torch.no_grad()
def assign(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    tensors = _tensors(model)
    for name, value in values.items():
        tensors[name].copy_(value)


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


def _load_partition(config: RunConfig, dataset: data_lib.ImageSet, out: Path) -> partition_lib.Partition:
    target = out / "partition.json"
    if config.scheme.endswith(".json"):
        source = Path(config.scheme)
        if not source.is_file():
            raise UserError(f"partition file {source} does not exist; write one with `fedsens data split`")
        part = partition_lib.load(source)
        if source.resolve() != target.resolve():
            target.write_text(source.read_text())
    else:
        test_fraction = config.test_fraction or data_lib.dataset_defaults(config.dataset)["test_fraction"]
        part = partition_lib.load_or_make(
            target,
            dataset.labels,
            dataset.domains,
            scheme=config.scheme,
            num_clients=config.clients,
            seed=config.seed,
            alpha=config.alpha,
            classes_per_client=config.classes_per_client,
            test_fraction=test_fraction,
            dataset=config.dataset,
            classes=dataset.classes,
            domain_names=dataset.domain_names,
        )
    if part.num_clients != config.clients:
        raise UserError(f"the partition has {part.num_clients} clients but --clients is {config.clients}")
    return part


def _build_context(config: RunConfig, method: Method, out: Path) -> RunContext:
    device = resolve_device(config.device)
    dataset = data_lib.load(config.dataset, config.data_root)
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
    )


def _fresh_state(ctx: RunContext, method: Method) -> dict:
    local0 = snapshot(ctx.model, ctx.local_names)
    return {
        "round": 0,
        "seconds": 0.0,
        "shared": snapshot(ctx.model, ctx.shared_names),
        "local": [{n: t.clone() for n, t in local0.items()} for _ in range(ctx.config.clients)],
        "extra": [method.init_client(c, ctx.model) for c in range(ctx.config.clients)],
        "tables": {},
    }


def _comparable(config: RunConfig) -> dict:
    d = dataclasses.asdict(config)
    for key in ("rounds", "device", "out"):  # these may differ when a run is continued
        d.pop(key)
    return d


def _start_state(ctx: RunContext, method: Method, resume: bool, overwrite: bool) -> dict:
    checkpoint = ctx.out / "checkpoint.pt"
    if not checkpoint.exists() or overwrite:
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
    state = runio.load_checkpoint(checkpoint, notify=tqdm.write)
    if saved.get("rounds") is not None and ctx.config.rounds > saved["rounds"]:
        tqdm.write(f"{ctx.out}: extending the run from {saved['rounds']} to {ctx.config.rounds} rounds")
    move = lambda d: {n: t.to(ctx.device) for n, t in d.items()}  # noqa: E731
    state["shared"] = move(state["shared"])
    state["local"] = [move(d) for d in state["local"]]
    state["extra"] = [move(d) for d in state["extra"]]
    return state


def _evaluate_all(ctx: RunContext, method: Method, state: dict, round_: int, participants: set[int]) -> list[dict]:
    rows = []
    for c in range(ctx.config.clients):
        assign(ctx.model, state["shared"])
        assign(ctx.model, state["local"][c])
        client = ClientContext(ctx, c, round_, state["extra"][c], seeded_generator(ctx.config.seed, round_, c, 2))
        result = method.evaluate_client(client)
        rows.append(
            {
                "round": round_,
                "client": c,
                "split": "test",
                "loss": result.loss,
                "accuracy": result.accuracy,
                "n": result.n,
                "participated": c in participants,
            }
        )
    return rows


def _train_round(ctx: RunContext, method: Method, state: dict, round_: int, hooks: Sequence) -> tuple[list[int], int]:
    """Train the round's clients and aggregate; returns the participants and the bytes each way."""
    participants = sample_clients(ctx.config, round_)
    collected, weights = [], []
    for c in participants:
        assign(ctx.model, state["shared"])
        assign(ctx.model, state["local"][c])
        client = ClientContext(ctx, c, round_, state["extra"][c], seeded_generator(ctx.config.seed, round_, c, 1))
        for hook in hooks:
            hook.on_client_start(round_, c, ctx.model)
        method.train_client(client)
        if client.nonfinite:
            raise NonFiniteLoss(f"client {c} hit a non-finite loss in round {round_}; lower --lr")
        for hook in hooks:
            hook.on_client_end(round_, c, ctx.model)
        state["local"][c] = snapshot(ctx.model, ctx.local_names)
        collected.append(snapshot(ctx.model, ctx.shared_names))
        weights.append(client.train_size)
    if ctx.shared_names:
        state["shared"] = method.aggregate(collected, weights)
    shared_bytes = sum(t.numel() * t.element_size() for t in state["shared"].values())
    return participants, shared_bytes * len(participants)


def _write_outputs(ctx: RunContext, state: dict) -> dict[str, pd.DataFrame]:
    frames = {}
    for name, rows in state["tables"].items():
        frames[name] = runio.write_table(ctx.out / f"{name}.csv", rows, runio.TABLE_COLUMNS.get(name))
    return frames


def _summary(ctx: RunContext, method: Method, state: dict, rounds: pd.DataFrame) -> dict:
    evaluated = rounds.dropna(subset=["acc_mean"])
    best = evaluated.loc[evaluated["acc_mean"].idxmax()] if len(evaluated) else None
    local = ctx.parts[ctx.parts["local"]]
    return {
        "acc_best": float(best["acc_mean"]) if best is not None else None,
        "round_best": int(best["round"]) if best is not None else None,
        "acc_last": float(evaluated["acc_mean"].iloc[-1]) if len(evaluated) else None,
        "rounds": int(state["round"]),
        "seconds": round(state["seconds"], 2),
        "seconds_per_round": round(state["seconds"] / max(1, state["round"]), 3),
        "local_params": int(local["numel"].sum()) + method.personal_params(ctx.parts),
        "shared_params": int(ctx.parts["numel"].sum() - local["numel"].sum()),
        "comm_bytes_per_round": float((rounds["up_bytes"] + rounds["down_bytes"]).mean()) if len(rounds) else 0.0,
        "status": "done" if state["round"] >= ctx.config.rounds else "running",
    }


def run(
    config: RunConfig, hooks: Sequence = (), *, resume: bool = False, overwrite: bool = False, quiet: bool = False
) -> RunResult:
    """One federated run into `config.out`; resumable from the checkpoint written after every round.

    The folder is locked for the run's duration: a second process on it is refused (RunInUse).
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
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
    runio.write_table(
        out / "parts.csv", ctx.parts.to_dict("records"), ["param", "part", "block", "numel", "bytes", "local"]
    )
    if not quiet:
        tqdm.write(f"{out}: {model_lib.describe(ctx.parts)}")
    for hook in hooks:
        hook.on_run_start(ctx)
    tables = state["tables"]
    for name in ("metrics", "rounds", *(h.table for h in hooks)):
        tables.setdefault(name, [])
    bar = tqdm(total=config.rounds, initial=state["round"], desc=out.name, disable=quiet, unit="round")
    for round_ in range(state["round"] + 1, config.rounds + 1):
        started = time.perf_counter()
        participants, exchanged = _train_round(ctx, method, state, round_, hooks)
        if round_ % config.eval_every == 0 or round_ == config.rounds:
            tables["metrics"].extend(_evaluate_all(ctx, method, state, round_, set(participants)))
            acc = np.array([r["accuracy"] for r in tables["metrics"] if r["round"] == round_], dtype=float)
        else:
            acc = np.array([], dtype=float)
        for hook in hooks:
            tables[hook.table].extend(hook.on_round_end(round_))
        seconds = time.perf_counter() - started
        tables["rounds"].append(
            {
                "round": round_,
                **accuracy_stats(acc),
                "up_bytes": exchanged,
                "down_bytes": exchanged,
                "seconds": round(seconds, 4),
            }
        )
        state["round"], state["seconds"] = round_, state["seconds"] + seconds
        runio.save_checkpoint(out / "checkpoint.pt", state)
        _write_outputs(ctx, state)
        bar.update(1)
        if len(acc):
            bar.set_postfix(acc=f"{np.nanmean(acc):.3f}")
    bar.close()
    frames = _write_outputs(ctx, state)
    summary = _summary(ctx, method, state, frames["rounds"])
    runio.write_json(out / "summary.json", summary)
    return RunResult(
        out,
        frames["rounds"],
        frames["metrics"],
        summary,
        {k: v for k, v in frames.items() if k not in ("rounds", "metrics")},
    )
