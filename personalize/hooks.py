"""Hook: what the round loop calls around each run, client and round. Subclass it and override only
what you need; every method does nothing by default.

A hook with a `table` name gets its `on_round_end` rows written to `<run>/<table>.csv` (and kept in the
checkpoint, so a resumed run continues the table); a hook whose `table` is None only observes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the loop's types, for hints only: hooks depend on nothing at run time
    from torch import nn

    from fedsens.personalize.client import RunContext


class Hook:
    """No-op defaults for every call the round loop makes on a hook."""

    table: str | None = None

    def on_run_start(self, ctx: RunContext) -> None:
        """Once per run (also a resumed one), after the model, data and partition are set up."""

    def on_client_start(self, round: int, client: int, model: nn.Module) -> None:
        """Before a participant trains; `model` holds its starting weights."""

    def on_client_end(self, round: int, client: int, model: nn.Module) -> None:
        """After a participant trained (before aggregation); `model` holds its trained weights."""

    def on_round_end(self, round: int) -> list[dict]:
        """After aggregation and evaluation: the rows this round adds to the hook's table."""
        return []


def table_of(hook: object) -> str | None:
    """The table a hook writes, None if it writes none (also for a duck-typed hook without `.table`)."""
    return getattr(hook, "table", None)
