"""What every command shares: turning a UserError into one clear line and exit status 2."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer

from personalize.errors import UserError

F = TypeVar("F", bound=Callable)


def clean_errors(command: F) -> F:
    """Wrap a command so bad input prints `error: ...` on one line instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
