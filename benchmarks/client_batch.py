"""Seconds per round of training, one participant at a time against K trained together (`--client-batch`).

The quick sweep's cells of one seed (digits, vit-micro, the quick preset: FedAvg and each part kept local),
each cell's model and data built once; every K trains the same rounds from the same fresh state, the Ks
taken in turn (`--repeats` passes) so that a change of load touches them alike. Prints one table: the
seconds of a round's local training (`train_round`, evaluation not included) per cell and K, and each K's
ratio to K=1 measured in the same run; and the largest difference of the shared tensors from K=1's after
the rounds.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/client_batch.py --rounds 3 --repeats 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fedsens.personalize import presets
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import sample_clients, train_round
from fedsens.personalize.engine.state import fresh_state
from fedsens.personalize.methods import get_method
from fedsens.sensitivity.sweep import DEFAULT_PARTS


def cell_seconds(config, rounds: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds per round of `rounds` rounds of training of one cell, and its shared tensors at the end."""
    method = get_method(config)
    with tempfile.TemporaryDirectory() as out:
        ctx = build_context(config, method, Path(out))
        state = fresh_state(ctx, method)
        started = time.perf_counter()
        for round_ in range(1, rounds + 1):
            train_round(ctx, method, state, round_)
        return (time.perf_counter() - started) / rounds, state.shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="1,2,4,8,all", help="the K values (all: every participant at once)")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="the cells (parts kept local)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = presets.get("quick").run_config(device="cpu")
    everyone = len(sample_clients(base, 1))
    sizes = [everyone if k == "all" else int(k) for k in args.sizes.split(",")]
    labels = {size: ("all" if size == everyone and "all" in args.sizes else str(size)) for size in sizes}
    print(
        f"cells: digits, vit-micro, quick preset, {everyone} participants a round; {args.rounds} rounds, "
        f"best of {args.repeats}; torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'cell':<6}" + "".join(f"{'K=' + labels[k]:>10}" for k in sizes) + "   ratio to K=1" + "   max |shared - K=1|"
    )
    totals = {k: 0.0 for k in sizes}
    for part in args.parts.split(","):
        seconds = {k: float("inf") for k in sizes}
        shared: dict[int, dict[str, torch.Tensor]] = {}
        for _ in range(args.repeats):
            for k in sizes:
                s, shared[k] = cell_seconds(base.replace(personalize=part, client_batch=k), args.rounds)
                seconds[k] = min(seconds[k], s)
        for k in sizes:
            totals[k] += seconds[k]
        ratios = " ".join(f"{seconds[k] / seconds[sizes[0]]:.2f}" for k in sizes)
        differ = max(
            (
                max(((shared[k][n] - shared[sizes[0]][n]).abs().max().item() for n in shared[k]), default=0.0)
                for k in sizes
            ),
        )
        print(f"{part:<6}" + "".join(f"{seconds[k]:>10.3f}" for k in sizes) + f"   {ratios}   {differ:.1e}")
    ratios = " ".join(f"{totals[k] / totals[sizes[0]]:.2f}" for k in sizes)
    print(f"{'total':<6}" + "".join(f"{totals[k]:>10.3f}" for k in sizes) + f"   {ratios}")


if __name__ == "__main__":
    main()
