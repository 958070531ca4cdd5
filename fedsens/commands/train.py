"""`fedsens train`: one federated run. Options left out take RunConfig's defaults (the embedded default)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsens.commands._common import clean_errors
from fedsens.commands._options import training_options
from fedsens.commands.data import NO_VERIFY_HELP, dataset_help
from fedsens.commands.methods import method_option, options_option
from fedsens.personalize import presets
from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import SCHEMES


def _resolve_auto(personalize: str | None, sweep_dir: Path | None, top: int, budget: str | None):
    """`--personalize auto --from SWEEP --top K` -> the K parts the sweep ranked most sensitive; with `--budget N`
    the resolved cells of highest predicted gain within N local parameters (and that placement, else None)."""
    if budget is not None and personalize != "auto":
        raise UserError("--budget only makes sense with --personalize auto --from SWEEP_DIR")
    if personalize != "auto":
        return personalize, None
    if sweep_dir is None:
        raise UserError("--personalize auto needs --from SWEEP_DIR (a folder written by `fedsens sweep`)")
    if budget is not None:
        from fedsens.sensitivity.placement import parse_budget, place_within_budget

        placement = place_within_budget(sweep_dir, parse_budget(budget))
        typer.echo(f"--personalize auto --budget {budget}: {placement.spec!r}; {placement.why}")
        return placement.spec, placement
    from fedsens.sensitivity.ranking import top_parts

    spec = top_parts(sweep_dir, top)
    typer.echo(f"--personalize auto: the sweep in {sweep_dir} ranks {spec!r} as the top {top}")
    return spec, None


def _place_fedperfix(method: str | None, sweep_dir: Path | None, top_blocks: int | None):
    """`--method fedperfix --from SWEEP --top-blocks K` -> the placement the sweep's ranking chooses (or None):
    FedPerfix's `blocks` (where the adapters go) and `local` (parts ranked above attention) options."""
    if method != "fedperfix" or sweep_dir is None:
        if top_blocks is not None:
            raise UserError("--top-blocks only makes sense with --method fedperfix --from SWEEP_DIR")
        return None
    from fedsens.sensitivity.placement import place_fedperfix

    placement = place_fedperfix(sweep_dir, top_blocks or 1)
    typer.echo(f"--method fedperfix --from {sweep_dir}: {placement.why}")
    return placement


RUN_FLAGS = ("resume", "overwrite", "quiet", "engine")  # how train runs, not what: not part of the RunConfig


def run_config(
    *,
    dataset: str | None,
    data_root: str | None,
    partition: str | None,
    alpha: float | None,
    personalize: str | None,
    sweep_dir: Path | None,
    top: int,
    budget: str | None,
    seed: int | None,
    device: str | None,
    out: Path,
    preset_name: str,
    method: str | None,
    option: list[str] | None,
    no_verify: bool,
    top_blocks: int | None,
    client_store: str | None,
    checkpoint_every: int | None,
    data_option: list[str] | None,
    knobs: dict,
):
    """The RunConfig train's options describe (and the sweep's FedPerfix placement, or None): the preset, its
    settings for the method, then every option given. `fedsens flower app` builds its config the same way."""
    from fedsens.personalize.options import parse_assignments

    if sweep_dir is not None and personalize != "auto" and method != "fedperfix":
        raise UserError("--from only makes sense with --personalize auto or --method fedperfix")
    placement = _place_fedperfix(method, sweep_dir, top_blocks)
    spec, budgeted = _resolve_auto(personalize, sweep_dir, top, budget)
    given = {
        "dataset": dataset,
        "data_root": data_root,
        "scheme": partition,
        "alpha": alpha,
        "personalize": spec,
        "method": method,
        "seed": seed,
        "device": device,
        "verify": False if no_verify else None,
        "client_store": client_store,
        "checkpoint_every": checkpoint_every,
        "data_options": parse_assignments(data_option, flag="-d", example="num_samples=96", lister="fedsens data list")
        or None,
    }
    chosen = presets.get(preset_name)
    # the preset's settings for the method (Per-FedAvg's lr, FedPerfix's adapter ...), then every option
    # given; -o options are laid over the preset's method options
    own = chosen.method_settings(method or chosen.run_config().method)
    given_options = parse_assignments(option)
    options = {**own.get("method_options", {}), **given_options}
    if placement is not None:  # the sweep's placement, unless -o says otherwise
        placed = {"blocks": ",".join(map(str, placement.blocks)), "local": placement.local}
        options = {**options, **{k: v for k, v in placed.items() if k not in given_options}}
    config = presets.overlay(chosen.run_config(**own), out=str(out), method_options=options or None, **given, **knobs)
    return config, placement or budgeted


@clean_errors
@training_options("embedded")
def train(
    dataset: str | None = typer.Option(
        None, help=dataset_help("Dataset (default: digits, the embedded default; a --preset sets its own)")
    ),
    data_root: str | None = typer.Option(
        None, help="folder holding the dataset files (default: none, digits need none)"
    ),
    partition: str | None = typer.Option(
        None,
        "--partition",
        "--scheme",
        help=f"{' | '.join(SCHEMES)}, or a partition.json (default: dirichlet; a preset sets its own)",
    ),
    alpha: float | None = typer.Option(
        None, help="Dirichlet concentration, small = strong label skew (default: 0.3; a --preset sets its own)"
    ),
    personalize: str | None = typer.Option(
        None,
        help="parts kept local: none (FedAvg), all (local only), "
        "attn,head, attn@9-11, blocks.11, plugin, or auto (with --from); a term may say how it is kept: "
        "attn:lora,head, mlp:lora:r=8, attn:lora-b, norm:bias, attn:adapter, embed:prompt, attn:prompt-deep, "
        "attn:finetune:steps=20 (docs/mechanisms.md)",
    ),
    sweep_dir: Path | None = typer.Option(None, "--from", help="sweep folder whose ranking --personalize auto uses"),
    top: int = typer.Option(2, help="with --personalize auto: how many top-ranked parts to keep local"),
    budget: str | None = typer.Option(
        None,
        "--budget",
        help="with --personalize auto --from SWEEP: keep the sweep's resolved (part, mechanism) cells of highest "
        "predicted gain within this many local parameters per client, e.g. 20k (reasoning in placement.json)",
    ),
    seed: int | None = typer.Option(None, help="seed of the partition, sampling, init and batches (default: 0)"),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu, cuda, cuda:1 (default: auto)"),
    out: Path = typer.Option(Path("runs/train"), help="run folder"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over even if --out holds a run"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    preset_name: str = typer.Option(
        "embedded",
        "--preset",
        help=f"{presets.names_help('embedded')}; embedded is RunConfig's CPU settings. "
        "Options you give override the preset.",
    ),
    method: str | None = method_option(help="the personalized-FL method (fedavg by default); `fedsens methods`"),
    option: list[str] | None = options_option(),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    top_blocks: int | None = typer.Option(
        None,
        "--top-blocks",
        help="with --method fedperfix --from SWEEP: adapters in the K blocks the sweep ranks most sensitive "
        "(default 1); parts ranked above attention are kept local too; written to placement.json",
    ),
    client_store: str | None = typer.Option(
        None,
        help="memory (default) or disk: the clients' own tensors in one file per tensor under OUT/clients "
        "(client state larger than RAM)",
    ),
    checkpoint_every: int | None = typer.Option(
        None, help="write the checkpoint every N rounds (default 1; 10 when the in-memory client state is > 256 MB)"
    ),
    data_option: list[str] | None = typer.Option(
        None,
        "--data-option",
        "-d",
        help="the dataset's own option KEY=VALUE (repeatable; `fedsens data list` lists each dataset's), "
        "e.g. -d num_samples=80000 for a synthetic population of 10,000 x 8",
    ),
    engine: str = typer.Option(
        "builtin",
        help="builtin (fedsens's round loop), flower (Flower's simulation engine, ClientApps in this process) "
        "or flower-ray (Flower's simulation engine on Ray actors)",
    ),
    *,
    knobs: dict,
) -> None:
    """Run one federated training.

    Writes protocol.json, config.json, partition.json, parts.csv, metrics.csv, rounds.csv and summary.json
    into --out.
    """
    from fedsens.personalize import runio

    options = {k: v for k, v in locals().items() if k not in (*RUN_FLAGS, "runio")}
    config, placement = run_config(**options)
    record = presets.protocol(config, preset=preset_name)
    typer.echo(presets.protocol_text(record))
    if engine == "builtin":
        from fedsens.personalize.federation import run

        result = run(config, resume=resume, overwrite=overwrite, quiet=quiet)
    else:
        from fedsens.personalize.flower.engine import run_on_flower

        result = run_on_flower(engine, config, resume=resume, overwrite=overwrite, quiet=quiet)
    # written once the run holds the folder (a second process on it is refused before it writes anything)
    presets.write_protocol(out, record)
    if placement is not None:
        runio.write_json(out / "placement.json", {**placement.as_dict(), "sweep": str(sweep_dir)})
    s = result.summary
    if s.get("status") == "diverged":
        typer.echo(f"error: the run diverged: {s['diverged']['message']}; tables up to round {s['rounds']} in {out}")
        raise typer.Exit(3)
    what = f"personalize={config.personalize}" if config.method == "fedavg" else f"method={config.method}"
    typer.echo(
        f"{what}: mean client accuracy ({s['protocol']} evaluation) last {s['acc_last']:.3f}, "
        f"best {s['acc_best']:.3f} (round {s['round_best']}); {s['seconds_per_round']:.2f} s/round; "
        f"{s['local_params']:,} local params; tables in {result.out}"
    )
