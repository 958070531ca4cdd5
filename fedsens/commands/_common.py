"""What every command shares: turning a UserError or an I/O error on a user's path into one clear line, exit 2."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TypeVar

import typer

from fedsens.personalize.errors import UserError, describe_os_error

F = TypeVar("F", bound=Callable)


def clean_errors(command: F) -> F:
    """Wrap a command so bad input prints `error: ...` on one line instead of a traceback.

    An OSError that names a file (permission denied, read-only, disk full, a file where a folder should
    be) is about the user's paths; one without a file name is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            if err.filename is None:
                raise
            typer.echo(f"error: {describe_os_error(err)}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def comma_list(text: str | None, kind: type, option: str, example: str) -> tuple | None:
    """'0,1,2' -> (0, 1, 2) for an option; None (not given) stays None so the preset's value is kept."""
    if text is None:
        return None
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise UserError(
            f"{option} {text!r} is not a comma-separated list of {kind.__name__}s; write e.g. {example}"
        ) from None


def overlay(base, *, run: dict, grid: dict):
    """A grid preset (a sweep or compare config holding a RunConfig in `run`) with every option the user
    gave (not None) laid over it: a preset never overrides an explicit option."""
    run_config = base.run.replace(**{k: v for k, v in run.items() if v is not None})
    return dataclasses.replace(base, run=run_config, **{k: v for k, v in grid.items() if v is not None})
