"""The Hook base class: no-op defaults, and hooks that write no table."""

from __future__ import annotations

from fedsens.personalize.federation import RunConfig, run
from fedsens.personalize.hooks import Hook
from fedsens.sensitivity.divergence import DivergenceRecorder

TINY = dict(dataset="synthetic", model="vit-nano", clients=3, rounds=2, join_ratio=1.0, local_steps=1)


class CountingHook(Hook):
    """Overrides one call only and writes no table."""

    def __init__(self):
        self.trained: list[tuple[int, int]] = []

    def on_client_end(self, round, client, model):
        self.trained.append((round, client))


class Bare:
    """A duck-typed hook without a `table` attribute."""

    def on_run_start(self, ctx): ...
    def on_client_start(self, round, client, model): ...
    def on_client_end(self, round, client, model): ...
    def on_round_end(self, round):
        return [{"ignored": round}]


def test_the_base_class_does_nothing():
    hook = Hook()
    assert hook.table is None
    assert hook.on_run_start(None) is None and hook.on_client_start(1, 0, None) is None
    assert hook.on_client_end(1, 0, None) is None and hook.on_round_end(1) == []


def test_hooks_without_a_table_observe_and_write_nothing(tmp_path):
    counting = CountingHook()
    result = run(RunConfig(out=str(tmp_path), **TINY), (counting, Bare()), quiet=True)
    assert counting.trained == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert sorted(result.tables) == [] and not list(tmp_path.glob("None.csv"))


def test_the_sweeps_hooks_are_hooks():
    from fedsens.sensitivity.sweep import cell_hooks

    assert issubclass(DivergenceRecorder, Hook) and all(isinstance(h, Hook) for h in cell_hooks(1, 8))
    assert DivergenceRecorder.table == "divergence"
