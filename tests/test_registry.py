"""The method registry: a method registered from outside runs through the CLI's own path; options are
validated and parsed; `fedsens methods`; `-o` on train, sweep and compare; the example in docs/extending.md runs."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import runio
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import run
from fedsens.personalize.methods import METHODS, Method, register_method, resolve_options
from fedsens.sensitivity import compare as compare_lib
from fedsens.sensitivity import runs

TINY = ["--dataset", "synthetic", "--model", "vit-nano", "--clients", "3", "--rounds", "1", "--quiet"]
EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@dataclass(frozen=True)
class ToyOptions:
    keep: str = field(default="head", metadata={"help": "the part type kept local"})
    steps: int = field(default=1, metadata={"help": "local steps per round"})
    boost: float | None = field(default=None, metadata={"help": "unused, for parsing"})
    verbose: bool = field(default=False, metadata={"help": "unused, for parsing"})


class Toy(Method):
    """Keeps the part type its option names local and trains a fixed number of steps."""

    Options = ToyOptions
    name = "toy-keep"
    summary = "keeps one part type local"
    paper = "the registry test"
    parts = "none"
    calls: list[int] = []

    def local_spec(self) -> str:
        return self.options.keep

    def train_client(self, ctx) -> None:
        Toy.calls.append(self.options.steps)
        params = [p for p in ctx.model.parameters()]
        optimizer = ctx.optimizer(params)
        for x, y in ctx.train_batches(steps=self.options.steps):
            ctx.step(optimizer, x, y)


@pytest.fixture
def toy():
    register_method(Toy)
    Toy.calls.clear()
    yield Toy
    METHODS.pop(Toy.name, None)


def test_a_method_registered_in_a_test_file_runs_through_the_cli(tmp_path, toy):
    out = tmp_path / "toy"
    args = ["train", *TINY, "--method", "toy-keep", "-o", "keep=norm", "-o", "steps=2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "method=toy-keep" in result.output
    saved = runio.read_json(out / "config.json")["config"]
    assert saved["method_options"] == {"keep": "norm", "steps": 2, "boost": None, "verbose": False}
    parts = pd.read_csv(out / "parts.csv")
    assert set(parts.loc[parts["local"], "part"]) == {"norm"}
    assert toy.calls and set(toy.calls) == {2}
    listing = CliRunner().invoke(app, ["methods", "toy-keep"])
    assert listing.exit_code == 0 and "-o keep=head  (str) the part type kept local" in listing.output
    assert "paper: the registry test" in listing.output


def test_options_are_parsed_into_their_types_and_bad_ones_name_the_valid_keys(toy):
    parsed = resolve_options(toy, {"steps": "3", "boost": "0.5", "verbose": "yes", "keep": "attn"})
    assert parsed == ToyOptions(keep="attn", steps=3, boost=0.5, verbose=True)
    assert resolve_options(toy, {"boost": "none"}).boost is None
    assert resolve_options(toy, {"boost": 2}).boost == 2.0
    keys = "its options: keep (str), steps (int), boost (float or none), verbose (bool)"
    for given in ({"stpes": 1}, {"steps": "two"}, {"steps": 1.5}, {"verbose": "maybe"}, {"keep": 3}):
        with pytest.raises(UserError, match=re.escape(keys)):
            resolve_options(toy, given)
    with pytest.raises(UserError, match="has no option 'stpes'"):
        RunConfig(method="toy-keep", method_options={"stpes": 1})


def test_registering_needs_a_free_name_and_frozen_options(toy):
    class Twin(Method):
        name = "toy-keep"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Twin)
    register_method(toy)  # the same class again is harmless

    @dataclass
    class Loose:
        size: int = 1

    class Unfrozen(Method):
        name, Options = "unfrozen", Loose

    with pytest.raises(ValueError, match="frozen dataclass"):
        register_method(Unfrozen)
    assert "unfrozen" not in METHODS


def test_the_paper_table_comes_from_the_registry(toy):
    assert compare_lib.PAPER_METHODS == (
        "fedavg",
        "local",
        "fedbn",
        "fedper",
        "fedrep",
        "fedbabu",
        "apfl",
        "perfedavg",
        "vanilla-attention",
        "vanilla-prefix",
        "fedperfix",
    )
    assert compare_lib.paper_methods() == compare_lib.PAPER_METHODS  # the toy has no paper row


def test_fedsens_methods_lists_every_method_with_its_options_and_paper():
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    for name in compare_lib.PAPER_METHODS:
        assert re.search(rf"^{re.escape(name)}: ", result.output, re.M), name
    assert "-o mid_dim=256  (int) adapter width" in result.output
    assert "local: plugin,head (+ the parts in -o local=...)" in result.output
    assert "ICCV 2023" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--method", "fedperfix", "-o", "mid_dim"], "is not KEY=VALUE"),
        (["--method", "fedperfix", "-o", "mid=4"], "its options: local (str), blocks (str), scale (float)"),
        (["--method", "fedperfix", "-o", "mid_dim=wide"], "option mid_dim of method fedperfix must be int"),
        (["--method", "fedperfix", "-o", "blocks=9-x"], "option blocks '9-x'"),
        (["--method", "fedavg", "-o", "scale=1"], "it takes no options"),
        (["--method", "fedprox"], "unknown method 'fedprox'"),
    ],
)
def test_train_reports_bad_method_options_in_one_line(tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["train", *TINY, "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_a_resumed_run_must_have_the_same_method_options(tmp_path):
    config = RunConfig(
        dataset="synthetic",
        model="vit-nano",
        clients=3,
        rounds=1,
        local_steps=1,
        method="fedperfix",
        method_options={"mid_dim": 4},
        out=str(tmp_path / "run"),
        device="cpu",
    )
    run(config, quiet=True)
    resumed = run(config.replace(rounds=2, method_options={"mid_dim": "4", "scale": 1.5}), resume=True, quiet=True)
    assert resumed.summary["rounds"] == 2  # the same options, given differently
    with pytest.raises(UserError, match="other settings \\(method_options"):
        run(config.replace(rounds=3, method_options={"mid_dim": 5}), resume=True, quiet=True)
    with pytest.raises(UserError, match=r"other settings \(method_options\)"):
        runs.check_same_settings(Path(config.out), config.replace(rounds=3, method_options={"scale": 1.0}))
    runs.check_same_settings(Path(config.out), config.replace(rounds=3))


def test_compare_gives_each_option_to_the_methods_that_have_it(tmp_path):
    base = compare_lib.CompareConfig(methods=("fedavg", "fedperfix", "vanilla-prefix"), method_options={"scale": "2"})
    assert compare_lib.run_config(base, "fedavg", 0).method_options == {}
    assert compare_lib.run_config(base, "fedperfix", 0).method_options["scale"] == 2.0
    assert compare_lib.run_config(base, "vanilla-prefix", 0).method_options["scale"] == 2.0
    with pytest.raises(UserError, match="no method has an option 'sclae'"):
        compare_lib.CompareConfig(method_options={"sclae": 1})
    with pytest.raises(UserError, match="option scale of method fedperfix must be float"):
        compare_lib.CompareConfig(methods=("fedperfix",), method_options={"scale": "big"})
    result = CliRunner().invoke(
        app, ["compare", "--methods", "fedavg,local", "-o", "mid_dim=8", "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 2, result.output
    assert "-o mid_dim belongs to none of the compared methods (fedavg, local); it is an option of fedperfix" in (
        result.output
    )


def test_sweep_takes_a_method_that_takes_parts_and_its_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", "--method", "fedperfix", "--out", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 2 and "the sweep's cells vary the parts kept local" in result.output
    result = runner.invoke(app, ["sweep", "-o", "scale=1", "--out", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 2 and "method fedavg has no option 'scale'" in result.output


def test_the_docs_add_a_method_example_runs(tmp_path, monkeypatch):
    section = EXTENDING.read_text().split("## Add a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_example")  # dataclasses and type hints look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        exec(compile(code, "docs/extending.md", "exec"), module.__dict__)
    finally:
        METHODS.pop("frozen-part", None)
    saved = runio.read_json(tmp_path / "runs" / "frozen-part" / "config.json")["config"]
    assert saved["method"] == "frozen-part" and saved["method_options"] == {"part": "norm"}


def test_the_cli_still_loads_without_torch():
    code = "import sys; from fedsens.cli import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
