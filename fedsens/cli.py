"""The `fedsens` command line: registration only; each command lives in fedsens/commands/."""

from __future__ import annotations

import typer

from fedsens.commands import bench, compare, data, flower, methods, models, probe, report, split, sweep, train, validate

app = typer.Typer(
    name="fedsens",
    help="Where and how to personalize Vision Transformers in federated learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    threads: int = typer.Option(
        1,
        "--threads",
        min=1,
        envvar="FEDSENS_THREADS",
        help="CPU threads for torch. 1 by default: the CPU presets are too small to gain from more, and "
        "on a busy 2-core machine 2 threads made a 5-round run 13x slower (132 s vs 10 s).",
    ),
) -> None:
    """Where and how to personalize Vision Transformers in federated learning."""
    import torch

    torch.set_num_threads(threads)


data_app = typer.Typer(help="Datasets and client partitions.", no_args_is_help=True)
data_app.command("download")(data.download)
data_app.command("split")(split.split)
data_app.command("list")(data.list_datasets)
app.add_typer(data_app, name="data")

app.command("train")(train.train)
app.command("sweep")(sweep.sweep)
app.command("validate")(validate.validate)
app.command("probe")(probe.probe)
app.command("compare")(compare.compare)
app.command("report")(report.report)
app.command("methods")(methods.methods)
app.command("models")(models.models)
app.command("bench")(bench.bench)

flower_app = typer.Typer(help="Run fedsens methods as Flower apps (needs the flower extra).", no_args_is_help=True)
flower_app.command("app")(flower.app)
app.add_typer(flower_app, name="flower")

if __name__ == "__main__":  # pragma: no cover
    app()
