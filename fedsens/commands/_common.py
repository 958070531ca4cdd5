"""What every command shares: turning a UserError or an I/O error on a user's path into one clear line, exit 2."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

import typer

from fedsens.personalize import interrupts
from fedsens.personalize.errors import ENVIRONMENT_ERRNOS, WITH_OUT, WITHOUT_OUT, UserError, describe_os_error

F = TypeVar("F", bound=Callable)


def clean_errors(command: F) -> F:
    """Wrap a command so bad input prints `error: ...` on one line instead of a traceback.

    An OSError that names a file (permission denied, read-only, disk full, a file where a folder should
    be) is about the user's paths, and so is one about the disk (full, read-only, no permission) even
    when the OS gave no file name; any other is a bug and keeps its traceback. The advice says how to
    write elsewhere in this command's terms: its --out, or (a command without one) a copy of the folder.
    """
    has_out = "out" in inspect.signature(command).parameters
    elsewhere = WITH_OUT if has_out else WITHOUT_OUT

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with interrupts.handled():  # SIGTERM stops a command as Ctrl-C does; neither can be lost
                return command(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: finished rounds and runs are kept; the same command with --resume (train) or "
                "again (sweep, compare) continues",
                err=True,
            )
            raise typer.Exit(130) from None
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            if err.filename is None and err.errno not in ENVIRONMENT_ERRNOS:
                raise
            typer.echo(f"error: {describe_os_error(err, elsewhere)}", err=True)
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
    gave (not None) laid over it: a preset never overrides an explicit option (presets.overlay)."""
    from fedsens.personalize import presets

    return presets.overlay(base, run=presets.overlay(base.run, **run), **grid)
