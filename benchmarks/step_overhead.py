"""Benchmark: where one local training step's time goes on a preset's run, and what three ways to cut it give.

A local step of the embedded default (vit-micro: 32 x 5 tokens x 96 channels) runs its matrix products at
about the machine's matmul peak, yet the round reaches only about a third of that peak. This splits a step:

1. the round's own steps (the participants' batches, a fresh optimizer per client built as the engine builds
   it): forward, backward and optimizer time per step, and achieved / peak of the steps;
2. one full-batch step's aten calls recorded and replayed one at a time with the same inputs (no autograd
   graph, no modules, no Python between them but the call itself): matrix products, attention, the rest;
   their sum is what the step would cost with no framework overhead, the real step minus it is that overhead;
3. what was tried against it, each in this process: (a) AdamW over one flat tensor instead of one per
   parameter (all sizes a multiple of 16 in one buffer: the fused kernel's result is the same bit for bit,
   checked here), (b) the attention of the model's shape through the fused CPU kernel, torch's math path and
   written out (matmul, softmax), forward and backward, (c) with --aot-eager, the model under
   `torch.compile(backend="aot_eager")` (one aten graph for forward and backward, no inductor; its compile
   counted apart).

Not a test: from the repository root,

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py [--rounds 2] [--aot-eager]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fedsens.personalize import presets
from fedsens.personalize.benchmark import count_flops, measure_peak_flops
from fedsens.personalize.client import build_optimizer
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import TRAIN_STREAM, sample_clients
from fedsens.personalize.inputs import batches, seeded_generator
from fedsens.personalize.methods import get_method

aten = torch.ops.aten
MATMUL = {aten.mm.default, aten.addmm.default, aten.bmm.default}
ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}
# Calls that only make a view (no arithmetic): left out of the replayed sum, where their cost is the call itself.
VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "detach", "unbind", "select",
    "slice", "alias", "unsqueeze", "squeeze",
}  # fmt: skip


def client_batches(ctx, rounds: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every participant's batches of rounds 1..rounds, one list per client and round (as local training draws)."""
    cfg = ctx.config
    out = []
    for round_ in range(1, rounds + 1):
        for c in sample_clients(cfg, round_):
            generator = seeded_generator(cfg.seed, round_, c, TRAIN_STREAM)
            out.append(list(batches(
                ctx.images, ctx.labels, ctx.partition.train[c], ctx.prepare,
                batch_size=cfg.batch_size, generator=generator, epochs=cfg.local_epochs, augment=True,
            )))  # fmt: skip
    return out


def phases(ctx, model, clients) -> dict[str, float]:
    """Seconds of forward, backward and optimizer over all the steps (a fresh optimizer per client)."""
    spent = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    model.train()
    for steps in clients:
        optimizer = build_optimizer(ctx.config, model.parameters())
        for x, y in steps:
            started = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            forwarded = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            backwarded = time.perf_counter()
            optimizer.step()
            spent["forward"] += forwarded - started
            spent["backward"] += backwarded - forwarded
            spent["optimizer"] += time.perf_counter() - backwarded
    return spent


class Recorder(TorchDispatchMode):
    """Every aten call of a step, with copies of its tensor arguments (strides kept) to replay it later."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, [_copy(a) for a in args], {k: _copy(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _copy(value):
    """A copy with the same shape and strides (an overlapping view, e.g. an expanded one, copied contiguous)."""
    if isinstance(value, torch.Tensor):
        try:
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype).copy_(value.detach())
        except RuntimeError:
            return value.detach().clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def replayed(calls: list[tuple], repeats: int = 20) -> dict[str, float]:
    """Seconds of each kind of call, each call replayed alone `repeats` times (best per call: the kernel)."""
    spent = {"matmul": 0.0, "attention": 0.0, "other": 0.0, "calls not replayable": 0}
    for func, args, kwargs in calls:
        name = func.__name__.split(".")[0]
        if name in VIEWS:
            continue
        try:
            func(*args, **kwargs)
        except RuntimeError:  # e.g. an in-place call whose recorded copy no longer fits: counted, printed
            spent["calls not replayable"] += 1
            continue
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            func(*args, **kwargs)
            best = min(best, time.perf_counter() - started)
        kind = "matmul" if func in MATMUL else "attention" if func in ATTENTION else "other"
        spent[kind] += best
    return spent


def timed(step: Callable[[], object], repeats: int = 200) -> float:
    for _ in range(10):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def flat_adamw(model: torch.nn.Module, options: dict) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """AdamW over one flat tensor: the parameters whose size is a multiple of 16 moved into one buffer (each a
    view of it), the others kept; returns it and the copy of the gradients into the flat gradient."""
    members = [p for p in model.parameters() if p.numel() % 16 == 0]
    others = [p for p in model.parameters() if p.numel() % 16 != 0]
    buffer = torch.cat([p.detach().reshape(-1) for p in members])
    start = 0
    for p in members:
        p.data = buffer[start : start + p.numel()].view_as(p)
        start += p.numel()
    flat = torch.nn.Parameter(buffer)
    flat.grad = torch.empty_like(buffer)

    def gather() -> None:
        torch.cat([p.grad.reshape(-1) for p in members], out=flat.grad)  # type: ignore[union-attr]

    return torch.optim.AdamW([flat, *others], fused=True, **options), gather


def optimizer_comparison(ctx, x, y) -> tuple[float, float, bool]:
    """Seconds of one AdamW step per tensor and over one flat tensor (gathering the gradients counted), and
    whether ten steps of each leave the same parameters bit for bit."""
    options = dict(lr=ctx.config.lr, weight_decay=ctx.config.weight_decay)
    per_model, flat_model = copy.deepcopy(ctx.model).train(), copy.deepcopy(ctx.model).train()
    per_tensor = torch.optim.AdamW(per_model.parameters(), fused=True, **options)
    flat, gather = flat_adamw(flat_model, options)
    for _ in range(10):
        for model in (per_model, flat_model):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        per_tensor.step()
        gather()
        flat.step()
    same = all(torch.equal(a, b) for a, b in zip(per_model.parameters(), flat_model.parameters()))

    def flat_step() -> None:
        gather()
        flat.step()

    return timed(per_tensor.step), timed(flat_step), same


def attention_comparison(batch: int, heads: int, tokens: int, head_dim: int) -> dict[str, float]:
    """Seconds of forward + backward of attention at the model's shape, three ways."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = torch.randn(3, batch, heads, tokens, head_dim, requires_grad=True)
    grad = torch.randn(batch, heads, tokens, head_dim)

    def fused() -> None:
        F.scaled_dot_product_attention(*qkv.unbind(0)).backward(grad)

    def math() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(*qkv.unbind(0)).backward(grad)

    def written_out() -> None:
        q, k, v = qkv.unbind(0)
        ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1).matmul(v).backward(grad)

    return {"fused CPU kernel": timed(fused), "torch's math path": timed(math), "written out": timed(written_out)}


def aot_eager_comparison(ctx, clients) -> tuple[float, float, float, bool]:
    """First pass (with the compiles) and steady pass of the steps with the model under aot_eager, the eager
    pass, and whether both end with the same parameters."""
    start = copy.deepcopy(ctx.model.state_dict())
    compiled = torch.compile(ctx.model, backend="aot_eager")

    def run(model) -> tuple[float, dict]:
        ctx.model.load_state_dict(start)
        started = time.perf_counter()
        for steps in clients:
            optimizer = build_optimizer(ctx.config, ctx.model.parameters())
            for x, y in steps:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return time.perf_counter() - started, copy.deepcopy(ctx.model.state_dict())

    first, _ = run(compiled)
    steady, compiled_end = run(compiled)
    eager, eager_end = run(ctx.model)
    same = all(torch.equal(eager_end[k], compiled_end[k]) for k in eager_end)
    ctx.model.load_state_dict(start)
    return first, steady, eager, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded", help="the run measured (default: the embedded default)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds whose steps are timed (default 2)")
    parser.add_argument("--aot-eager", action="store_true", help="also time the model under aot_eager")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedsens-steps-") as tmp:
        config = presets.get(args.preset).run_config(device="cpu", out=str(Path(tmp) / "run"))
        ctx = build_context(config, get_method(config), Path(tmp) / "run")
        clients = client_batches(ctx, args.rounds)
        steps = [step for client in clients for step in client]
        samples = sum(len(y) for _, y in steps)
        train_flops, _ = count_flops(ctx)
        phases(ctx, copy.deepcopy(ctx.model), clients[:2])  # warm-up
        spent = phases(ctx, copy.deepcopy(ctx.model), clients)
        peak = measure_peak_flops("cpu")
        total = sum(spent.values())
        print(f"{args.preset}, {config.model}, 1 thread, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")
        print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; {len(steps)} steps of {samples / len(steps):.1f} samples")
        print("per step: " + ", ".join(f"{k} {v / len(steps) * 1e3:.2f} ms" for k, v in spent.items()))
        print(f"  total {total / len(steps) * 1e3:.2f} ms; achieved / peak {samples * train_flops / total / peak:.2f}")

        x, y = next((x, y) for x, y in steps if len(y) == config.batch_size)
        model = copy.deepcopy(ctx.model).train()
        recorder = Recorder()
        with recorder:
            F.cross_entropy(model(x), y).backward()
        kernels = replayed(recorder.calls)
        unreplayed = int(kernels.pop("calls not replayable"))
        model.zero_grad(set_to_none=True)

        def forward_backward() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        real = timed(forward_backward, repeats=50)
        floor = sum(kernels.values())
        flops = train_flops * len(y)
        print(f"one step of {len(y)} samples, forward + backward: {real * 1e3:.2f} ms")
        print(
            f"  its {len(recorder.calls)} aten calls replayed alone ({unreplayed} not replayable): "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in kernels.items())
        )
        print(f"  matmul rate {flops / kernels['matmul'] / 1e9:.1f} GFLOP/s (attention's FLOPs included)")
        print(f"  sum {floor * 1e3:.2f} ms; framework overhead {(real - floor) * 1e3:.2f} ms ({1 - floor / real:.0%})")
        print(
            f"  achieved / peak: real {flops / real / peak:.2f}, with no framework overhead {flops / floor / peak:.2f}"
        )

        per_tensor, flat, same = optimizer_comparison(ctx, x, y)
        tensors = sum(1 for _ in ctx.model.parameters())
        print(f"AdamW step: {tensors} tensors {per_tensor * 1e3:.3f} ms, one flat tensor {flat * 1e3:.3f} ms "
              f"(ratio {flat / per_tensor:.2f}; same parameters after 10 steps: {same})")  # fmt: skip
        net: Any = ctx.model  # a timm ViT has blocks[i].attn, patch_embed.num_patches and num_prefix_tokens
        attention = getattr(getattr(net, "blocks", [None])[0], "attn", None)
        if attention is not None and hasattr(net, "patch_embed"):
            heads, head_dim = attention.num_heads, attention.head_dim
            tokens = net.patch_embed.num_patches + net.num_prefix_tokens
            timings = attention_comparison(len(y), heads, tokens, head_dim)
            base = timings["fused CPU kernel"]
            print(f"attention ({len(y)} x {heads} heads x {tokens} tokens x {head_dim}), forward + backward: "
                  + ", ".join(f"{k} {v * 1e6:.0f} us ({v / base:.2f})" for k, v in timings.items()))  # fmt: skip
        if args.aot_eager:
            first, steady, eager, same = aot_eager_comparison(ctx, clients)
            print(f"aot_eager: first pass {first:.1f} s (with the compiles), then {steady:.2f} s against eager "
                  f"{eager:.2f} s (ratio {steady / eager:.2f}; same parameters: {same})")  # fmt: skip
        print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
