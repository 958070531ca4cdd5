"""The user's own images (imagefolder: class folders or domain/class, every PIL mode, bad files, the cache) and
every MedMNIST 2D dataset by name, read from npz files written here in medmnist's format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from medmnist.info import INFO
from PIL import Image

from fedsens.personalize import datasets as data_lib
from fedsens.personalize.config import RunConfig
from fedsens.personalize.datasets import imageset, medmnist_names
from fedsens.personalize.errors import UserError
from fedsens.sensitivity.sweep import SweepConfig, run_sweep

# ---- MedMNIST 2D -----------------------------------------------------------------------------


def test_the_medmnist_names_are_medmnists_2d_single_label_sets():
    two_d = {flag for flag in INFO if not flag.endswith("3d")}
    assert set(medmnist_names.NAMES) == two_d - {"organamnist", "chestmnist"}  # organamnist: its own module
    listed = data_lib.names()
    assert set(medmnist_names.NAMES) <= set(listed) and "imagefolder" in listed


def _write_npz(path, *, channels: int, classes: int, n: int = 12, side: int = 28):
    rng = np.random.default_rng(0)
    shape = (n, side, side) if channels == 1 else (n, side, side, 3)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (n, 1))
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize(("flag", "size"), [("pathmnist", 28), ("octmnist", 64), ("bloodmnist", 28)])
def test_a_medmnist_set_loads_by_name_from_its_npz(tmp_path, flag, size):
    info = INFO[flag]
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    arrays = _write_npz(tmp_path / name, channels=info["n_channels"], classes=len(info["label"]), side=size)
    data = data_lib.load(flag, tmp_path, size=size)
    assert data.images.shape == (36, info["n_channels"], size, size) and data.images.dtype == torch.uint8
    assert data.classes == tuple(info["label"][str(i)] for i in range(len(info["label"])))
    first = arrays["train_images"][0]
    expected = first[None] if info["n_channels"] == 1 else first.transpose(2, 0, 1)
    assert np.array_equal(data.images[0].numpy(), expected)
    assert data.labels[:12].tolist() == arrays["train_labels"].reshape(-1).tolist()
    assert data_lib.is_present(flag, tmp_path)


def test_a_missing_or_malformed_medmnist_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"dermamnist not found: no .*dermamnist.npz; run `fedsens data download"):
        data_lib.load("dermamnist", tmp_path)
    (tmp_path / "dermamnist.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match="malformed dermamnist file"):
        data_lib.load("dermamnist", tmp_path)
    with pytest.raises(UserError, match="size 30 does not exist"):
        data_lib.load("dermamnist", tmp_path, size=30)


# ---- imagefolder ------------------------------------------------------------------------------


def _save(path, mode: str, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full((10, 12), colour, dtype=np.uint16)).save(path)
        return
    image = Image.new("RGB", (10, 12), colour)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def _class_tree(root):
    _save(root / "cat" / "a.png", "RGB", (200, 10, 10))
    _save(root / "cat" / "b.png", "L", (90, 90, 90))
    _save(root / "cat" / "c.png", "P", (10, 200, 10))
    _save(root / "dog" / "d.jpg", "CMYK", (10, 10, 200))
    _save(root / "dog" / "e.png", "I;16", 65535)
    _save(root / "dog" / "f.png", "RGBA", (250, 250, 250))
    return root


def test_class_folders_load_as_rgb_at_the_given_size_whatever_the_mode(tmp_path):
    data = data_lib.load("imagefolder", _class_tree(tmp_path / "pets"), size=8)
    assert data.classes == ("cat", "dog") and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images.shape == (6, 3, 8, 8) and data.domains is None
    pixel = data.images[:, :, 4, 4]
    assert pixel[0].tolist() == [200, 10, 10] and pixel[1].tolist() == [90, 90, 90]
    assert pixel[4].tolist() == [255, 255, 255]  # 16-bit white stays white, not clipped noise
    assert abs(int(pixel[3][2]) - 200) < 20  # CMYK blue comes back blue


def test_the_decoded_images_are_cached_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root = _class_tree(tmp_path / "pets")
    first = data_lib.load("imagefolder", root, size=8)
    assert (root / ".fedsens_cache_imagefolder_8.pt").is_file()

    def refuse(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imageset, "read_image", refuse)
    assert torch.equal(data_lib.load("imagefolder", root, size=8).images, first.images)
    _save(root / "dog" / "g.png", "RGB", (1, 2, 3))
    with pytest.raises(AssertionError, match="decoded again"):
        data_lib.load("imagefolder", root, size=8)


def test_a_domain_level_gives_domains(tmp_path):
    root = tmp_path / "domains"
    for domain in ("photo", "sketch"):
        for label, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            for index in range(2):
                _save(root / domain / label / f"{index}.png", "RGB", colour)
    data = data_lib.load("imagefolder", root, size=8)
    assert data.domain_names == ("photo", "sketch") and data.domains.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert data.labels.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_bad_images_stop_with_the_file_or_are_skipped_and_counted(tmp_path):
    root = _class_tree(tmp_path / "pets")
    (root / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"cannot decode image .*empty.png"):
        data_lib.load("imagefolder", root, size=8)
    with pytest.warns(UserWarning, match="left out 1 image"):
        data = data_lib.load("imagefolder", root, size=8, skip_bad_images=True)
    assert len(data) == 6


def test_an_empty_class_folder_or_no_folder_is_one_line(tmp_path):
    root = _class_tree(tmp_path / "pets")
    (root / "bird").mkdir()
    with pytest.raises(UserError, match=r"class folder .*bird has no images"):
        data_lib.load("imagefolder", root, size=8)
    with pytest.raises(UserError, match="does not exist"):
        data_lib.load("imagefolder", tmp_path / "nowhere", size=8)
    with pytest.raises(UserError, match="needs a data root"):
        data_lib.load("imagefolder", None)


def _random_tree(root, domains: tuple[str, ...]):
    rng = np.random.default_rng(1)
    for domain in domains:
        for label in ("cat", "dog", "owl"):
            for index in range(6):
                path = root / domain / label / f"{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    return root


@pytest.mark.parametrize(("domains", "scheme"), [(("",), "dirichlet"), (("photo", "sketch"), "domain")])
def test_a_sweep_runs_on_an_image_folder_with_or_without_a_domain_level(tmp_path, domains, scheme):
    root = _random_tree(tmp_path / "images", domains)
    config = RunConfig(
        dataset="imagefolder",
        data_root=str(root),
        scheme=scheme,
        clients=4,
        model="vit-nano",
        rounds=1,
        local_steps=1,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    run_sweep(SweepConfig(run=config, parts=("head",), seeds=(0,), out=str(tmp_path / "sweep"), quiet=True, force=True))
    sensitivity = pd.read_csv(tmp_path / "sweep" / "sensitivity.csv")
    assert sorted(sensitivity["local_part"]) == ["head", "none"] and (sensitivity["scheme"] == scheme).all()
    partition = next((tmp_path / "sweep" / "cells").glob("*head*")).joinpath("partition.json").read_text()
    assert ("sketch" in partition) == (scheme == "domain")


def test_a_link_loop_is_one_line_and_a_folder_linked_twice_is_read_once(tmp_path):
    root = _class_tree(tmp_path / "pets")
    (root / "cat" / "again").symlink_to(root / "cat")  # a loop: cat/again/again/... for ever
    with pytest.raises(UserError, match=r"symbolic link loop: .*again"):
        data_lib.load("imagefolder", root, size=8)
    (root / "cat" / "again").unlink()
    (root / "dog" / "cats").symlink_to(root / "cat")  # cat's images seen twice: under cat/ and dog/cats/
    data = data_lib.load("imagefolder", root, size=8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
