"""The planted re-coding with an oracle start: can a client's own patch embedding regain what re-coding costs?

`fedsens validate` plants an input re-coding (each domain permutes the pixels inside every patch) whose
answer by construction is the patch embedding: a client's own embedding, its columns re-indexed by its
domain's permutation, undoes it exactly. The quick preset's sweep does not rank it first (docs/validate.md).
This separates "can represent" from "learns": per seed, the quick preset's cells on the planted re-coding at
strength 1 (augmentation off, as validate trains it):

- FedAvg (`none`);
- embed kept local, as the sweep trains it (every client's embedding starts as the shared one);
- embed kept local, every client's embedding set at its first participation to its domain's inverse (the
  shared starting embedding's columns re-indexed by the domain's permutation), then trained the same way;

and prints each cell's tail accuracy and gain over FedAvg. From the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recode_oracle.py [--seeds 0,1,2] [--out runs/recode-oracle]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedsens.commands.sweep import build_config
from fedsens.personalize import federation
from fedsens.personalize.datasets import planted, registry
from fedsens.personalize.hooks import Hook
from fedsens.sensitivity.stats import tail_accuracy
from fedsens.sensitivity.sweep import Cell, cell_config
from fedsens.sensitivity.validate import ValidateConfig, patch_size, planted_sweep


class InverseEmbeddingStart(Hook):
    """Sets each client's own patch embedding, at its first participation, to its domain's inverse of the
    planted re-coding: the weight's pixel columns re-indexed by the domain's permutation (as `plant` drew it)."""

    def __init__(self, options: planted.Options, root: str | None = None):
        self.options, self.root = options, root
        self.order: dict[int, torch.Tensor] = {}
        self.started: set[int] = set()

    def on_run_start(self, ctx) -> None:
        base = registry.load(self.options.base, self.root)
        generator = torch.Generator().manual_seed(self.options.seed)  # the draws in plant's order
        domains = planted.assign_domains(base.labels, self.options.domains, generator)
        orders = [
            torch.randperm(self.options.patch**2, generator=generator) for _ in range(self.options.changed_domains)
        ]
        for client, train in enumerate(ctx.partition.train):
            domain = int(np.bincount(domains[torch.from_numpy(train)].numpy()).argmax())  # one domain a client
            if domain < len(orders):
                self.order[client] = orders[domain]

    def on_client_start(self, round: int, client: int, model: torch.nn.Module) -> None:
        if client in self.started or client not in self.order:
            return
        self.started.add(client)
        weight = model.patch_embed.proj.weight
        out, channels, patch, _ = weight.shape
        with torch.no_grad():
            weight.copy_(weight.reshape(out, channels, patch * patch)[..., self.order[client]].view_as(weight))


def recode_sweep(out: Path, seeds: tuple[int, ...], rounds: int | None):
    """The quick preset's planted re-coding sweep at strength 1, as `fedsens validate` builds it."""
    sweep = build_config("quick", run=dict(rounds=rounds), sweep=dict(seeds=seeds, quiet=True))
    config = ValidateConfig(sweep=sweep, effects=("recode",), strengths=(1.0,), out=str(out))
    return planted_sweep(config, "recode", 1.0, patch_size(config))


def run_cells(out: Path, seeds: tuple[int, ...], rounds: int | None = None) -> pd.DataFrame:
    sweep = recode_sweep(out, seeds, rounds)
    rows = []
    for seed in seeds:
        cells = {
            "FedAvg": cell_config(sweep, Cell("planted", "domain", sweep.run.alpha, seed, "none")),
            "embed local": cell_config(sweep, Cell("planted", "domain", sweep.run.alpha, seed, "embed")),
        }
        cells["embed local, inverse start"] = dataclasses.replace(
            cells["embed local"], out=str(out / "cells" / f"s{seed}-embed-inverse-start")
        )
        tails = {}
        for label, config in cells.items():
            hooks = (InverseEmbeddingStart(planted.Options(**config.data_options)),) if "inverse" in label else ()
            result = federation.run(config, hooks, overwrite=True, quiet=True)
            tails[label] = tail_accuracy(result.rounds)["acc_tail"]
        for label, tail in tails.items():
            rows.append(dict(seed=seed, cell=label, acc_tail=tail, gain_vs_fedavg=tail - tails["FedAvg"]))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2, the quick preset's)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the quick preset's 30)")
    parser.add_argument("--out", default="runs/recode-oracle", help="where the cells are written")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    table = run_cells(Path(args.out), seeds, args.rounds)
    print(table.to_string(index=False, formatters={"acc_tail": "{:.3f}".format, "gain_vs_fedavg": "{:+.3f}".format}))
    print(table.groupby("cell", sort=False)[["acc_tail", "gain_vs_fedavg"]].mean().round(3).to_string())
    return table


if __name__ == "__main__":
    main()
