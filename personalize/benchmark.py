"""The benchmark behind `fedsens bench`: a round of the loop against the bare compute it performs.

Each configuration runs in its own process (so its peak RSS is its own) and measures, per round:
the loop's training, evaluation and bookkeeping time, and its checkpoint's (counted in the round at the
share `train` pays: a large memory store is written every 10th round); a bare PyTorch loop doing the same
forward/backward/optimizer steps on one model, and one forward over every client's test data
(the least evaluation can cost); and, side by side, a reference loop written the way PFLlib runs
(a deep copy of the model per client, per-client DataLoaders, every client evaluated on its own).
The ratios are what to compare: absolute seconds depend on how busy the machine is.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.protocols import evaluate_after_aggregation
from fedsens.personalize.engine.rounds import TRAIN_STREAM, sample_clients, train_round
from fedsens.personalize.engine.state import checkpoint_every, save_checkpoint, start_state
from fedsens.personalize.engine.tables import TableWriter
from fedsens.personalize.inputs import batches, seeded_generator
from fedsens.personalize.methods import get_method

COLUMNS = [
    "config", "loop", "clients", "join_ratio", "personalize", "client_store", "rounds", "s_per_round", "train_s",
    "eval_s", "bookkeeping_s", "checkpoint_s", "checkpoint_every", "bare_train_s", "bare_eval_s", "train_ratio",
    "eval_ratio", "round_ratio", "peak_rss_mb", "local_bytes", "rss_per_client_kb", "local_kb_per_client",
]  # fmt: skip


TIMING_COLUMNS = COLUMNS[: COLUMNS.index("round_ratio") + 1]  # what each finished case prints


@dataclass(frozen=True)
class BenchCase:
    clients: int
    personalize: str = "head"
    join_ratio: float = 0.01
    rounds: int = 2
    model: str = "vit-micro"
    per_client: int = 8
    client_store: str = "memory"
    loop: str = "fedsens"  # fedsens | pfllib (the reference loop)

    @property
    def name(self) -> str:
        return f"synthetic-{self.clients}-{self.personalize.replace(',', '+')}-{self.loop}"

    def run_config(self, out: Path) -> RunConfig:
        return RunConfig(
            dataset="synthetic",
            scheme="iid",
            clients=self.clients,
            data_options={"num_samples": self.clients * self.per_client} if self.per_client else {},
            join_ratio=self.join_ratio,
            rounds=self.rounds,
            local_epochs=1,
            model=self.model,
            personalize=self.personalize,
            client_store=self.client_store,
            device="cpu",
            out=str(out),
        )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(case: BenchCase, out: Path) -> dict:
    """One configuration, in this process: the loop (or the reference loop) and the bare compute."""
    config = case.run_config(out)
    method = get_method(config)
    ctx = build_context(config, method, out)
    state = start_state(ctx, method, resume=False, overwrite=True)
    train_s = eval_s = keep_s = save_s = bare_train = bare_eval = 0.0
    # `train` writes the checkpoint every `every` rounds (every 10th for a large memory store): its cost
    # per round is the write's time over `every`, though the benchmark writes one every round.
    every = checkpoint_every(ctx, state)
    reference = _Reference(ctx) if case.loop == "pfllib" else None
    writer = TableWriter(out)
    _bare_train(ctx, sample_clients(config, 1)[:2], 0)  # warm-up: first calls allocate and pick kernels
    _bare_eval(ctx)
    for round_ in range(1, case.rounds + 1):
        participants = sample_clients(config, round_)
        started = time.perf_counter()
        if reference is not None:
            reference.train(participants, round_)
        else:
            train_round(ctx, method, state, round_)
        train_s += time.perf_counter() - started
        started = time.perf_counter()
        if reference is not None:
            reference.evaluate()
        else:
            rows = {"metrics": evaluate_after_aggregation(ctx, method, state, round_, set(participants))}
        eval_s += time.perf_counter() - started
        if reference is None:
            started = time.perf_counter()
            rows["rounds"] = [{"round": round_}]
            writer.append(state, rows)
            state.round = round_
            keep_s += time.perf_counter() - started
            started = time.perf_counter()
            save_checkpoint(ctx, state)
            save_s += time.perf_counter() - started
        bare_train += _bare_train(ctx, participants, round_)
        bare_eval += _bare_eval(ctx)
    rounds = case.rounds
    loop_s = train_s + eval_s + keep_s + save_s / every
    local_bytes = state.local.nbytes if reference is None else reference.local_bytes
    peak = _peak_rss_mb()
    return {
        "config": case.name,
        "loop": case.loop,
        "clients": case.clients,
        "join_ratio": case.join_ratio,
        "personalize": case.personalize,
        "client_store": case.client_store,
        "rounds": rounds,
        "s_per_round": loop_s / rounds,
        "train_s": train_s / rounds,
        "eval_s": eval_s / rounds,
        "bookkeeping_s": keep_s / rounds,
        "checkpoint_s": save_s / rounds,
        "checkpoint_every": every if reference is None else None,
        "bare_train_s": bare_train / rounds,
        "bare_eval_s": bare_eval / rounds,
        "train_ratio": train_s / bare_train,
        "eval_ratio": eval_s / bare_eval,
        "round_ratio": loop_s / (bare_train + bare_eval),
        "peak_rss_mb": peak,
        "local_bytes": local_bytes,
        "rss_per_client_kb": peak * 1024 / case.clients,
        "local_kb_per_client": local_bytes / 1024 / case.clients,
    }


def _bare_train(ctx, participants: list[int], round_: int) -> float:
    """The same steps as local training (same batches, fresh fused AdamW per client) on one model."""
    model, cfg = ctx.model, ctx.config
    started = time.perf_counter()
    for c in participants:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
        model.train()
        generator = seeded_generator(cfg.seed, round_, c, TRAIN_STREAM)
        for x, y in batches(
            ctx.images, ctx.labels, ctx.partition.train[c], ctx.prepare,
            batch_size=cfg.batch_size, generator=generator, epochs=cfg.local_epochs, augment=True,
        ):  # fmt: skip
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


@torch.no_grad()
def _bare_eval(ctx) -> float:
    """One forward over every client's test samples, 512 at a time: the least evaluation costs."""
    import numpy as np

    model = ctx.model.eval()
    index = torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.int64) for t in ctx.partition.test]))
    started = time.perf_counter()
    for start in range(0, len(index), 512):
        chunk = index[start : start + 512]
        F.cross_entropy(model(ctx.prepare(ctx.images[chunk])), ctx.labels[chunk], reduction="none")
    return time.perf_counter() - started


class _Reference:
    """A round loop written the way PFLlib runs: a deep copy of the model per client, a DataLoader
    per client and split, the server sending its model to each client (personalized parts kept),
    uploads as model copies averaged parameter by parameter, and each client evaluated alone."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.server = copy.deepcopy(ctx.model)
        self.models = [copy.deepcopy(ctx.model) for _ in range(ctx.config.clients)]
        self.local = set(ctx.local_names)

        def loader(index, shuffle: bool) -> DataLoader:
            index = torch.as_tensor(index, dtype=torch.long)
            data = TensorDataset(ctx.prepare(ctx.images[index]), ctx.labels[index])
            return DataLoader(data, batch_size=ctx.config.batch_size, shuffle=shuffle, drop_last=False)

        self.train_loaders = [loader(ctx.partition.train[c], True) for c in range(ctx.config.clients)]
        self.test_loaders = [loader(ctx.partition.test[c], False) for c in range(ctx.config.clients)]

    @property
    def local_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.models for p in m.parameters())

    def _receive(self, client_model) -> None:
        with torch.no_grad():
            for (name, new), old in zip(self.server.named_parameters(), client_model.parameters()):
                if name not in self.local:
                    old.copy_(new)

    def train(self, participants: list[int], round_: int) -> None:
        cfg = self.ctx.config
        uploads, weights = [], []
        for c in participants:
            model = self.models[c]
            self._receive(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            model.train()
            for _ in range(cfg.local_epochs):
                for x, y in self.train_loaders[c]:
                    loss = F.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            uploads.append(copy.deepcopy(model))
            weights.append(len(self.ctx.partition.train[c]))
        total = sum(weights)
        with torch.no_grad():
            for p in self.server.parameters():
                p.zero_()
            for upload, w in zip(uploads, weights):
                for server_p, client_p in zip(self.server.parameters(), upload.parameters()):
                    server_p.add_(client_p.data * (w / total))

    @torch.no_grad()
    def evaluate(self) -> None:
        for c, model in enumerate(self.models):
            self._receive(model)
            model.eval()
            for x, y in self.test_loaders[c]:
                F.cross_entropy(model(x), y)


def run_case_in_subprocess(case: BenchCase, out: Path, threads: int = 1) -> dict:
    """One case in a fresh interpreter, so that its peak RSS is its own."""
    code = (
        f"import json, sys, torch; torch.set_num_threads({int(threads)}); from pathlib import Path; "
        "from fedsens.personalize import benchmark as b; "
        "print(json.dumps(b.measure(b.BenchCase(**json.loads(sys.argv[1])), Path(sys.argv[2]))))"
    )
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(case)), str(out)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"config": case.name, "loop": case.loop, "clients": case.clients, "error": done.stderr[-400:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(cases: list[BenchCase], out: Path, *, quiet: bool = False) -> pd.DataFrame:
    """Every case one after the other; DIR/bench.csv gets a row per case as it finishes."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        row = run_case_in_subprocess(case, out / "runs" / f"{case.name}-{case.client_store}")
        rows.append(row)
        frame = pd.DataFrame(rows)
        frame = frame[[c for c in COLUMNS if c in frame] + [c for c in frame if c not in COLUMNS]]
        frame.to_csv(out / "bench.csv", index=False)
        if not quiet:
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k in TIMING_COLUMNS}
            print(json.dumps(shown), flush=True)
    return pd.read_csv(out / "bench.csv")


THROUGHPUT_COLUMNS = [
    "model",
    "device",
    "batch_size",
    "steps",
    "personalize",
    "fedsens_images_s",
    "plain_images_s",
    "ratio",
]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    model: str, batch_size: int, steps: int, device: str, out: Path, personalize: str = "none"
) -> dict:
    """Images/s of one client's local training through the engine against a plain timm training step at the
    same batch (fused AdamW, bf16 autocast on CUDA, inputs already at the model's size on the device).

    The engine's figure includes what a round does around the steps: loading the client's tensors, reading
    and resizing its batches on the device, aggregation. One warm-up round first (kernels, allocator)."""
    from fedsens.personalize.model import model_shape

    size = model_shape(model).img_size or 32  # a CPU preset takes the data's own size; CIFAR-like 32 px here
    config = RunConfig(
        dataset="synthetic", scheme="iid", clients=1, data_options={"num_samples": batch_size * 4, "image_size": 32},
        join_ratio=1.0, rounds=2, local_steps=steps, batch_size=batch_size, model=model, personalize=personalize,
        augment_shift=0.0, augment_scale=0.0, test_fraction=0.25, device=device, out=str(out),
    )  # fmt: skip
    method = get_method(config)
    ctx = build_context(config, method, out)
    state = start_state(ctx, method, resume=False, overwrite=True)
    train_round(ctx, method, state, 1)
    _synchronize(ctx.device)
    started = time.perf_counter()
    train_round(ctx, method, state, 2)
    _synchronize(ctx.device)
    engine_s = time.perf_counter() - started
    engine_images = _images_in_steps(len(ctx.partition.train[0]), batch_size, steps)

    plain = copy.deepcopy(ctx.model).train()  # the same timm model (the engine picks the patch size for the data)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch_size, 3, size, size, device=ctx.device)
    y = torch.randint(10, (batch_size,), device=ctx.device)

    def step() -> None:
        with ctx.autocast():
            loss = F.cross_entropy(plain(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(min(3, steps)):  # warm-up
        step()
    _synchronize(ctx.device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(ctx.device)
    plain_s = time.perf_counter() - started
    return {
        "model": model,
        "device": str(ctx.device)
        + (f" ({torch.cuda.get_device_name(ctx.device)})" if ctx.device.type == "cuda" else ""),
        "batch_size": batch_size,
        "steps": steps,
        "personalize": personalize,
        "fedsens_images_s": engine_images / engine_s,
        "plain_images_s": batch_size * steps / plain_s,
        "ratio": engine_images / engine_s / (batch_size * steps / plain_s),  # 1.0: as fast as the plain step
    }


def _images_in_steps(train_samples: int, batch_size: int, steps: int) -> int:
    """Images seen in `steps` local steps over a split of `train_samples` (the last batch of an epoch is short)."""
    epoch = [min(batch_size, train_samples - start) for start in range(0, train_samples, batch_size)]
    full, rest = divmod(steps, len(epoch))
    return full * sum(epoch) + sum(epoch[:rest])
