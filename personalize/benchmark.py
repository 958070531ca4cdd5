"""The benchmark behind `fedsens bench`: a round of the loop against the bare compute it performs.

Each configuration runs in its own process (so its peak RSS is its own) and measures, per round:
the loop's training, evaluation and bookkeeping time, and its checkpoint's (counted in the round at the
share `train` pays: a large memory store is written every 10th round); a bare PyTorch loop doing the same
forward/backward/optimizer steps on one model, and one forward over every client's test data
(the least evaluation can cost); and, side by side, a reference loop written the way PFLlib runs
(a deep copy of the model per client, per-client DataLoaders, every client evaluated on its own).
The ratios are what to compare: absolute seconds depend on how busy the machine is.

Beside them, the arithmetic limit: the model's FLOPs per training sample (forward + backward) and per test
sample, counted by `torch.utils.flop_counter.FlopCounterMode` on the run's own model at its input shape
(matrix products and attention; norms and activations are not counted), the FLOPs of a round (the samples
the bare loop trains and evaluates, which are the round's, times those), the machine's matmul peak measured
in the same process (`measure_peak_flops`), and the achieved share of it: round FLOPs / round seconds / peak.
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

from fedsens.personalize.client import build_optimizer
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
    "dataset", "model", "threads", "train_mflop_per_sample", "test_mflop_per_sample", "train_samples", "test_samples",
    "round_gflop", "peak_gflop_s", "achieved_gflop_s", "achieved_over_peak", "bare_over_peak", "limit_s",
]  # fmt: skip


TIMING_COLUMNS = (*COLUMNS[: COLUMNS.index("round_ratio") + 1], "achieved_over_peak")  # what a finished case prints


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
    preset: str | None = None  # a preset's own run (its dataset, clients, join ratio ...) instead of synthetic

    @property
    def name(self) -> str:
        population = self.preset or f"synthetic-{self.clients}"
        return f"{population}-{self.personalize.replace(',', '+')}-{self.loop}"

    def run_config(self, out: Path) -> RunConfig:
        if self.preset is not None:
            from fedsens.personalize import presets

            return presets.get(self.preset).run_config(
                rounds=self.rounds, personalize=self.personalize, client_store=self.client_store, device="cpu",
                out=str(out),
            )  # fmt: skip
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
    train_s = eval_s = keep_s = save_s = bare_train_total = bare_eval_total = 0.0
    train_samples = test_samples = 0
    # `train` writes the checkpoint every `every` rounds (every 10th for a large memory store): its cost
    # per round is the write's time over `every`, though the benchmark writes one every round.
    every = checkpoint_every(ctx, state)
    reference = _Reference(ctx) if case.loop == "pfllib" else None
    writer = TableWriter(out)
    bare_train(ctx, sample_clients(config, 1)[:2], 0)  # warm-up: first calls allocate and pick kernels
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
        seconds, samples = bare_train(ctx, participants, round_)
        bare_train_total, train_samples = bare_train_total + seconds, train_samples + samples
        seconds, samples = _bare_eval(ctx)
        bare_eval_total, test_samples = bare_eval_total + seconds, test_samples + samples
    rounds = case.rounds
    loop_s = train_s + eval_s + keep_s + save_s / every
    local_bytes = state.local.nbytes if reference is None else reference.local_bytes
    peak = _peak_rss_mb()
    train_flops, test_flops = count_flops(ctx)
    round_flops = (train_samples * train_flops + test_samples * test_flops) / rounds
    peak_flops = measure_peak_flops(ctx.device)
    return {
        "config": case.name,
        "loop": case.loop,
        "clients": config.clients,
        "join_ratio": config.join_ratio,
        "personalize": case.personalize,
        "client_store": case.client_store,
        "rounds": rounds,
        "s_per_round": loop_s / rounds,
        "train_s": train_s / rounds,
        "eval_s": eval_s / rounds,
        "bookkeeping_s": keep_s / rounds,
        "checkpoint_s": save_s / rounds,
        "checkpoint_every": every if reference is None else None,
        "bare_train_s": bare_train_total / rounds,
        "bare_eval_s": bare_eval_total / rounds,
        "train_ratio": train_s / bare_train_total,
        "eval_ratio": eval_s / bare_eval_total,
        "round_ratio": loop_s / (bare_train_total + bare_eval_total),
        "peak_rss_mb": peak,
        "local_bytes": local_bytes,
        "rss_per_client_kb": peak * 1024 / config.clients,
        "local_kb_per_client": local_bytes / 1024 / config.clients,
        "dataset": config.dataset,
        "model": config.model,
        "threads": torch.get_num_threads(),
        "train_mflop_per_sample": train_flops / 1e6,
        "test_mflop_per_sample": test_flops / 1e6,
        "train_samples": train_samples / rounds,
        "test_samples": test_samples / rounds,
        "round_gflop": round_flops / 1e9,
        "peak_gflop_s": peak_flops / 1e9,
        "achieved_gflop_s": round_flops / (loop_s / rounds) / 1e9,
        "achieved_over_peak": round_flops / (loop_s / rounds) / peak_flops,
        "bare_over_peak": round_flops / ((bare_train_total + bare_eval_total) / rounds) / peak_flops,
        "limit_s": round_flops / peak_flops,  # the round at the machine's matmul peak
    }


def count_flops(ctx) -> tuple[float, float]:
    """FLOPs of one training sample (forward and backward of the cross-entropy loss) and of one test sample
    (a forward), counted by torch's FlopCounterMode on a copy of the run's model at its input shape (a few of
    the run's own images through its batch preparation; under the run's autocast, as training runs)."""
    model = copy.deepcopy(ctx.model)
    index = torch.arange(min(4, len(ctx.labels)), device=ctx.labels.device)
    x, y = ctx.prepare(ctx.images[index]), ctx.labels[index]
    model.train()
    with _flop_counter() as training:
        with ctx.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    model.eval()
    with torch.no_grad(), _flop_counter() as testing, ctx.autocast():
        model(x)
    return training.get_total_flops() / len(index), testing.get_total_flops() / len(index)


def _flop_counter():
    """torch's FlopCounterMode, also counting attention on the CPU: torch counts the CUDA attention kernels
    but not the CPU's (`_scaled_dot_product_flash_attention_for_cpu`), which the same formulas describe."""
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    return flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention)


# The side of the square matrices `measure_peak_flops` multiplies: large enough to run at the matmul peak,
# small enough to take about a second (CPU: 1024, ~2.1 GFLOP a product; CUDA: 8192, ~1.1 TFLOP).
PEAK_SIDE = {"cpu": 1024, "cuda": 8192}


def measure_peak_flops(device: torch.device | str, *, side: int | None = None, repeats: int = 5) -> float:
    """The machine's matrix-product peak in FLOP/s as this process runs: fp32 on the CPU at torch's current
    thread count, bf16 on CUDA. One warm-up product, then the best of `repeats` timed ones (2·n³ FLOPs each;
    the best, as other work on the machine only ever slows a product down)."""
    device = torch.device(device)
    side = side or PEAK_SIDE.get(device.type, 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(side, side, generator=generator).to(device, dtype) for _ in range(2))
    best = float("inf")
    for attempt in range(repeats + 1):
        _synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        if attempt:  # the first product warms up (allocation, kernel choice)
            best = min(best, time.perf_counter() - started)
    return 2 * side**3 / best


def bare_train(ctx, participants: list[int], round_: int, model: torch.nn.Module | None = None) -> tuple[float, int]:
    """The same steps as local training (same batches, a fresh optimizer per client built as the engine builds
    it) on one model (the run's, or `model`: e.g. a compiled one, benchmarks/compile_step.py): seconds and
    samples trained."""
    model, cfg = model if model is not None else ctx.model, ctx.config
    samples = 0
    started = time.perf_counter()
    for c in participants:
        optimizer = build_optimizer(cfg, model.parameters())
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
            samples += len(y)
    return time.perf_counter() - started, samples


@torch.no_grad()
def _bare_eval(ctx) -> tuple[float, int]:
    """One forward over every client's test samples, 512 at a time: the least evaluation costs (seconds and
    samples)."""
    import numpy as np

    model = ctx.model.eval()
    index = torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.int64) for t in ctx.partition.test]))
    started = time.perf_counter()
    for start in range(0, len(index), 512):
        chunk = index[start : start + 512]
        F.cross_entropy(model(ctx.prepare(ctx.images[chunk])), ctx.labels[chunk], reduction="none")
    return time.perf_counter() - started, len(index)


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
    "train_gflop_per_image",
    "peak_tflop_s",
    "fedsens_mfu",
    "plain_mfu",
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
    train_flops, _ = count_flops(ctx)
    peak = measure_peak_flops(ctx.device)
    fedsens_images_s, plain_images_s = engine_images / engine_s, batch_size * steps / plain_s
    return {
        "model": model,
        "device": str(ctx.device)
        + (f" ({torch.cuda.get_device_name(ctx.device)})" if ctx.device.type == "cuda" else ""),
        "batch_size": batch_size,
        "steps": steps,
        "personalize": personalize,
        "fedsens_images_s": fedsens_images_s,
        "plain_images_s": plain_images_s,
        "ratio": fedsens_images_s / plain_images_s,  # 1.0: as fast as the plain step
        "train_gflop_per_image": train_flops / 1e9,
        "peak_tflop_s": peak / 1e12,  # bf16 on CUDA, fp32 on the CPU (measure_peak_flops)
        "fedsens_mfu": fedsens_images_s * train_flops / peak,  # model FLOPs utilisation
        "plain_mfu": plain_images_s * train_flops / peak,
    }


def _images_in_steps(train_samples: int, batch_size: int, steps: int) -> int:
    """Images seen in `steps` local steps over a split of `train_samples` (the last batch of an epoch is short)."""
    epoch = [min(batch_size, train_samples - start) for start in range(0, train_samples, batch_size)]
    full, rest = divmod(steps, len(epoch))
    return full * sum(epoch) + sum(epoch[:rest])
