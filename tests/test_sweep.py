"""The sweep: the grid, resuming, failing cells, the tables' columns, top_parts, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import federation
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import RunConfig
from fedsens.personalize.schema import RANKING_COLUMNS, SENSITIVITY_COLUMNS
from fedsens.sensitivity.ranking import top_parts
from fedsens.sensitivity.sweep import Cell, SweepConfig, grid, preset, run_sweep

TINY_RUN = RunConfig(
    dataset="synthetic", model="vit-nano", clients=4, join_ratio=0.5, rounds=2, local_epochs=1, device="cpu"
)
TIMING = ["seconds"]


def tiny(out, **changes) -> SweepConfig:
    """Two rounds teach the reference nothing: force=True runs the grid past the reference check (test_sanity.py)."""
    changes = {"force": True, **changes}
    return SweepConfig(run=TINY_RUN, parts=("none", "attn", "head"), seeds=(0,), out=str(out), quiet=True, **changes)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted tiny sweep, shared by the tests that only read it."""
    return run_sweep(tiny(tmp_path_factory.mktemp("sweep") / "sweep"))


def _tables(out) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_csv(out / f"{name}.csv").drop(columns=TIMING, errors="ignore")
        for name in ("sensitivity", "ranking", "rounds", "metrics", "divergence")
    }


class CountingRun:
    """Stands in for federation.run: counts the cells trained and the rounds each one trained."""

    def __init__(self, real, kill_cell: str | None = None, fail_part: str | None = None):
        self.real, self.kill_cell, self.fail_part = real, kill_cell, fail_part
        self.cells: list[str] = []
        self.rounds: dict[str, list[int]] = {}

    def __call__(self, config, hooks=(), **kwargs):
        name = config.out.rsplit("/", 1)[-1]
        self.cells.append(name)
        if config.personalize == self.fail_part:
            raise federation.NonFiniteLoss(1, 1, float("nan"))
        counter = _RoundCounter(self.rounds.setdefault(name, []), kill=name == self.kill_cell)
        return self.real(config, (*hooks, counter), **kwargs)


class _RoundCounter:
    table = "trace"

    def __init__(self, rounds: list[int], kill: bool):
        self.rounds, self.kill = rounds, kill

    def on_run_start(self, ctx):
        pass

    def on_client_start(self, round, client, model):
        if self.kill and round == 2:
            raise KeyboardInterrupt  # the sweep is killed half-way through this cell

    def on_client_end(self, round, client, model):
        pass

    def on_round_end(self, round):
        self.rounds.append(round)
        return []


# ---- the grid -------------------------------------------------------------------------------


def test_grid_puts_fedavg_first_and_names_cells_safely(tmp_path):
    config = SweepConfig(
        run=TINY_RUN,
        parts=("attn", "attn,head", "attn@9-11", "blocks.3", "attn"),
        seeds=(1, 0),
        alphas=(0.1, 0.5),
        out=str(tmp_path),
    )
    cells = grid(config)
    assert config.parts == ("none", "attn", "attn,head", "attn@9-11", "blocks.3")
    assert len(cells) == 2 * 2 * 5 and cells[0] == Cell("synthetic", "dirichlet", 0.1, 1, "none")
    names = [c.name for c in cells]
    assert "synthetic-dirichlet-a0.1-s1-attn+head" in names and "synthetic-dirichlet-a0.5-s0-attn@9-11" in names
    assert len(set(names)) == len(names) and not any("/" in n or "," in n for n in names)
    from_file = Cell("digits", "/data/my split.json", 0.3, 0, "head").name
    assert from_file.startswith("digits-mysplit.") and from_file.endswith("-a0.3-s0-head")
    assert from_file != Cell("digits", "/other/my split.json", 0.3, 0, "head").name


def test_presets_and_bad_settings():
    quick = preset("quick")
    assert quick.run == RunConfig(rounds=30) and quick.div_every == 5
    assert quick.parts == ("none", "embed", "attn", "mlp", "norm", "head", "all")
    assert quick.seeds == (0, 1, 2)
    paper = preset("paper-officehome").run
    assert (paper.model, paper.clients, paper.join_ratio, paper.lr, paper.batch_size, paper.scheme) == (
        "vit_small_patch16_224",
        16,
        0.125,
        0.01,
        64,
        "domain",
    )
    with pytest.raises(UserError, match="unknown preset"):
        preset("huge")
    with pytest.raises(UserError, match="alpha"):
        SweepConfig(run=TINY_RUN, alphas=(0.0,))
    with pytest.raises(UserError, match="seed"):
        SweepConfig(run=TINY_RUN, seeds=())


# ---- running --------------------------------------------------------------------------------


def test_tables_have_the_contract_columns(finished):
    out = finished.out
    sensitivity = pd.read_csv(out / "sensitivity.csv")
    assert list(sensitivity.columns) == SENSITIVITY_COLUMNS
    assert list(pd.read_csv(out / "ranking.csv").columns) == RANKING_COLUMNS
    assert sensitivity["status"].tolist() == ["done"] * 3
    rows = sensitivity.set_index("local_part")
    assert rows.loc["none", "gain_vs_fedavg"] == 0 and rows.loc["none", "comm_saved"] == 0
    gain = rows.loc["head", "acc_mean"] - rows.loc["none", "acc_mean"]
    assert rows.loc["head", "gain_vs_fedavg"] == pytest.approx(gain)
    assert 0 < rows.loc["head", "comm_saved"] < rows.loc["attn", "comm_saved"] < 1
    divergence = [f"div_{m}" for m in ("update_cos", "rel_drift", "weight_div", "cka")]
    assert rows.loc[["attn", "head"], divergence].notna().all().all()
    assert rows.loc[["none"], "div_rel_drift"].isna().all()
    # the attn cell's divergence columns are the FedAvg cell's attn summary, averaged over rounds
    fedavg = pd.read_csv(out / "cells" / rows.loc["none", "cell"] / "divergence.csv")
    attn = fedavg[(fedavg["group"] == "attn") & (fedavg["metric"] == "rel_drift")]["value"].mean()
    assert rows.loc["attn", "div_rel_drift"] == pytest.approx(attn)
    for name, columns in (
        ("rounds", ["round", "acc_mean"]),
        ("metrics", ["round", "client", "accuracy"]),
        ("divergence", ["round", "group", "part", "block", "metric", "value"]),
    ):
        table = pd.read_csv(out / f"{name}.csv")
        assert list(table.columns[:6]) == ["cell", "local_part", "seed", "dataset", "scheme", "alpha"]
        assert set(columns) <= set(table.columns) and set(table["local_part"]) == {"none", "attn", "head"}
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["parts"] == ["none", "attn", "head"] and saved["cells"] == sensitivity["cell"].tolist()


def test_a_killed_sweep_resumes_without_redoing_finished_cells(finished, tmp_path, monkeypatch):
    config = tiny(tmp_path / "sweep")
    killed = CountingRun(federation.run, kill_cell=grid(config)[1].name)
    monkeypatch.setattr(federation, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config)
    assert killed.cells == [c.name for c in grid(config)[:2]] and killed.rounds[grid(config)[1].name] == [1]

    resumed = CountingRun(killed.real)
    monkeypatch.setattr(federation, "run", resumed)
    result = run_sweep(config)
    assert resumed.cells == [c.name for c in grid(config)[1:]]  # the finished FedAvg cell is not redone
    assert resumed.rounds[grid(config)[1].name] == [2]  # the killed cell continues from its checkpoint
    assert result.skipped == (grid(config)[0].name,)
    for name, table in _tables(result.out).items():
        expected = _tables(finished.out)[name]
        pd.testing.assert_frame_equal(table, expected, check_exact=False, rtol=1e-6, obj=name)

    again = CountingRun(killed.real)
    monkeypatch.setattr(federation, "run", again)
    run_sweep(config)
    assert again.cells == []


def test_a_failing_cell_is_recorded_and_the_others_complete(tmp_path, monkeypatch):
    failing = CountingRun(federation.run, fail_part="attn")
    monkeypatch.setattr(federation, "run", failing)
    result = run_sweep(tiny(tmp_path / "sweep"))
    attn = grid(tiny(tmp_path / "sweep"))[1].name
    # the reference check trained the FedAvg cell first: counted as trained, not reused
    assert result.failed == (attn,) and len(result.ran) == 2 and result.skipped == ()
    status = result.sensitivity.set_index("local_part")["status"]
    assert status.to_dict() == {"none": "done", "attn": "failed", "head": "done"}
    assert "non-finite loss" in (result.out / "cells" / attn / "error.txt").read_text()
    assert result.sensitivity.set_index("local_part").loc["attn", ["acc_mean", "gain_vs_fedavg"]].isna().all()


def test_a_diverging_cell_fails_on_its_nan_loss(tmp_path):
    config = dataclasses.replace(tiny(tmp_path / "sweep"), run=TINY_RUN.replace(lr=1e12, rounds=1), parts=("none",))
    result = run_sweep(config)
    assert result.failed == (grid(config)[0].name,)  # counted with the failures, recorded as diverged
    assert result.sensitivity["status"].tolist() == ["diverged"]
    summary = json.loads((result.out / "cells" / result.failed[0] / "summary.json").read_text())
    assert summary["diverged"]["round"] == 1 and "non-finite loss" in summary["diverged"]["message"]


def test_other_settings_in_the_same_folder_are_refused(finished, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(finished.out, out)
    with pytest.raises(UserError, match="other settings \\(lr\\)"):
        run_sweep(dataclasses.replace(tiny(out), run=TINY_RUN.replace(lr=0.01)))


# ---- the command line -----------------------------------------------------------------------


def test_cli_sweep_end_to_end_and_top_parts(tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--dataset",
        "synthetic",
        "--model",
        "vit-nano",
        "--clients",
        "4",
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--seeds",
        "0",
        "--only-parts",
        "--parts",
        "head",
        "--parts",
        "attn,head",
        "--div-every",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        "--force",
        "--split-seeds",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "parts by accuracy gain over FedAvg" in result.output
    assert "halves of the seeds" in result.output and (out / "split_seeds.csv").is_file()
    assert pd.read_csv(out / "ranking.csv")["boot_low"].isna().all()  # one seed: no bootstrap interval
    assert "3 cells trained, 0 reused, 0 failed" in result.output  # the reference check's cell counts as trained
    assert set(pd.read_csv(out / "divergence.csv")["round"]) == {2}  # --div-every 2
    assert top_parts(out, 2) in ("head,attn", "attn,head")
    assert top_parts(out, 1) in ("head", "attn,head")


def test_cli_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    bad_seeds = runner.invoke(app, ["sweep", "--seeds", "a,b", "--out", str(tmp_path)])
    assert bad_seeds.exit_code == 2 and "error: --seeds 'a,b'" in bad_seeds.output
    bad_preset = runner.invoke(app, ["sweep", "--preset", "huge", "--out", str(tmp_path)])
    assert bad_preset.exit_code == 2 and "unknown preset" in bad_preset.output


def test_explicit_options_override_the_preset():
    from fedsens.commands.sweep import build_config

    config = build_config("paper-cifar100", run=dict(rounds=3, lr=None), sweep=dict(seeds=(4,), alphas=None))
    assert (config.run.rounds, config.run.lr, config.seeds) == (3, 0.01, (4,))
    assert config.partitions() == [("cifar100", "dirichlet", 0.5)]


def test_per_block_parts_name_one_cell_per_block():
    from fedsens.sensitivity.sweep import per_block_parts

    assert per_block_parts("vit-micro", ("attn", "mlp")) == tuple(f"{k}@{b}" for k in ("attn", "mlp") for b in range(4))
    assert len(per_block_parts("vit_tiny_patch16_224", ("norm",))) == 12
    with pytest.raises(UserError, match="--per-block takes attn, mlp, norm"):
        per_block_parts("vit-micro", ("head",))
