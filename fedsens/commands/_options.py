"""The training knobs every training command takes (`train`, `sweep`, `compare`), defined once.

`training_options(default_preset)` appends one block of options to a command's signature and hands
them to it as one dict, `knobs`, of RunConfig fields (None = not given, so the preset's value stays).
Each option's help shows the value the command uses when it is left out: the command's default
preset's (the embedded default), and says that a `--preset` sets its own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Knob:
    name: str  # the RunConfig field (or `augment`, which sets augment_shift and augment_scale)
    kind: Any
    help: str
    flag: str = ""  # the option's spelling when not --<name with dashes>


KNOBS = (
    Knob(
        "model",
        str,
        "Model preset (vit-micro, vit-mini, vit-nano, vit_tiny_patch16_224, vit_small_patch16_224) or a timm name "
        "of a supported family (`fedsens models`: ViT, DeiT, Swin, EVA, BEiT, CaiT).",
    ),
    Knob(
        "model_args",
        list[str],
        "A timm constructor option KEY=VALUE, repeatable: --model-arg depth=4 --model-arg img_size=32.",
        "--model-arg",
    ),
    Knob(
        "pretrained",
        bool,
        "timm's pretrained weights for --model, from the local Hugging Face cache only (never downloads).",
        "--pretrained/--no-pretrained",
    ),
    Knob("weights", str, "A weights file (safetensors or torch state dict) loaded through timm's pretrained loading."),
    Knob("clients", int, "Number of clients."),
    Knob("join_ratio", float, "Share of the clients sampled each round."),
    Knob("rounds", int, "Federated rounds."),
    Knob("local_epochs", int, "Local epochs per round."),
    Knob("local_steps", int, "Local steps per round instead of epochs (overrides --local-epochs)."),
    Knob("batch_size", int, "Local batch size."),
    Knob("optimizer", str, "Local optimizer: sgd (the paper's) or adamw (fresh per client and round)."),
    Knob("lr", float, "Local learning rate."),
    Knob("momentum", float, "SGD momentum (the paper's: 0)."),
    Knob("weight_decay", float, "Weight decay."),
    Knob("augment", bool, "Random shifts and rescaling while training (the paper's: off).", "--augment/--no-augment"),
    Knob(
        "partition_rule",
        str,
        "Dirichlet rule: plain, or capped (the public code's: no more samples to a client once it holds N/clients).",
    ),
    Knob("min_samples", int, "Fewest samples a client may hold; partitions are redrawn until it holds."),
    Knob(
        "eval_protocol",
        str,
        "Headline evaluation (both are recorded): after-aggregation (every client with "
        "the aggregated model) or paper (each participant before aggregation, the others with the "
        "start-of-round model).",
    ),
    Knob("eval_every", int, "Evaluate every client every N rounds (and at the last)."),
    Knob(
        "client_batch",
        int,
        "Participants of a round trained together, K at a time (1: one at a time; methods with their own "
        "training, FedRep, FedBABU, APFL and Per-FedAvg, always train one at a time).",
    ),
    Knob(
        "backbone",
        str,
        "train (every parameter trains) or freeze (only the mechanisms' added tensors, the local tensors and the "
        "classifier head train: the usual set-up with a pretrained model, FedPEFT / pFedPG).",
    ),
)


def _shown(value: Any, knob: Knob, run: dict[str, Any]) -> str:
    if knob.name == "augment":
        return "on" if run["augment_shift"] or run["augment_scale"] else "off"
    if value is None:
        return "none (one test and one train sample)" if knob.name == "min_samples" else "none"
    if knob.name == "model_args":
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    if knob.name == "pretrained":
        return "on" if value else "off"
    return str(value)


def _help(knob: Knob, preset_name: str) -> str:
    from fedsens.personalize import presets  # light: dataclasses and the model table only

    run = presets.get(preset_name).defaults()
    value = run.get(knob.name)
    # parentheses, not brackets: typer's rich help would read [..] as markup and drop it
    return f"{knob.help} (default: {_shown(value, knob, run)}, the {preset_name} preset's; a --preset sets its own)"


def to_run_fields(knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs as RunConfig fields (None where not given)."""
    fields = {k: v for k, v in knobs.items() if k != "augment"}
    if fields.get("model_args") is not None:
        from fedsens.personalize import model_args  # light: no torch

        fields["model_args"] = model_args.parse(fields["model_args"]) or None
    augment = knobs.get("augment")
    if augment is not None:
        from fedsens.personalize.config import RunConfig

        on = RunConfig()
        fields["augment_shift"] = on.augment_shift if augment else 0.0
        fields["augment_scale"] = on.augment_scale if augment else 0.0
    return fields


def _add_options(command: F, added: list[inspect.Parameter], into: str, convert: Callable[[dict], Any]) -> F:
    """`command` with the `added` options at the end of its signature; their values reach it as one keyword
    argument, `into` (which the command declares), made by `convert` from {option name: value}."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != into]
    names = [p.name for p in added]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name, None) for name in names}
        return command(*args, **{into: convert(given)}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
    return wrapper  # type: ignore[return-value]


def _option(name: str, annotation: Any, option: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def training_options(default_preset: str) -> Callable[[F], F]:
    """Add the KNOBS block at the end of a command's options; the command receives them as `knobs`."""

    def decorate(command: F) -> F:
        added = [
            _option(
                knob.name,
                knob.kind | None,
                typer.Option(
                    None,
                    knob.flag or f"--{knob.name.replace('_', '-')}",
                    help=_help(knob, default_preset),
                    show_default=False,
                ),
            )
            for knob in KNOBS
        ]
        return _add_options(command, added, "knobs", to_run_fields)

    return decorate


@dataclass(frozen=True)
class Execution:
    """Where a grid's runs train: the executor options of `sweep` and `compare`, as given."""

    jobs: int | None
    executor: str
    ray_address: str | None
    cpus_per_cell: float
    gpus_per_cell: float | None

    def config(self, default_jobs: int):
        """The executors.ExecutorConfig these options ask for (`default_jobs` where --jobs is not given)."""
        from fedsens.sensitivity import executors  # not at CLI start-up

        return executors.from_options(
            self.executor, self.jobs, default_jobs, self.cpus_per_cell, self.gpus_per_cell, self.ray_address
        )


def executor_options(unit: str, jobs_default: str) -> Callable[[F], F]:
    """Add --jobs/--executor/--ray-address/--cpus-per-cell/--gpus-per-cell; the command receives `execution`.
    `unit` names what is trained at a time (cell, run); `jobs_default` says what --jobs is when left out."""

    def decorate(command: F) -> F:
        added = [
            _option(
                "jobs",
                int | None,
                typer.Option(
                    None,
                    "--jobs",
                    help=f"{unit.capitalize()}s trained at a time in worker processes on this machine, each with "
                    f"--threads torch threads (1: one after another in this process; {jobs_default}; "
                    f"with GPUs one {unit} per GPU, round-robin).",
                ),
            ),
            _option(
                "executor",
                str,
                typer.Option("local", "--executor", help=f"local (this machine) or ray (one Ray task per {unit})."),
            ),
            _option(
                "ray_address",
                str | None,
                typer.Option(
                    None,
                    "--ray-address",
                    help="With --executor ray: auto or HOST:PORT of a cluster (default: start one here).",
                ),
            ),
            _option(
                "cpus_per_cell",
                float,
                typer.Option(1.0, "--cpus-per-cell", help=f"With --executor ray: CPUs per {unit}."),
            ),
            _option(
                "gpus_per_cell",
                float | None,
                typer.Option(
                    None, "--gpus-per-cell", help=f"GPUs per {unit} (default: 1 where there are GPUs, else 0)."
                ),
            ),
        ]
        return _add_options(command, added, "execution", lambda given: Execution(**given))

    return decorate
