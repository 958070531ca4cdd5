"""Hundreds of generated bad command lines: each ends in one clear line and exit 2, never a traceback.

Every generated invocation carries exactly one bad value (from the table below) among valid, cheap options,
so it must fail before any real training; the message must name the offending option or path.
"""

import random
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from fedsens.cli import app

CHEAP = {"--dataset": "synthetic", "--model": "vit-nano", "--clients": "4", "--rounds": "1"}
CHEAP_SPLIT = {"--dataset": "synthetic", "--clients": "4"}

# option -> bad values; the message must mention the option's name (without dashes) or the value.
BAD_RUN_OPTIONS = {
    "--rounds": ["0", "-3", "many", "1.5"],
    "--clients": ["0", "-1", "x", "100000"],
    "--alpha": ["0", "-0.5", "nan?", "abc"],
    "--join-ratio": ["0", "1.5", "-1", "half"],
    "--lr": ["0", "-0.1", "fast"],
    "--local-epochs": ["0", "-2", "e"],
    "--batch-size": ["0", "-8", "big"],
    "--optimizer": ["adam", "SGDX", ""],
    "--model": ["vit-huge", "resnet50", ""],
    "--dataset": ["imagenet", "cifar10", ""],
    "--partition": ["random", "dirichlet2", ""],
    "--seed": ["s0", "1.5"],
    "--eval-every": ["0", "-1", "x"],
    "--device": ["cuda:7", "tpu", "gpu0"],
}
BAD_TRAIN_ONLY = {
    "--personalize": ["heads", "attn@9-11", "attn@3-1", "blocks.99", "none,head", "mlp@x"],
    "--method": ["fedprox", "FedAvg", ""],
}
BAD_GRID_OPTIONS = {
    "--seeds": ["a,b", "0,x", "1.5"],
    "--alphas": ["-1", "0", "x"],
    "--preset": ["slow", "paper-imagenet", ""],
}
BAD_SWEEP_ONLY = {"--div-every": ["0", "-1", "x"], "--parts": ["heads", "attn@99"]}
BAD_COMPARE_ONLY = {"--methods": ["fedprox", "fedavg,nope", ""]}
BAD_SPLIT = {
    "--clients": ["0", "x", "100000"],
    "--alpha": ["0", "-1", "x"],
    "--scheme": ["random", ""],
    "--test-fraction": ["0", "1", "1.5", "x"],
    "--dataset": ["imagenet", ""],
}


def _generate(rng: random.Random, tmp: Path) -> list[tuple[list[str], str, str]]:
    """(argv, offending option, bad value) triples, a fixed number per command."""
    plans = [
        (["train"], {**BAD_RUN_OPTIONS, **BAD_TRAIN_ONLY}, CHEAP, 90),
        (["sweep"], {**BAD_RUN_OPTIONS, **BAD_GRID_OPTIONS, **BAD_SWEEP_ONLY}, CHEAP, 60),
        (["compare"], {**BAD_RUN_OPTIONS, **BAD_GRID_OPTIONS, **BAD_COMPARE_ONLY}, CHEAP, 50),
        (["data", "split"], BAD_SPLIT, CHEAP_SPLIT, 40),
    ]
    cases = []
    for command, table, cheap, count in plans:
        for i in range(count):
            option = rng.choice(sorted(table))
            value = rng.choice(table[option])
            good = [key for key in cheap if key != option]
            rng.shuffle(good)  # options in any order
            argv = [*command, *(x for key in good for x in (key, cheap[key])), option, value]
            argv += ["--out", str(tmp / f"{command[-1]}-{i}"), "--quiet"]
            cases.append((argv, option, value))
    return cases


def test_generated_bad_command_lines_fail_cleanly(tmp_path):
    runner = CliRunner()
    outcome: Counter = Counter()
    failures = []
    for argv, option, value in _generate(random.Random(12), tmp_path):
        result = runner.invoke(app, argv)
        text = result.output
        named = option.lstrip("-") in text or option.lstrip("-").replace("-", "_") in text or (value and value in text)
        if "Traceback" in text or (result.exception is not None and not isinstance(result.exception, SystemExit)):
            outcome["traceback"] += 1
            failures.append((argv, "traceback", text[-400:] or repr(result.exception)))
        elif result.exit_code == 0:
            outcome["accepted"] += 1
            failures.append((argv, "accepted", text[-200:]))
        elif result.exit_code != 2:
            outcome[f"exit {result.exit_code}"] += 1
            failures.append((argv, f"exit {result.exit_code}", text[-200:]))
        elif not named:
            outcome["unnamed"] += 1
            failures.append((argv, "message does not name the option or value", text[-300:]))
        else:
            outcome["clear"] += 1
    print(dict(outcome))
    assert not failures, "\n".join(f"{' '.join(a)}\n  -> {why}: {out}" for a, why, out in failures[:15])
