"""Benchmark: one round's local training steps with the model under `torch.compile` against eager, on a preset's run.

The steps are the bench's bare loop (`personalize.benchmark.bare_train`: the participants' batches of a round,
a fresh fused AdamW per client). The compiled model is compiled once and trains every round; its first round
includes the compile (and the recompiles for the short last batches), which is counted. Prints each round's
seconds for both, the totals and their ratio. Not a test: from the repository root,

    .venv/bin/python benchmarks/compile_step.py                 # the embedded default, 4 rounds, 1 thread
    .venv/bin/python benchmarks/compile_step.py --rounds 10 --mode max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from fedsens.personalize import presets
from fedsens.personalize.benchmark import bare_train
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import sample_clients
from fedsens.personalize.methods import get_method


def rounds_of(ctx, model, rounds: int) -> list[float]:
    return [bare_train(ctx, sample_clients(ctx.config, r), r, model)[0] for r in range(1, rounds + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded", help="the run measured (default: the embedded default)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of local training timed (default 4)")
    parser.add_argument("--mode", default="default", help="torch.compile's mode (default, reduce-overhead, ...)")
    parser.add_argument(
        "--dynamic", action="store_true", help="compile for any batch size at once (torch.compile(dynamic=True))"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the bench and the sweep)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fedsens-compile-") as tmp:
        config = presets.get(args.preset).run_config(device="cpu", out=str(Path(tmp) / "run"))
        ctx = build_context(config, get_method(config), Path(tmp) / "run")
        start = copy.deepcopy(ctx.model.state_dict())
        eager = rounds_of(ctx, ctx.model, args.rounds)
        ctx.model.load_state_dict(start)
        started = time.perf_counter()
        compiled_model = torch.compile(ctx.model, mode=args.mode, dynamic=True if args.dynamic else None)
        compiled = rounds_of(ctx, compiled_model, args.rounds)
        compiled[0] += time.perf_counter() - started - sum(compiled)  # torch.compile's own call, if any
    shapes = "dynamic shapes" if args.dynamic else "shapes specialised (recompiled as batch sizes change)"
    print(f"{args.preset}, {config.model}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {shapes}")
    for index, (e, c) in enumerate(zip(eager, compiled), start=1):
        print(f"round {index}: eager {e:.2f} s, compiled {c:.2f} s{' (with the compile)' if index == 1 else ''}")
    print(f"total: eager {sum(eager):.1f} s, compiled {sum(compiled):.1f} s, ratio {sum(compiled) / sum(eager):.2f}")
    steady = sum(compiled[1:]) / sum(eager[1:]) if args.rounds > 1 else float("nan")
    print(f"after the first round: compiled / eager {steady:.2f}")


if __name__ == "__main__":
    main()
