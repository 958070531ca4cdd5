"""A Hugging Face dataset saved with save_to_disk (`--dataset huggingface`): columns named by options, ClassLabel
names or plain values as classes, a domain column for `--scheme domain`, a DatasetDict's splits, every PIL mode to
RGB at the run's size, the cache, bad rows and bad names as one line; a train and a two-part sweep on it."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fedsens.personalize import datasets as data_lib
from fedsens.personalize.datasets import imageset
from fedsens.personalize.errors import UserError

# The loader's tests need only torch, PIL and datasets (the command line and the sweep are imported where used),
# so they also run in a small environment holding the lowest datasets release pyproject admits.
datasets = pytest.importorskip("datasets")


def _picture(mode: str, colour) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.full((10, 12), colour, dtype=np.uint16))
    image = Image.new("RGB", (12, 10), colour)
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE)
    return image if mode == "RGB" else image.convert(mode)


def _features(label, domain=None) -> datasets.Features:
    columns = {"img": datasets.Image(), "animal": label}
    return datasets.Features({**columns, **({"site": domain} if domain is not None else {})})


def _modes_dataset() -> datasets.Dataset:
    """Six rows in six PIL modes, two classes by ClassLabel name, two sites."""
    pictures = [
        _picture("RGB", (200, 10, 10)),
        _picture("L", (90, 90, 90)),
        _picture("P", (10, 200, 10)),
        _picture("CMYK", (10, 10, 200)),
        _picture("I;16", 65535),
        _picture("RGBA", (250, 250, 250)),
    ]
    columns = {"img": pictures, "animal": [0, 0, 0, 1, 1, 1], "site": ["north", "south"] * 3}
    names = datasets.ClassLabel(names=["cat", "dog"])
    return datasets.Dataset.from_dict(columns, features=_features(names, datasets.Value("string")))


def _random_dataset(rows: int, seed: int, sites: tuple[str, ...] = ("north", "south")) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(rows)]
    columns = {
        "img": pictures,
        "animal": [row % 3 for row in range(rows)],
        "site": [sites[row % 2] for row in range(rows)],
    }
    names = datasets.ClassLabel(names=["cat", "dog", "owl"])
    return datasets.Dataset.from_dict(columns, features=_features(names, datasets.Value("string")))


COLUMNS = {"image_column": "img", "label_column": "animal"}


def test_a_saved_dataset_loads_its_columns_as_rgb_at_the_given_size_whatever_the_mode(tmp_path):
    _modes_dataset().save_to_disk(str(tmp_path / "saved"))
    data = data_lib.load("huggingface", tmp_path / "saved", size=8, domain_column="site", **COLUMNS)
    assert data.classes == ("cat", "dog") and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.domain_names == ("north", "south") and data.domains.tolist() == [0, 1, 0, 1, 0, 1]
    pixel = data.images[:, :, 4, 4]
    assert pixel[0].tolist() == [200, 10, 10] and pixel[1].tolist() == [90, 90, 90]
    assert pixel[2].tolist() == [10, 200, 10] and pixel[4].tolist() == [255, 255, 255]  # 16-bit white stays white
    assert abs(int(pixel[3][2]) - 200) < 20  # CMYK blue comes back blue
    without_domains = data_lib.load("huggingface", tmp_path / "saved", size=8, **COLUMNS)
    assert without_domains.domains is None and without_domains.domain_names == ()
    assert data_lib.is_present("huggingface", tmp_path / "saved") and not data_lib.is_present("huggingface", tmp_path)


def test_plain_integer_and_string_labels_are_numbered_in_sorted_order(tmp_path):
    pictures = [_picture("RGB", (index * 40, 0, 0)) for index in range(4)]
    for values, names in (([7, 3, 7, 12], ("3", "7", "12")), (["owl", "cat", "owl", "ant"], ("ant", "cat", "owl"))):
        kind = datasets.Value("int64" if isinstance(values[0], int) else "string")
        saved = tmp_path / kind.dtype
        datasets.Dataset.from_dict({"img": pictures, "animal": values}, features=_features(kind)).save_to_disk(
            str(saved)
        )
        data = data_lib.load("huggingface", saved, size=4, **COLUMNS)
        assert data.classes == names and [names[i] for i in data.labels.tolist()] == [str(v) for v in values]


def test_a_dataset_dicts_splits_are_merged_or_chosen(tmp_path):
    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": _random_dataset(6, 0), "test": _random_dataset(3, 1)}).save_to_disk(str(saved))
    merged = data_lib.load("huggingface", saved, size=4, **COLUMNS)
    assert len(merged) == 9 and merged.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    test_only = data_lib.load("huggingface", saved, size=4, split="test", **COLUMNS)
    assert torch.equal(test_only.images, merged.images[6:])
    with pytest.raises(UserError, match=r"has no split 'valid'; its splits: train, test; choose with -d split="):
        data_lib.load("huggingface", saved, size=4, split="valid", **COLUMNS)
    _random_dataset(3, 0).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(UserError, match="saved without splits; leave out -d split=test"):
        data_lib.load("huggingface", tmp_path / "single", size=4, split="test", **COLUMNS)


def test_a_wrong_column_or_folder_is_one_line_naming_the_fix(tmp_path):
    _random_dataset(4, 0).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match=r"has no column 'image'; its columns: img \(Image\), .*-d image_column=NAME"):
        data_lib.load("huggingface", tmp_path / "saved", size=4, label_column="animal")
    with pytest.raises(UserError, match=r"has no column 'label'; .*-d label_column=NAME"):
        data_lib.load("huggingface", tmp_path / "saved", size=4, image_column="img")
    with pytest.raises(UserError, match=r"column 'site' .* is Value.*not images .*-d image_column=NAME"):
        data_lib.load("huggingface", tmp_path / "saved", size=4, image_column="site", label_column="animal")
    with pytest.raises(UserError, match=r"column 'img' .*not labels .*-d domain_column=NAME"):
        data_lib.load("huggingface", tmp_path / "saved", size=4, domain_column="img", **COLUMNS)
    with pytest.raises(UserError, match=r"not a saved Hugging Face dataset .*save_to_disk"):
        data_lib.load("huggingface", tmp_path, size=4, **COLUMNS)
    with pytest.raises(UserError, match="needs a data root"):
        data_lib.load("huggingface", None)
    with pytest.raises(UserError, match=r"dataset huggingface has no option 'image'; its options: image_column"):
        data_lib.load_for_run("huggingface", tmp_path / "saved", options={"image": "img"})


def test_without_the_datasets_package_the_load_says_how_to_install_it(tmp_path, monkeypatch):
    _random_dataset(4, 0).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(UserError, match=r"datasets package, which cannot be imported .*pip install 'fedsens\[hf\]'"):
        data_lib.load("huggingface", tmp_path / "saved", size=4, **COLUMNS)


def test_the_decoded_images_are_cached_and_rebuilt_when_the_saved_files_change(tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    _random_dataset(6, 0).save_to_disk(str(saved))
    first = data_lib.load("huggingface", saved, size=4, **COLUMNS)
    assert (saved / ".fedsens_cache_huggingface_4.pt").is_file()

    def refuse(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imageset, "read_image", refuse)
    assert torch.equal(data_lib.load("huggingface", saved, size=4, **COLUMNS).images, first.images)
    with pytest.raises(AssertionError, match="decoded again"):  # other options: another decode
        data_lib.load("huggingface", saved, size=4, domain_column="site", **COLUMNS)
    monkeypatch.undo()
    _random_dataset(6, 5).save_to_disk(str(tmp_path / "other"))
    for path in saved.iterdir():  # the same folder saved again with other images
        if not path.name.startswith(".fedsens_cache"):
            path.unlink()
    for path in (tmp_path / "other").iterdir():
        path.rename(saved / path.name)
    assert not torch.equal(data_lib.load("huggingface", saved, size=4, **COLUMNS).images, first.images)


def test_an_undecodable_row_stops_with_its_number_or_is_skipped_and_counted(tmp_path):
    rows = [{"bytes": b"not an image", "path": None}, _picture("RGB", (1, 2, 3)), _picture("L", (9, 9, 9))]
    features = _features(datasets.ClassLabel(names=["cat", "dog"]))
    datasets.Dataset.from_dict({"img": rows, "animal": [0, 1, 1]}, features=features).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(UserError, match=r"cannot decode image row 0 of .*s \(.*skip_bad_images=true"):
        data_lib.load("huggingface", tmp_path / "s", size=4, **COLUMNS)
    with pytest.warns(UserWarning, match="left out 1 image"):
        data = data_lib.load("huggingface", tmp_path / "s", size=4, skip_bad_images=True, **COLUMNS)
    assert data.labels.tolist() == [1, 1]


def test_a_row_without_a_label_is_named_with_its_split(tmp_path):
    features = _features(datasets.ClassLabel(names=["cat", "dog"]))
    pictures = [_picture("RGB", (1, 2, 3))] * 3
    labelled = datasets.Dataset.from_dict({"img": pictures, "animal": [0, 1, 1]}, features=features)
    unlabelled = datasets.Dataset.from_dict({"img": pictures, "animal": [1, -1, 0]}, features=features)
    datasets.DatasetDict({"train": labelled, "test": unlabelled}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(UserError, match=r"row 1 of .*s \(split test\) has animal -1, not one of its ClassLabel's 2"):
        data_lib.load("huggingface", tmp_path / "s", size=4, **COLUMNS)
    assert len(data_lib.load("huggingface", tmp_path / "s", size=4, split="train", **COLUMNS)) == 3


def test_data_list_shows_it_and_a_short_train_runs_on_it(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app

    runner = CliRunner()
    saved = tmp_path / "saved"
    _random_dataset(24, 0).save_to_disk(str(saved))
    listed = runner.invoke(app, ["data", "list", "--data-root", str(saved)])
    assert listed.exit_code == 0, listed.output
    line = next(line for line in listed.output.splitlines() if line.startswith("huggingface"))
    assert "present" in line and "-d image_column=image" in listed.output and "-d split=" in listed.output
    result = runner.invoke(
        app,
        ["train", "--dataset", "huggingface", "--data-root", str(saved), "-d", "image_column=img"]
        + ["-d", "label_column=animal", "--model", "vit-nano", "--clients", "4", "--rounds", "1"]
        + ["--local-steps", "1", "--out", str(tmp_path / "run"), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "run" / "rounds.csv")) == 1


def test_a_two_part_sweep_runs_by_domain_on_a_saved_dataset_dict(tmp_path):
    from fedsens.personalize.config import RunConfig
    from fedsens.sensitivity.sweep import SweepConfig, run_sweep

    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": _random_dataset(24, 0), "test": _random_dataset(12, 1)}).save_to_disk(str(saved))
    config = RunConfig(
        dataset="huggingface",
        data_root=str(saved),
        data_options={**COLUMNS, "domain_column": "site"},
        scheme="domain",
        clients=4,
        model="vit-nano",
        rounds=2,
        local_steps=1,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    run_sweep(
        SweepConfig(run=config, parts=("attn", "head"), seeds=(0,), out=str(tmp_path / "sweep"), quiet=True, force=True)
    )
    sensitivity = pd.read_csv(tmp_path / "sweep" / "sensitivity.csv")
    assert sorted(sensitivity["local_part"]) == ["attn", "head", "none"] and (sensitivity["scheme"] == "domain").all()
    partition = next((tmp_path / "sweep" / "cells").glob("*head*")).joinpath("partition.json").read_text()
    assert '"north"' in partition and '"south"' in partition


def test_the_documented_example_saves_a_dataset_that_loads_by_domain(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "models-and-data.md").read_text()
    section = page.split("## A saved Hugging Face dataset: `huggingface`", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/models-and-data.md", "exec"), {"__name__": "docs"})
    options = {"image_column": "img", "label_column": "animal", "domain_column": "clinic"}
    data = data_lib.load("huggingface", tmp_path / "my-data", size=8, **options)
    assert len(data) == 24 and data.classes == ("cat", "dog") and data.domain_names == ("north", "south")
    test_split = data_lib.load("huggingface", tmp_path / "my-data", size=8, split="test", **options)
    assert test_split.labels.tolist() == [0, 1] * 4
