"""Every probe variant set against finished sweeps: the table of docs/sweep.md's "Does the probe predict
the sweep?" (issue 28).

    PYTHONPATH=. python benchmarks/probe_variants.py SWEEP [SWEEP ...] --out runs/probe-variants

For each sweep folder and each variant below, `fedsens probe --from SWEEP --variant ...` (the library call
behind it) is run into OUT/<sweep name>/<variant label>/, reusing the sweep's FedAvg cells, and one row is
printed and written to OUT/probe_variants.csv: the probe's order, its Spearman with the sweep's accuracy
ranking, whether its top part is the sweep's, whether its own parts are distinguishable (Friedman p < 0.05
and the top part resolved from the next), and its cost as a fraction of the sweep's cell-round seconds (with
the reused FedAvg cells counted, and without them). Costs are wall seconds under whatever else runs on the
machine: compare fractions within one table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fedsens.commands.probe import build_config
from fedsens.sensitivity.probe import distinguishable, probe_ranking, run_probe, sweep_agreement

# label -> (variant, seeds, probe steps, fork rounds). A run on every seed also gives, from its seed-0 rows
# alone, the same variant on the first seed (its probe is the same computation): the `-s0` row beside it.
VARIANTS: dict[str, tuple[str, str | None, int, int]] = {
    "finetune-20": ("finetune", "all", 20, 3),
    "finetune-100-s0": ("finetune", None, 100, 3),
    "finetune-100": ("finetune", "all", 100, 3),
    "finetune-300-s0": ("finetune", None, 300, 3),
    "disagreement-20": ("disagreement", "all", 20, 3),
    "fork-3": ("fork", "all", 20, 3),
}


def row(sweep: Path, label: str, summary: dict, ranking: pd.DataFrame, fedavg_s: float, probe_s: float) -> dict:
    agreement = sweep_agreement(sweep, ranking)
    verdict = distinguishable(ranking)
    total = agreement["sweep_seconds"]
    return dict(
        sweep=sweep.name,
        variant=label,
        sweep_order=" > ".join(agreement["sweep_order"]),
        probe_order=" > ".join(ranking["part"]),
        spearman=round(agreement["spearman_vs_sweep"], 2),
        same_top=agreement["same_top_part"],
        friedman_p=float(f"{verdict['friedman_p']:.2g}"),
        distinguishable=verdict["distinguishable"],
        cost_fraction=round((fedavg_s + probe_s) / total, 4),
        probe_only_fraction=round(probe_s / total, 4),
        probe_seconds=round(probe_s, 1),
        sweep_seconds=round(total, 1),
    )


def measure(sweep: Path, out: Path, label: str) -> list[dict]:
    variant, seeds, steps, fork_rounds = VARIANTS[label]
    config = build_config(
        sweep=str(sweep),
        run={},
        seeds=seeds,
        parts=None,
        probe_steps=steps,
        out=str(out / sweep.name / label),
        variant=variant,
        fork_rounds=fork_rounds,
        fresh=False,
        quiet=True,
    )
    result = run_probe(config)
    summary, seeds = result.summary, result.summary["seeds"]
    name = f"{label}-all({len(seeds)})" if seeds_all(label) and len(seeds) > 1 else label.removesuffix("-s0") + "-s0"
    rows = [row(sweep, name, summary, result.ranking, summary["fedavg_seconds"], summary["probe_seconds"])]
    if seeds_all(label) and len(seeds) > 1:
        first = seeds[0]
        ranking = probe_ranking(result.probe[result.probe["seed"] == first])
        cost = summary["seed_seconds"][str(first)]
        rows.append(row(sweep, f"{label}-s0", summary, ranking, cost["fedavg"], cost["probe"]))
    return rows


def seeds_all(label: str) -> bool:
    return VARIANTS[label][1] == "all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/probe-variants"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated labels")
    args = parser.parse_args()
    rows = []
    table_path = args.out / "probe_variants.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    for sweep in args.sweeps:
        for label in args.variants.split(","):
            rows.extend(measure(sweep, args.out, label))
            print(pd.DataFrame(rows).to_string(index=False), flush=True)
            pd.DataFrame(rows).to_csv(table_path, index=False)
    print(f"table in {table_path}")


if __name__ == "__main__":
    main()
