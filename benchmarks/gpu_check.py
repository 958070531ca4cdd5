"""The GPU path measured in one table: `bash benchmarks/gpu_check.sh` runs this (after installing what is missing).

    python benchmarks/gpu_check.py [--smoke] [--out DIR] [--budget SECONDS]   # every part, one table
    python benchmarks/gpu_check.py --part NAME [--smoke] --out DIR             # one part (the driver runs these)

Four parts, each in its own process under its own time limit, inside one overall budget (default 450 s):
  tests       the `gpu`-marked tests (tests/test_cuda.py: the CUDA path, bf16, batched evaluation, the disk
              store, two identical runs give identical tables), one row per test
  throughput  ViT-S/16 at 224, one client's local training images/s through the engine against a plain timm
              training step at the same batch (goal >= 0.9x), and its model FLOPs utilisation against the
              measured bf16 matmul peak (`fedsens bench --throughput`'s measurement)
  paper-round one paper-CIFAR-100 round on synthetic data of the paper's shape (64 clients, 8 a round,
              10 local epochs of ~700 images, 100 classes, ViT-S/16 at 224), and the hours its 50 rounds take
  sweep       the quick sweep's cells (one seed, a few rounds) one at a time in this process against several
              packed on the one GPU (`--jobs N --gpus-per-cell 1/N`); whether both give the same tables
Each part writes its rows as it measures them (DIR/parts/NAME.json), so a part cut by its time limit still
leaves what it measured. The table: DIR/gpu_check.csv and DIR/gpu_check.md, one row per measure: part, name,
value, unit, goal, result (pass, fail, measured, skipped).

`--smoke` runs the same code on the CPU with tiny settings (vit-nano, 2 clients, 1 round, a few steps) in
about a minute; the test suite runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ("part", "name", "value", "unit", "goal", "result")


@dataclass(frozen=True)
class Part:
    name: str
    seconds: int  # its time limit on the GPU
    smoke_seconds: int  # ... and with --smoke on the CPU
    needs: tuple[str, ...] = ()  # modules it cannot run without (beyond torch, timm and fedsens's own)


PARTS = (
    Part("tests", 100, 60, needs=("pytest",)),
    Part("throughput", 90, 60),
    Part("paper-round", 150, 60),
    Part("sweep", 150, 120, needs=("tqdm", "scipy")),
)


def missing(modules) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


# ---- the rows a part writes ------------------------------------------------------------------------


class Rows:
    """A part's rows, rewritten to its file after each one, so that a part killed on its time limit keeps them."""

    def __init__(self, part: str, out: Path):
        self.part, self.path, self.rows = part, out / "parts" / f"{part}.json", []
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, value, unit: str = "", goal: str = "", result: str = "measured") -> None:
        self.rows.append(dict(part=self.part, name=name, value=value, unit=unit, goal=goal, result=result))
        self.path.write_text(json.dumps(self.rows, indent=1))

    def replace(self, prefix: str) -> None:
        """Drop the rows whose name starts with `prefix` (a measure updated as the part goes on)."""
        self.rows = [row for row in self.rows if not row["name"].startswith(prefix)]


def at_least(value: float, goal: float) -> str:
    return "pass" if value >= goal else "fail"


def at_most(value: float, goal: float) -> str:
    return "pass" if value <= goal else "fail"


def device_for(smoke: bool):
    import torch

    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; on a CPU run it with --smoke")
    return torch.device("cuda")


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- (a) the gpu-marked tests ----------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test modules holding `gpu`-marked tests (only they are collected: the others may import packages
    that a GPU machine lacks)."""
    return sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in path.read_text(encoding="utf-8")
    )


def part_tests(rows: Rows, smoke: bool, out: Path) -> None:
    report = out / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}"]
    done = subprocess.run([*command, *gpu_test_files()], cwd=REPO, capture_output=True, text=True)
    (out / "gpu-tests.log").write_text(done.stdout + done.stderr)
    if not report.exists():
        rows.add("gpu tests: pytest wrote no report", done.returncode, "exit code", "0", "fail")
        return
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        result = {"passed": "pass", "failed": "fail", "skipped": "skipped"}[outcome]
        rows.add(f"gpu test: {case.get('name')}", outcome, "", "passed", result)


# ---- (b) ViT-S/16 training images/s against a plain timm step --------------------------------------


def part_throughput(rows: Rows, smoke: bool, out: Path) -> None:
    from fedsens.personalize.benchmark import measure_throughput

    device = device_for(smoke)
    model, batch, steps = ("vit-nano", 8, 2) if smoke else ("vit_small_patch16_224", 64, 30)
    row = measure_throughput(model, batch, steps, str(device), out / "throughput-run")
    label = f"{model} batch {batch}"
    rows.add(f"{label}: engine, one client's local training", row["fedsens_images_s"], "images/s")
    rows.add(f"{label}: plain timm training step", row["plain_images_s"], "images/s")
    rows.add(f"{label}: engine / plain step", row["ratio"], "x", ">= 0.9", at_least(row["ratio"], 0.9))
    rows.add(f"{label}: model FLOPs a training image (fwd+bwd, counted)", row["train_gflop_per_image"], "GFLOP")
    rows.add(f"{label}: engine model FLOPs utilisation", row["fedsens_mfu"], "of peak")
    rows.add(f"{label}: plain step model FLOPs utilisation", row["plain_mfu"], "of peak")
    precision = "bf16" if device.type == "cuda" else "fp32"
    rows.add(f"measured {precision} matmul peak ({row['device']})", row["peak_tflop_s"], "TFLOP/s")


# ---- (c) one paper-CIFAR-100 round on synthetic data of its shape ---------------------------------


def paper_round_config(smoke: bool, device, out: Path):
    """The paper-cifar100 preset on synthetic data of CIFAR-100's shape (60,000 32x32 images of 100 classes,
    so 64 clients hold ~940, ~700 of them to train); smoke: vit-nano, 2 clients, 2 steps."""
    from fedsens.personalize import presets

    data = dict(num_samples=60000, num_classes=100, image_size=32)
    changes: dict = dict(dataset="synthetic", data_options=data, rounds=2, device=str(device), out=str(out))
    if smoke:
        changes.update(
            model="vit-nano", clients=2, join_ratio=1.0, rounds=1, local_steps=2, batch_size=8, min_samples=8,
            data_options=dict(num_samples=64, num_classes=10, image_size=32),
        )  # fmt: skip
    return presets.get("paper-cifar100").run_config(**changes)


class RoundTimer:
    """A hook that times each round and writes the part's rows after it (a round of the paper's shape takes
    tens of seconds: the part may be cut before the second)."""

    table = None

    def __init__(self, rows: Rows, planned_rounds: int = 50):
        self.rows, self.planned = rows, planned_rounds

    def on_run_start(self, ctx) -> None:
        from fedsens.personalize.benchmark import count_flops, measure_peak_flops

        self.ctx = ctx
        self.train_flops, self.test_flops = count_flops(ctx)
        self.peak = measure_peak_flops(ctx.device)
        synchronize(ctx.device)
        self.started = time.perf_counter()

    def on_client_start(self, round, client, model) -> None:
        pass

    def on_client_end(self, round, client, model) -> None:
        pass

    def on_round_end(self, round: int) -> list[dict]:
        from fedsens.personalize.engine.rounds import sample_clients

        synchronize(self.ctx.device)
        seconds = time.perf_counter() - self.started
        config, partition = self.ctx.config, self.ctx.partition
        trained = sum(len(partition.train[c]) for c in sample_clients(config, round)) * config.local_epochs
        if config.local_steps is not None:
            trained = len(sample_clients(config, round)) * config.local_steps * config.batch_size
        tested = sum(len(t) for t in partition.test)
        # the paper protocol evaluates the participants after training and everyone after aggregation
        evaluated = tested + sum(len(partition.test[c]) for c in sample_clients(config, round))
        flops = trained * self.train_flops + evaluated * self.test_flops
        which = "round 1 (with the warm-up)" if round == 1 else f"round {round}"
        shape = f"{config.clients} clients, {len(sample_clients(config, round))} a round, {config.model}"
        self.rows.replace("paper-cifar100 ")
        self.rows.add(f"paper-cifar100 {which}: {shape}", seconds, "s")
        self.rows.add(f"paper-cifar100 {which}: training images", trained, "images")
        self.rows.add(f"paper-cifar100 {which}: model FLOPs utilisation", flops / seconds / self.peak, "of peak")
        self.rows.add(f"paper-cifar100 {which}: {self.planned} rounds projected", seconds * self.planned / 3600, "h")
        synchronize(self.ctx.device)
        self.started = time.perf_counter()
        return []


def part_paper_round(rows: Rows, smoke: bool, out: Path) -> None:
    from fedsens.personalize import federation

    config = paper_round_config(smoke, device_for(smoke), out / "paper-round-run")
    federation.run(config, hooks=[RoundTimer(rows)], overwrite=True, quiet=True)


# ---- (d) the quick sweep's cells packed on the GPU against one at a time ---------------------------


def sweep_config(smoke: bool, device, out: Path):
    """The quick sweep, one seed and a few rounds (the reference check off: a few rounds need not learn);
    digits needs scikit-learn: without it, synthetic data of the digits' size stands in (said in the row)."""
    import dataclasses

    from fedsens.sensitivity import sweep

    config = sweep.preset("quick")
    dataset = "digits" if not missing(["sklearn"]) else "synthetic"
    run = config.run.replace(dataset=dataset, rounds=1 if smoke else 5, device=str(device))
    if dataset == "synthetic":
        run = run.replace(data_options=dict(num_samples=1797, image_size=8))
    parts = ("none", "head", "norm") if smoke else config.parts  # smoke: 2 cells after the reference, so a pool
    if smoke:
        run = run.replace(model="vit-nano")
    return dataclasses.replace(config, run=run, seeds=(0,), parts=parts, out=str(out), quiet=True, force=True)


def part_sweep(rows: Rows, smoke: bool, out: Path) -> None:
    import dataclasses

    import pandas as pd
    import torch

    from fedsens.sensitivity import executors, sweep

    device = device_for(smoke)
    packed = 2 if smoke else 4
    base = sweep_config(smoke, device, out)
    label = f"sweep ({base.run.dataset}, {len(base.parts)} cells of {base.run.rounds} rounds)"
    where = {
        "one cell at a time": executors.ExecutorConfig(jobs=1, threads=torch.get_num_threads()),
        f"{packed} cells packed on the {device.type.upper()}": executors.ExecutorConfig(
            jobs=packed, threads=max(1, executors.cores() // packed), gpus_per_cell=1 / packed
        ),
    }
    seconds, folders = [], []
    for name, executor in where.items():
        folders.append(out / f"sweep-{len(folders)}")
        synchronize(device)
        started = time.perf_counter()
        sweep.run_sweep(dataclasses.replace(base, out=str(folders[-1])), executor)
        seconds.append(time.perf_counter() - started)
        rows.add(f"{label}: {name}", seconds[-1], "s")
    rows.add(
        f"{label}: packed / one at a time", seconds[1] / seconds[0], "x", "< 1", at_most(seconds[1] / seconds[0], 1)
    )
    tables = [pd.read_csv(folder / "sensitivity.csv").select_dtypes("number") for folder in folders]
    measures = [column for column in tables[0] if column not in ("seconds",)]
    difference = float((tables[0][measures] - tables[1][measures]).abs().max().max())
    rows.add(
        f"{label}: largest difference of the two sensitivity tables",
        difference,
        "",
        "<= 1e-6",
        at_most(difference, 1e-6),
    )


RUNNERS = {"tests": part_tests, "throughput": part_throughput, "paper-round": part_paper_round, "sweep": part_sweep}


# ---- the driver ------------------------------------------------------------------------------------


def run_part(part: Part, smoke: bool, out: Path, seconds: float) -> list[dict]:
    """The part in its own process under its time limit; its rows, and one more saying why it stopped early."""
    log = out / "parts" / f"{part.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--part", part.name, "--out", str(out), *(["--smoke"] if smoke else [])]
    started = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=seconds).returncode
        except subprocess.TimeoutExpired:
            code = None
    saved = out / "parts" / f"{part.name}.json"
    rows = json.loads(saved.read_text()) if saved.exists() else []
    spent = time.perf_counter() - started
    if code is None:
        rows.append(_note(part.name, f"{part.name}: cut at its time limit", seconds, "s", "fail"))
    elif code != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        rows.append(_note(part.name, f"{part.name}: failed ({last[0][:160]}); see parts/{part.name}.log", code, ""))
    print(f"gpu_check: {part.name}: {len(rows)} rows in {spent:.0f} s", flush=True)
    return rows


def _note(part: str, name: str, value, unit: str, result: str = "fail") -> dict:
    return dict(part=part, name=name, value=value, unit=unit, goal="", result=result)


def write_table(rows: list[dict], out: Path) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.to_csv(out / "gpu_check.csv", index=False)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_shown(row[column]) for column in COLUMNS) + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "/")


def environment_rows(smoke: bool) -> list[dict]:
    import torch

    where = "cpu (smoke)" if smoke else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    return [
        _note("setup", "device", where, "", "measured"),
        _note("setup", "torch", torch.__version__, "", "measured"),
        _note("setup", "python", sys.version.split()[0], "", "measured"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU (the test suite's run)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_check"))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for every part together")
    parser.add_argument("--part", choices=[part.name for part in PARTS], help="run one part (the driver's call)")
    parser.add_argument("--only", action="append", help="run only this part (repeatable)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        RUNNERS[args.part](Rows(args.part, args.out), args.smoke, args.out)
        return
    if not args.smoke:
        device_for(False)  # no CUDA: say so now, not after four failed parts
    deadline = time.perf_counter() + args.budget
    rows = environment_rows(args.smoke)
    write_table(rows, args.out)
    for part in PARTS:
        if args.only and part.name not in args.only:
            continue
        absent = missing(part.needs)
        left = deadline - time.perf_counter()
        if absent:
            rows.append(_note(part.name, f"{part.name}: skipped, missing {', '.join(absent)}", "", "", "skipped"))
            print(f"gpu_check: {part.name}: skipped (missing {', '.join(absent)})", flush=True)
        elif left < 10:
            rows.append(_note(part.name, f"{part.name}: not run, the budget was spent", "", "", "skipped"))
        else:
            limit = min(part.smoke_seconds if args.smoke else part.seconds, left)
            rows.extend(run_part(part, args.smoke, args.out, limit))
        write_table(rows, args.out)
    print(f"gpu_check: {args.out / 'gpu_check.md'}")
    print((args.out / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
