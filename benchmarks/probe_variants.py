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
from fedsens.sensitivity.probe import run_probe

# label -> (variant, seeds, probe steps, fork rounds)
VARIANTS: dict[str, tuple[str, str | None, int, int]] = {
    "finetune-20-s0": ("finetune", None, 20, 3),
    "finetune-20-all": ("finetune", "all", 20, 3),
    "finetune-100-all": ("finetune", "all", 100, 3),
    "disagreement-20-all": ("disagreement", "all", 20, 3),
    "fork-3-s0": ("fork", None, 20, 3),
    "fork-3-all": ("fork", "all", 20, 3),
}


def measure(sweep: Path, out: Path, label: str) -> dict:
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
    summary = run_probe(config).summary
    return dict(
        sweep=sweep.name,
        variant=label,
        seeds=len(summary["seeds"]),
        sweep_order=" > ".join(summary["sweep_order"]),
        probe_order=" > ".join(summary["probe_order"]),
        spearman=round(summary["spearman_vs_sweep"], 2),
        same_top=summary["same_top_part"],
        friedman_p=summary["friedman_p"],
        distinguishable=summary["distinguishable"],
        cost_fraction=round(summary["cost_fraction"], 4),
        probe_only_fraction=round(summary["probe_only_fraction"], 4),
        probe_seconds=summary["probe_seconds"],
        sweep_seconds=round(summary["sweep_seconds"], 1),
    )


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
            rows.append(measure(sweep, args.out, label))
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
            pd.DataFrame(rows).to_csv(table_path, index=False)
    print(f"table in {table_path}")


if __name__ == "__main__":
    main()
