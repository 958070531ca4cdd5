"""`fedsens train`: one federated run. Options left out take RunConfig's defaults (the embedded default)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors
from fedsens.commands.data import NO_VERIFY_HELP, dataset_help
from fedsens.commands.methods import method_option, options_option
from fedsens.personalize.errors import UserError


def _resolve_auto(personalize: str | None, sweep_dir: Path | None, top: int) -> str | None:
    """`--personalize auto --from SWEEP --top K` -> the K parts the sweep ranked most sensitive."""
    if personalize != "auto":
        if sweep_dir is not None:
            raise UserError("--from only makes sense with --personalize auto")
        return personalize
    if sweep_dir is None:
        raise UserError("--personalize auto needs --from SWEEP_DIR (a folder written by `fedsens sweep`)")
    from fedsens.sensitivity.ranking import top_parts

    spec = top_parts(sweep_dir, top)
    typer.echo(f"--personalize auto: the sweep in {sweep_dir} ranks {spec!r} as the top {top}")
    return spec


@clean_errors
def train(
    dataset: str | None = typer.Option(None, help=dataset_help("Dataset (digits is the embedded default)")),
    data_root: str | None = typer.Option(None, help="folder holding the dataset files"),
    partition: str | None = typer.Option(
        None, "--partition", "--scheme", help="iid | dirichlet | pathological | domain, or a partition.json"
    ),
    alpha: float | None = typer.Option(None, help="Dirichlet concentration (small = strong label skew)"),
    clients: int | None = typer.Option(None, help="number of clients"),
    join_ratio: float | None = typer.Option(None, help="fraction of clients sampled each round"),
    rounds: int | None = typer.Option(None, help="federated rounds"),
    local_epochs: int | None = typer.Option(None, help="local epochs per round"),
    local_steps: int | None = typer.Option(None, help="local SGD steps per round (overrides --local-epochs)"),
    batch_size: int | None = typer.Option(None),
    optimizer: str | None = typer.Option(None, help="sgd (the paper's) or adamw"),
    lr: float | None = typer.Option(None, help="local learning rate"),
    model: str | None = typer.Option(
        None, help="vit-micro, vit-mini, vit-nano, vit_tiny_patch16_224, vit_small_patch16_224"
    ),
    personalize: str | None = typer.Option(
        None,
        help="parts kept local: none (FedAvg), all (local only), "
        "attn,head, attn@9-11, blocks.11, plugin, or auto (with --from)",
    ),
    sweep_dir: Path | None = typer.Option(None, "--from", help="sweep folder whose ranking --personalize auto uses"),
    top: int = typer.Option(2, help="with --personalize auto: how many top-ranked parts to keep local"),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu, cuda, cuda:1"),
    eval_every: int | None = typer.Option(None, help="evaluate every client every N rounds"),
    out: Path = typer.Option(Path("runs/train"), help="run folder"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over even if --out holds a run"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    method: str | None = method_option(help="the personalized-FL method (fedavg by default); `fedsens methods`"),
    option: list[str] | None = options_option(),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
) -> None:
    """Run one federated training.

    Writes config.json, partition.json, parts.csv, metrics.csv, rounds.csv and summary.json into --out.
    """
    from fedsens.personalize.federation import RunConfig, run
    from fedsens.personalize.methods.registry import parse_assignments

    given = {
        "dataset": dataset,
        "data_root": data_root,
        "scheme": partition,
        "alpha": alpha,
        "clients": clients,
        "join_ratio": join_ratio,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "model": model,
        "personalize": _resolve_auto(personalize, sweep_dir, top),
        "method": method,
        "seed": seed,
        "device": device,
        "eval_every": eval_every,
        "method_options": parse_assignments(option) or None,
        "verify": False if no_verify else None,
    }
    config = RunConfig(out=str(out), **{k: v for k, v in given.items() if v is not None})
    result = run(config, resume=resume, overwrite=overwrite, quiet=quiet)
    s = result.summary
    what = f"personalize={config.personalize}" if config.method == "fedavg" else f"method={config.method}"
    typer.echo(
        f"{what}: mean client accuracy last {s['acc_last']:.3f}, "
        f"best {s['acc_best']:.3f} (round {s['round_best']}); {s['seconds_per_round']:.2f} s/round; "
        f"{s['local_params']:,} local params; tables in {result.out}"
    )
