"""`fedsens train`: one federated run. Options left out take RunConfig's defaults (the embedded default)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors
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
    dataset: str | None = typer.Option(
        None, help="digits (embedded default), synthetic, cifar100, organamnist, officehome"
    ),
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
    method: str | None = typer.Option(
        None,
        help="fedavg (default), fedperfix, fedper, fedbn, fedrep, fedbabu, "
        "apfl, perfedavg, local, vanilla-attention, vanilla-prefix",
    ),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu, cuda, cuda:1"),
    eval_every: int | None = typer.Option(None, help="evaluate every client every N rounds"),
    out: Path = typer.Option(Path("runs/train"), help="run folder"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over even if --out holds a run"),
    finetune_steps: int | None = typer.Option(None, help="FedBABU: local fine-tuning steps before evaluation"),
    fedperfix_local: str | None = typer.Option(None, help="FedPerfix: extra parts kept local, e.g. blocks.11"),
    plugin_scale: float | None = typer.Option(None, help="FedPerfix/vanilla-prefix: scale of the K/V offsets"),
    plugin_mid_dim: int | None = typer.Option(None, help="FedPerfix: adapter width"),
    plugin_depth: int | None = typer.Option(None, help="FedPerfix: plugins in the last N blocks only"),
    plugin_init: str | None = typer.Option(None, help="vanilla-prefix: zero or random initial offsets"),
    apfl_alpha: float | None = typer.Option(None, help="APFL: initial mixing weight of the personal model"),
    perfedavg_beta: float | None = typer.Option(None, help="Per-FedAvg: outer step size (default: --lr)"),
    fedrep_head_epochs: int | None = typer.Option(None, help="FedRep: head epochs before the body's"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    engine: str = typer.Option(
        "builtin",
        help="builtin (fedsens's round loop), flower (Flower's simulation engine, ClientApps in this process) "
        "or flower-ray (Flower's simulation engine on Ray actors)",
    ),
) -> None:
    """Run one federated training.

    Writes config.json, partition.json, parts.csv, metrics.csv, rounds.csv and summary.json into --out.
    """
    config = run_config(**{k: v for k, v in locals().items() if k not in RUN_FLAGS})
    if engine == "builtin":
        from fedsens.personalize.federation import run

        result = run(config, resume=resume, overwrite=overwrite, quiet=quiet)
    else:
        from fedsens.personalize.flower.engine import run_on_flower

        result = run_on_flower(engine, config, resume=resume, overwrite=overwrite, quiet=quiet)
    s = result.summary
    what = f"personalize={config.personalize}" if config.method == "fedavg" else f"method={config.method}"
    typer.echo(
        f"{what}: mean client accuracy last {s['acc_last']:.3f}, "
        f"best {s['acc_best']:.3f} (round {s['round_best']}); {s['seconds_per_round']:.2f} s/round; "
        f"{s['local_params']:,} local params; tables in {result.out}"
    )


# train's options that say how to run, not what: the rest make the RunConfig (also `fedsens flower app`'s)
RUN_FLAGS = ("resume", "overwrite", "quiet", "engine")


def run_config(
    *, out: Path, partition: str | None, personalize: str | None, sweep_dir: Path | None, top: int, **options
):
    """The RunConfig that train's options describe (every other option is named as its RunConfig field);
    options left out (None) take RunConfig's defaults."""
    from fedsens.personalize.config import RunConfig

    given = {**options, "scheme": partition, "personalize": _resolve_auto(personalize, sweep_dir, top)}
    return RunConfig(out=str(out), **{k: v for k, v in given.items() if v is not None})
