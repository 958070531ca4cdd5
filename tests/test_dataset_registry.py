"""The dataset registry: a dataset added from outside the package, `fedsens data list`, --no-verify,
and Office-Home decoded at the model's input size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_data import OFFICE_TREE, write_cifar100, write_officehome
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import datasets, federation
from fedsens.personalize.config import RunConfig
from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.errors import UserError


def _load_toy(root, *, num_samples: int = 48):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(num_samples) % 3
    images = (labels[:, None, None, None] * 80 + torch.randint(0, 40, (num_samples, 1, 8, 8), generator=generator)).to(
        torch.uint8
    )
    return ImageSet("toy", images, labels, ("a", "b", "c"))


@pytest.fixture
def toy():
    spec = datasets.register(
        datasets.DatasetSpec("toy", _load_toy, "three grey levels", test_fraction=0.5, image_size=8, channels=1)
    )
    yield spec
    datasets.unregister("toy")


def test_a_registered_dataset_trains_through_the_cli(toy, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "toy", "--model", "vit-nano", "--clients", "2", "--rounds", "1"]
    result = CliRunner().invoke(app, [*args, "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "partition.json").read_text())
    assert manifest["params"]["test_fraction"] == 0.5  # the toy's own default, not the global 0.25
    assert len((out / "rounds.csv").read_text().splitlines()) == 2
    assert "toy" in datasets.names() and datasets.dataset_defaults("toy")["test_fraction"] == 0.5


def test_registering_a_name_twice_needs_replace(toy):
    with pytest.raises(ValueError, match="registered already"):
        datasets.register(datasets.DatasetSpec("toy", _load_toy, "again"))
    assert datasets.register(datasets.DatasetSpec("toy", _load_toy, "again"), replace=True).summary == "again"


def test_unknown_dataset_lists_every_registered_one(toy):
    with pytest.raises(UserError, match="toy"):
        datasets.load("imagenet")


def test_data_list_says_what_is_present(tmp_path):
    write_cifar100(tmp_path, [0, 1], [2])
    result = CliRunner().invoke(app, ["data", "list", "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line and not line.startswith(" ")}
    assert list(lines) == list(datasets.names())
    assert "present" in lines["cifar100"] and "missing" in lines["organamnist"] and "built in" in lines["digits"]
    assert "test fraction 0.15, scheme domain" in result.output
    assert "fedsens data download organamnist --root" in result.output


def test_no_verify_reaches_the_cifar100_reader_from_every_command(tmp_path):
    write_cifar100(tmp_path, [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3])  # hand-written: md5 sums differ
    runner = CliRunner()
    split = ["data", "split", "--dataset", "cifar100", "--data-root", str(tmp_path), "--clients", "2", "--quiet"]
    refused = runner.invoke(app, [*split, "--out", str(tmp_path / "p")])
    assert refused.exit_code == 2 and "--no-verify" in refused.output and refused.output.count("\n") == 1
    accepted = runner.invoke(app, [*split, "--out", str(tmp_path / "p"), "--no-verify"])
    assert accepted.exit_code == 0, accepted.output
    download = runner.invoke(app, ["data", "download", "cifar100", "--root", str(tmp_path), "--no-verify"])
    assert download.exit_code == 0 and "md5 check skipped" in download.output
    train = ["train", "--dataset", "cifar100", "--data-root", str(tmp_path), "--model", "vit-nano"]
    train += ["--clients", "2", "--rounds", "1", "--quiet", "--no-verify", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["verify"] is False


def test_a_run_decodes_officehome_at_the_models_input_size(tmp_path, monkeypatch):
    write_officehome(tmp_path, OFFICE_TREE)
    sizes = []
    real = datasets.load_for_run
    monkeypatch.setattr(datasets, "load_for_run", lambda *a, **k: sizes.append(k["input_size"]) or real(*a, **k))
    config = RunConfig(dataset="officehome", data_root=str(tmp_path), model="vit-nano", scheme="iid", clients=2)
    loaded = federation.load_dataset(config)
    assert sizes == [32] and loaded.image_size == 32  # vit-nano caps its input at 32 px
    assert (tmp_path / ".fedsens_cache_officehome_32.pt").is_file()
    paper = config.replace(model="vit_tiny_patch16_224")
    assert federation.load_dataset(paper).image_size == 224  # the paper's models: decoded straight at 224
    assert (tmp_path / ".fedsens_cache_officehome_224.pt").is_file()


def test_the_registry_lists_names_without_importing_torch():
    code = (
        "import sys; from fedsens.personalize.datasets import registry; "
        "print(registry.names()); assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "'digits', 'synthetic', 'cifar100', 'organamnist', 'officehome'" in done.stdout


TOY_MODULE = """
import torch

from fedsens.personalize.datasets import DatasetSpec, register
from fedsens.personalize.datasets.imageset import ImageSet


def load(root):
    labels = torch.arange(40) % 2
    images = (labels[:, None, None, None] * 200 + torch.zeros(40, 1, 8, 8, dtype=torch.int64)).to(torch.uint8)
    return ImageSet("dropin", images, labels, ("dark", "light"))


register(DatasetSpec("dropin", load, "dark or light squares", image_size=8, channels=1, classes=2))
"""


def test_a_module_dropped_into_the_package_is_a_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "more_datasets"
    folder.mkdir()
    (folder / "dropin.py").write_text(TOY_MODULE)
    # The package's folder list stands in for personalize/datasets/ (the test must not write into the source).
    monkeypatch.setattr(datasets, "__path__", [*datasets.__path__, str(folder)])
    try:
        listed = CliRunner().invoke(app, ["data", "list"])
        assert listed.exit_code == 0 and "dropin" in listed.output and "dark or light squares" in listed.output
        args = ["train", "--dataset", "dropin", "--model", "vit-nano", "--clients", "2", "--rounds", "1", "--quiet"]
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
    finally:
        datasets.unregister("dropin")
        sys.modules.pop("fedsens.personalize.datasets.dropin", None)


def test_each_datasets_options_are_its_loaders_keywords_with_the_same_defaults():
    import dataclasses
    import inspect

    for spec in datasets.registry.specs():
        loader = inspect.signature(spec.load).parameters
        for option in dataclasses.fields(spec.Options):
            assert loader[option.name].default == option.default, (spec.name, option.name)
        run_keywords = {"verify", "quiet", spec.decodes_at}
        assert {p for p in loader if p != "root"} - run_keywords == {f.name for f in dataclasses.fields(spec.Options)}


def test_data_options_are_checked_against_the_datasets_options_naming_the_valid_keys(tmp_path):
    with pytest.raises(
        UserError, match=r"dataset synthetic has no option 'per_client'; its options: num_samples \(int\)"
    ):
        RunConfig(dataset="synthetic", data_options={"per_client": 8})
    with pytest.raises(UserError, match="option num_samples of dataset synthetic must be int"):
        RunConfig(dataset="synthetic", data_options={"num_samples": "many"})
    with pytest.raises(UserError, match="dataset digits has no option 'size'; it takes no options"):
        RunConfig(dataset="digits", data_options={"size": 64})
    config = RunConfig(dataset="synthetic", data_options={"num_samples": "40", "image_size": "8"})
    assert config.data_options == {"num_samples": 40, "image_size": 8}  # typed, as config.json records them
    assert federation.load_dataset(config).images.shape == (40, 3, 8, 8)


def test_data_list_shows_each_datasets_options_and_train_takes_them(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app

    listed = CliRunner().invoke(app, ["data", "list"])
    assert (
        listed.exit_code == 0 and "-d num_samples=512  (int)" in listed.output and "-d size=28  (int)" in listed.output
    )
    bad = CliRunner().invoke(app, ["train", "--dataset", "synthetic", "-d", "nope=1", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "dataset synthetic has no option 'nope'; its options: num_samples" in bad.output


def test_an_older_config_json_with_synthetic_fields_reads_as_data_options():
    old = {
        "dataset": "synthetic",
        "clients": 10,
        "synthetic_per_client": 8,
        "synthetic_size": 8,
        "synthetic_classes": 10,
    }
    upgraded = RunConfig.upgrade_saved(old)
    assert upgraded["data_options"] == {"num_samples": 80, "image_size": 8}
    assert not any(k.startswith("synthetic_") for k in upgraded)
    assert RunConfig.upgrade_saved({"dataset": "digits", "synthetic_per_client": 0})["data_options"] == {}
