"""Benchmark: the quick preset sweep with --jobs 1 and then --jobs 2, back to back, into temporary folders.

Prints both wall times, their ratio and whether sensitivity.csv, ranking.csv and divergence.csv are
identical. Not a test: run it on a quiet machine, from the repository root:

    .venv/bin/python benchmarks/parallel_sweep.py            # 21 cells of 30 rounds, twice
    .venv/bin/python benchmarks/parallel_sweep.py --out DIR  # ... keeping both sweep folders in DIR
    .venv/bin/python benchmarks/parallel_sweep.py --small    # 7 cells (one seed) of 5 rounds, twice
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

TABLES = ("sensitivity", "ranking", "divergence")
TIMING = ["seconds"]


def sweep(out: Path, jobs: int, small: bool) -> float:
    """Wall seconds of one `fedsens sweep` (the quick preset), run as a user would run it."""
    command = [sys.executable, "-m", "fedsens.cli", "sweep", "--quiet", "--out", str(out), "--jobs", str(jobs)]
    if small:
        command += ["--seeds", "0", "--rounds", "5"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def identical(first: Path, second: Path) -> dict[str, bool]:
    read = lambda folder, name: pd.read_csv(folder / f"{name}.csv").drop(columns=TIMING, errors="ignore")  # noqa: E731
    return {name: read(first, name).equals(read(second, name)) for name in TABLES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="one seed, 5 rounds (7 cells) instead of 3 seeds, 30")
    parser.add_argument("--out", type=Path, help="keep the two sweep folders here (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=2, help="the parallel run's --jobs (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsens-bench-") as scratch:
        tmp = args.out or Path(scratch)
        serial = sweep(Path(tmp) / "jobs1", 1, args.small)
        print(f"--jobs 1: {serial:.0f} s", flush=True)
        parallel = sweep(Path(tmp) / f"jobs{args.jobs}", args.jobs, args.small)
        print(f"--jobs {args.jobs}: {parallel:.0f} s")
        print(f"ratio: {parallel / serial:.2f}")
        same = identical(Path(tmp) / "jobs1", Path(tmp) / f"jobs{args.jobs}")
        print("identical tables: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in same.items()))


if __name__ == "__main__":
    main()
