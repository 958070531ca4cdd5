"""`fedsens validate`: would a sweep with these settings find a real effect? Planted datasets with known answers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedsens.commands._common import clean_errors, comma_list
from fedsens.commands._options import Execution, executor_options, training_options
from fedsens.commands.methods import method_option, options_option
from fedsens.commands.sweep import PRESET_NOTE, build_config

if TYPE_CHECKING:
    import pandas as pd


def _text(values: pd.Series) -> pd.Series:
    """A column of names as text, empty where a table holds nothing (NaN once read back from CSV)."""
    import pandas as pd

    return values.map(lambda v: "" if pd.isna(v) else str(v))


def validation_text(validation: pd.DataFrame, summary: pd.DataFrame) -> str:
    """Per planted (effect, strength) the sweep's top part and whether it was found; per effect the minimal
    detectable strength."""
    import pandas as pd

    shown = validation.assign(
        strength=[("-" if e == "none" else f"{s:g}") for e, s in zip(validation["effect"], validation["strength"])],
        expected=_text(validation["expected"]).replace("", "nothing"),
        resolved=validation["resolved_vs_next"].map(lambda v: "yes" if str(v) == "True" else "no"),
        found=validation["found"].map(lambda v: "yes" if str(v) == "True" else "NO"),
        above_zero=_text(validation["above_zero"]).replace("", "-"),
    )[
        [
            "effect",
            "strength",
            "expected",
            "top_part",
            "score",
            "boot_low",
            "boot_high",
            "resolved",
            "above_zero",
            "found",
        ]
    ]
    lines = [
        "Planted effects (known answers) at these settings: the sweep's top part, its tail gain over FedAvg and "
        "95% hierarchical bootstrap interval, whether its order against the next part is resolved, the parts "
        "resolved above zero, and found (the planted part, resolved and above zero; none: nothing above zero):",
        shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:+.3f}"),
        "",
        "Minimal detectable strength (share of domains changed) per planted effect:",
    ]
    for row in summary.itertuples():
        if row.effect == "none":
            verdict = "nothing resolved above zero" if row.found else "a FALSE POSITIVE: a part resolved above zero"
        elif row.minimal_detectable == row.minimal_detectable:  # not NaN
            verdict = f"found from strength {row.minimal_detectable:g}"
        else:
            verdict = (
                f"NOT found at any strength tried ({str(row.strengths).replace('|', ', ')}); top part {row.top_part}"
            )
        expected = "" if pd.isna(row.expected) else str(row.expected)
        lines.append(f"  {row.effect:<8} -> {expected or 'nothing':<10} {verdict}")
    return "\n".join(lines)


@clean_errors
@training_options("quick")
@executor_options("cell", "quick preset: the number of cores, else 1")
def validate(
    preset_name: str = typer.Option(
        "quick", "--preset", help=f"The sweep preset to validate: quick | paper-*. {PRESET_NOTE}"
    ),
    base: str = typer.Option("digits", "--base", help="The dataset the effects are planted in."),
    data_root: str | None = typer.Option(None, help="Folder holding the base dataset's files."),
    effects: str | None = typer.Option(
        None, help="Comma-separated planted effects (default: concept,recode,feature,none)."
    ),
    strengths: str | None = typer.Option(
        None, help="Comma-separated strengths in (0, 1], the share of domains changed (default: 0.25,0.5,1)."
    ),
    domains: int = typer.Option(4, "--domains", help="Planted domains (the clients are split evenly over them)."),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2 (quick preset: 0,1,2)."),
    div_every: int | None = typer.Option(None, help="Record the divergence metrics every N rounds."),
    out: str = typer.Option(
        "runs/sweep/validate",
        help="Validation folder; inside a sweep's --out as `validate/`, that sweep prints it beside its ranking.",
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Re-run every cell instead of resuming."),
    device: str | None = typer.Option(None, help="auto (CUDA when present), cpu or cuda. (default: auto)"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    method: str | None = method_option(help="The method every cell trains with (fedavg by default)."),
    option: list[str] | None = options_option(),
    *,
    knobs: dict,
    execution: Execution,
) -> None:
    """Run the sweep's settings on planted datasets whose answer is known, at a few strengths.

    Concept shift (each domain names the classes its own way) must rank the head first, input re-coding
    (each domain permutes the pixels inside every patch) the patch embedding, a per-domain contrast and
    brightness change the embedding or the norms, and with no effect nothing may be resolved above zero.
    Prints, per effect, the top part, whether it is resolved and the minimal detectable strength; writes
    validation.csv, validation_summary.csv, validation_metrics.csv and validate.json under --out.
    """
    import dataclasses

    from fedsens.personalize.datasets import planted
    from fedsens.personalize.methods.registry import parse_assignments
    from fedsens.personalize.presets import protocol_text
    from fedsens.sensitivity import executors
    from fedsens.sensitivity.sweep import protocol
    from fedsens.sensitivity.validate import DEFAULT_STRENGTHS, ValidateConfig, run_validate

    sweep_config = build_config(
        preset_name,
        run=dict(
            data_root=data_root,
            device=device,
            method=method,
            method_options=parse_assignments(option) or None,
            **knobs,
        ),
        sweep=dict(
            fresh=fresh,
            quiet=quiet,
            div_every=div_every,
            seeds=comma_list(seeds, int, "--seeds", "0,1,2"),
        ),
    )
    config = ValidateConfig(
        sweep=sweep_config,
        effects=comma_list(effects, str, "--effects", "concept,none") or planted.EFFECTS,
        strengths=comma_list(strengths, float, "--strengths", "0.5,1") or DEFAULT_STRENGTHS,
        base=base,
        domains=domains,
        out=out,
        quiet=quiet,
    )
    record = protocol(dataclasses.replace(sweep_config, parts=tuple(p for p in sweep_config.parts if p != "all")))
    record.update(dataset=f"planted ({base}, {domains} domains)", partition="domain", alpha="iid inside each domain")
    typer.echo(protocol_text(record))
    default_jobs = executors.cores() if preset_name == "quick" else 1
    result = run_validate(config, execution.config(default_jobs))
    typer.echo("\n" + validation_text(result.validation, result.summary))
    typer.echo(f"\n{len(result.validation)} planted sweeps in {result.seconds:.0f} s; tables in {Path(result.out)}")
