"""`fedsens flower app DIR [train options]`: a Flower app project that `flwr run DIR` runs on a SuperLink.

It takes exactly train's options (the same RunConfig), so a configuration studied with `fedsens train`
becomes a deployable app by changing the command, not the options.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import typer

from fedsens.commands import train as train_command
from fedsens.commands._common import clean_errors
from fedsens.commands._options import KNOBS, to_run_fields


def _app(directory: Path, overwrite_app: bool, **options) -> None:
    from fedsens.personalize.flower.project import write_app

    knobs = to_run_fields({knob.name: options.pop(knob.name, None) for knob in KNOBS})
    config, _ = train_command.run_config(**options, knobs=knobs)
    target = write_app(directory, config, overwrite=overwrite_app)
    typer.echo(
        f"Flower app for {config.method} ({config.clients} clients, {config.rounds} rounds) in {target.parent}; "
        f"run it with: flwr run {target.parent} SUPERLINK_CONNECTION"
    )


def _signature() -> inspect.Signature:
    """DIR, then train's RunConfig options (not its run flags), then --overwrite for the project."""
    hints = typing.get_type_hints(train_command.train)  # train's annotations are strings (postponed)
    train_params = [
        p.replace(annotation=hints[name])
        for name, p in inspect.signature(train_command.train).parameters.items()
        if name not in train_command.RUN_FLAGS
    ]
    directory = inspect.Parameter(
        "directory",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Path,
        default=typer.Argument(..., help="folder for the Flower app project (pyproject.toml + fedsens_app.py)"),
    )
    overwrite = inspect.Parameter(
        "overwrite_app",
        inspect.Parameter.KEYWORD_ONLY,  # after train's knobs, which are keyword-only
        annotation=bool,
        default=typer.Option(False, "--overwrite", help="replace an app already in DIR"),
    )
    return inspect.Signature([directory, *train_params, overwrite])


@clean_errors
def app(**kwargs) -> None:
    """Write a Flower app project for train's configuration; `flwr run DIR` runs it on a SuperLink."""
    _app(**kwargs)


app.__signature__ = _signature()  # type: ignore[attr-defined]
