"""The engine's shared pieces: one aggregation path, chosen by what a method declares."""

from __future__ import annotations

import torch

from fedsens.personalize.aggregation import weighted_mean
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine.rounds import Aggregation
from fedsens.personalize.methods import METHODS, Method


class Median(Method):
    """Overrides aggregate and says nothing: the engine must call its hook."""

    def aggregate(self, states, weights):
        return {n: torch.stack([s[n] for s in states]).median(0).values for n in states[0]}


class DeclaredMean(Method):
    aggregates_by_weighted_mean = True

    def aggregate(self, states, weights):  # the same mean, said to be so
        return weighted_mean(states, weights)


def test_overriding_a_hook_without_declaring_the_capability_turns_it_off():
    assert Method.aggregates_by_weighted_mean and Method.evaluates_plainly
    assert not Median.aggregates_by_weighted_mean and Median.evaluates_plainly
    assert DeclaredMean.aggregates_by_weighted_mean
    adapting = {name for name, cls in METHODS.items() if not cls.evaluates_plainly}
    assert adapting == {"apfl", "perfedavg", "fedbabu"}  # the methods whose evaluation adapts per client


def test_aggregation_streams_a_weighted_mean_and_calls_any_other_methods_hook():
    config = RunConfig(out="unused")
    states = [{"w": torch.tensor([float(v)])} for v in (1, 2, 10)]
    for method, expected in ((Method(config), 3.75), (Median(config), 2.0)):
        aggregation = Aggregation(method, [1, 2, 1])
        for state in states:
            aggregation.add(state)
        assert aggregation.result()["w"].item() == expected
    assert Aggregation(Median(config), [1]).running is None and Aggregation(Method(config), [1]).running is not None


def test_the_paper_rows_come_from_the_method_classes():
    from fedsens.personalize.methods import paper_labels

    labels = paper_labels()
    assert labels["fedper"] == "FedRep (public code)" and labels["fedperfix"] == "FedPerfix"
    assert set(labels) == {name for name, cls in METHODS.items() if cls.paper_row is not None}


def test_the_engine_page_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "engine.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/engine.md", "exec"), {})
    assert (tmp_path / "runs" / "by-hand" / "partition.json").is_file()
