"""The dataset loaders, each on files written here in the dataset's real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import datasets as data
from fedsens.personalize.datasets import cifar100, officehome, organamnist
from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.errors import UserError

# --- writers of the real formats ----------------------------------------------------------------


def write_cifar100(root: Path, train_labels: list[int], test_labels: list[int], *, drop: str | None = None) -> Path:
    """CIFAR-100's python pickles: rows of 3072 uint8 (R plane, G plane, B plane), fine labels, meta.

    The official files are Python 2 pickles whose keys read back as str under torchvision's
    encoding="latin1", so str keys here give the same dicts to the reader.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        # Image i has its three colour planes filled with (label, 100 + i, 200) so layout is checkable.
        planes = [np.array([[label] * 1024, [100 + i] * 1024, [200] * 1024]) for i, label in enumerate(labels)]
        batch = {
            "batch_label": f"{split} batch",
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
            "data": np.stack(planes).reshape(len(labels), 3072).astype(np.uint8),
            "fine_labels": list(labels),
            "coarse_labels": [label // 5 for label in labels],
        }
        if drop:
            del batch[drop]
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_organamnist(path: Path, counts: dict[str, int], side: int = 28) -> None:
    """medmnist's npz: <split>_images uint8 N x H x W and <split>_labels uint8 N x 1."""
    arrays, offset = {}, 0
    for split, count in counts.items():
        arrays[f"{split}_images"] = (
            np.full((count, side, side), offset, dtype=np.uint8) + np.arange(count, dtype=np.uint8)[:, None, None]
        )
        arrays[f"{split}_labels"] = (np.arange(offset, offset + count) % 11).astype(np.uint8)[:, None]
        offset += count
    np.savez_compressed(path, **arrays)


def write_officehome(root: Path, tree: dict[str, dict[str, list[tuple[int, int, int]]]]) -> None:
    """domain -> class -> one solid-colour JPEG per colour, of assorted (non-square) sizes."""
    for domain, classes in tree.items():
        for name, colours in classes.items():
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i, colour in enumerate(colours):
                Image.new("RGB", (40 + 7 * i, 30), colour).save(folder / f"{i:05d}.jpg", quality=95)


OFFICE_TREE = {
    "Art": {"Alarm_Clock": [(250, 0, 0), (240, 10, 10)], "Bike": [(0, 250, 0)]},
    "Real World": {"Bike": [(0, 0, 250), (0, 10, 240)], "Candles": [(250, 250, 0)]},
}


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --- digits and synthetic -----------------------------------------------------------------------


def test_digits_is_the_embedded_default_scaled_to_uint8():
    digits = data.load("digits")
    assert data.names()[0] == "digits"
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.uint8
    assert int(digits.images.max()) == 255 and int(digits.images.min()) == 0
    assert digits.labels.dtype == torch.int64 and set(digits.labels.tolist()) == set(range(10))
    assert digits.classes == tuple("0123456789")
    assert (digits.num_classes, digits.channels, digits.image_size, len(digits)) == (10, 1, 8, 1797)
    assert digits.domains is None and digits.domain_names == ()


def test_synthetic_shape_options_and_seed():
    kwargs = dict(num_samples=60, num_classes=4, image_size=8, channels=1, seed=3)
    first, again = data.load("synthetic", **kwargs), data.load("synthetic", **kwargs)
    other = data.load("synthetic", **{**kwargs, "seed": 4})
    assert first.images.shape == (60, 1, 8, 8) and first.images.dtype == torch.uint8
    assert first.labels.dtype == torch.int64 and torch.bincount(first.labels).tolist() == [15] * 4
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    assert first.classes == ("class_0", "class_1", "class_2", "class_3") and first.domains is None


def test_synthetic_classes_are_learnable_from_their_means():
    synthetic = data.load("synthetic", num_samples=400, num_classes=8, image_size=8, seed=0)
    pixels = synthetic.images.float().flatten(1)
    fit, held_out = slice(0, 200), slice(200, 400)
    means = torch.stack([pixels[fit][synthetic.labels[fit] == c].mean(0) for c in range(8)])
    predicted = torch.cdist(pixels[held_out], means).argmin(1)
    assert (predicted == synthetic.labels[held_out]).float().mean() > 0.9


def test_synthetic_domains_shift_the_images():
    synthetic = data.load("synthetic", num_samples=300, num_classes=2, image_size=8, num_domains=3, seed=1)
    assert synthetic.domains.dtype == torch.int64 and set(synthetic.domains.tolist()) == {0, 1, 2}
    assert synthetic.domain_names == ("domain_0", "domain_1", "domain_2")
    same_class = synthetic.labels == 0
    means = [synthetic.images[same_class & (synthetic.domains == d)].float().mean(0) for d in range(3)]
    assert (means[0] - means[1]).abs().mean() > 5


@pytest.mark.parametrize("option", [{"num_samples": 0}, {"num_classes": 0}, {"noise": -1.0}, {"image_size": 0}])
def test_synthetic_rejects_bad_options(option):
    with pytest.raises(UserError) as err:
        data.load("synthetic", **option)
    assert_one_line(err, next(iter(option)))


# --- CIFAR-100 ------------------------------------------------------------------------------------


def test_cifar100_merges_train_then_test_in_channel_first_layout(tmp_path):
    write_cifar100(tmp_path, train_labels=[5, 7, 99], test_labels=[0, 42])
    cifar = data.load("cifar100", tmp_path, verify=False)
    assert cifar.images.shape == (5, 3, 32, 32) and cifar.images.dtype == torch.uint8
    assert cifar.labels.tolist() == [5, 7, 99, 0, 42] and cifar.labels.dtype == torch.int64
    assert cifar.images[1, 0].unique().tolist() == [7] and cifar.images[1, 1].unique().tolist() == [101]
    assert cifar.images[4, 1].unique().tolist() == [101] and cifar.images[4, 2].unique().tolist() == [200]
    assert cifar.classes == tuple(f"fine_{i}" for i in range(100)) and cifar.domains is None


def test_cifar100_md5_check_stays_on_by_default(tmp_path):
    folder = write_cifar100(tmp_path, train_labels=[1], test_labels=[2])
    with pytest.raises(UserError) as err:
        data.load("cifar100", tmp_path)
    assert_one_line(err, str(folder), "md5", f"fedsens data download cifar100 --root {tmp_path}", "--no-verify")


def test_cifar100_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError) as err:
        data.load("cifar100", tmp_path)
    assert_one_line(err, str(tmp_path / "cifar-100-python"), "fedsens data download cifar100")
    write_cifar100(tmp_path, train_labels=[1], test_labels=[2], drop="fine_labels")
    with pytest.raises(UserError) as err:
        data.load("cifar100", tmp_path, verify=False)
    assert_one_line(err, "malformed", str(tmp_path / "cifar-100-python"))


def test_real_datasets_need_a_root():
    with pytest.raises(UserError) as err:
        data.load("cifar100")
    assert_one_line(err, "root", "fedsens data download cifar100")


# --- OrganAMNIST --------------------------------------------------------------------------------


def test_organamnist_merges_all_three_splits(tmp_path):
    write_organamnist(tmp_path / "organamnist.npz", {"train": 5, "val": 3, "test": 2})
    organ = data.load("organamnist", tmp_path)
    assert organ.images.shape == (10, 1, 28, 28) and organ.images.dtype == torch.uint8
    assert organ.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # train, val, test order
    assert organ.labels.tolist() == list(range(10)) and organ.labels.dtype == torch.int64
    assert organ.num_classes == 11 and organ.classes[0] == "bladder" and organ.classes[-1] == "spleen"


def test_organamnist_size_picks_the_matching_file(tmp_path):
    write_organamnist(tmp_path / "organamnist_64.npz", {"train": 2, "val": 1, "test": 1}, side=64)
    assert data.load("organamnist", tmp_path, size=64).images.shape == (4, 1, 64, 64)
    with pytest.raises(UserError) as err:
        data.load("organamnist", tmp_path)  # 28 px file absent
    assert_one_line(err, str(tmp_path / "organamnist.npz"), "fedsens data download organamnist")
    with pytest.raises(UserError) as err:
        data.load("organamnist", tmp_path, size=100)
    assert_one_line(err, "100", "28, 64, 128, 224")


def test_organamnist_malformed_file(tmp_path):
    np.savez(tmp_path / "organamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError) as err:
        data.load("organamnist", tmp_path)
    assert_one_line(err, "malformed", str(tmp_path / "organamnist.npz"))


# --- Office-Home --------------------------------------------------------------------------------


def test_officehome_reads_domains_with_a_shared_class_list(tmp_path):
    write_officehome(tmp_path, OFFICE_TREE)
    office = data.load("officehome", tmp_path, size=16, quiet=True)
    assert office.images.shape == (6, 3, 16, 16) and office.images.dtype == torch.uint8
    assert office.classes == ("Alarm_Clock", "Bike", "Candles")
    assert office.domain_names == ("Art", "Real World")
    assert office.domains.tolist() == [0, 0, 0, 1, 1, 1]
    assert office.labels.tolist() == [0, 0, 1, 1, 1, 2]  # Bike is class 1 in both domains
    mean_colour = office.images.float().mean((2, 3))
    assert mean_colour[0].argmax() == 0 and mean_colour[2].argmax() == 1 and mean_colour[3].argmax() == 2


def test_officehome_second_load_uses_the_cache(tmp_path, monkeypatch):
    write_officehome(tmp_path, OFFICE_TREE)
    first = data.load("officehome", tmp_path, size=16, quiet=True)
    assert (tmp_path / ".fedsens_cache_officehome_16.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))

    decoded = []
    real_reader = officehome.read_rgb
    monkeypatch.setattr(officehome, "read_rgb", lambda path, size: decoded.append(path) or real_reader(path, size))
    second = data.load("officehome", tmp_path, size=16, quiet=True)
    assert decoded == []
    assert torch.equal(first.images, second.images) and torch.equal(first.domains, second.domains)
    assert second.classes == first.classes and second.domain_names == first.domain_names

    write_officehome(tmp_path, {"Clipart": {"Bike": [(9, 9, 9)]}})  # a changed tree is read again
    third = data.load("officehome", tmp_path, size=16, quiet=True)
    assert len(decoded) == 7 and third.domain_names == ("Art", "Clipart", "Real World")


def test_officehome_accepts_real_world_with_underscore_once(tmp_path):
    write_officehome(tmp_path / "underscore", {"Real_World": {"Bike": [(0, 0, 250)]}})
    office = data.load("officehome", tmp_path / "underscore", size=8, quiet=True)
    assert office.domain_names == ("Real_World",) and office.images.shape == (1, 3, 8, 8)
    write_officehome(tmp_path / "both", {"Real World": {"Bike": [(0, 0, 250)]}, "Real_World": {"Bike": [(0, 0, 250)]}})
    assert data.load("officehome", tmp_path / "both", size=8, quiet=True).domain_names == ("Real World",)


def test_officehome_missing_tree_says_where_to_get_it(tmp_path):
    (tmp_path / "OfficeHomeDataset_10072016").mkdir()
    with pytest.raises(UserError) as err:
        data.load("officehome", tmp_path)
    assert_one_line(err, str(tmp_path), officehome.OFFICEHOME_URL, "Art/<class>/*.jpg")


def test_officehome_unreadable_image_is_named(tmp_path):
    write_officehome(tmp_path, {"Art": {"Bike": [(0, 0, 250)]}})
    (tmp_path / "Art" / "Bike" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as err:
        data.load("officehome", tmp_path, size=8, quiet=True)
    assert_one_line(err, "broken.jpg")


# --- names, options, defaults -----------------------------------------------------------------


def test_unknown_dataset_and_option():
    with pytest.raises(UserError) as err:
        data.load("imagenet")
    assert_one_line(err, "imagenet", "digits, synthetic, cifar100, organamnist, officehome")
    with pytest.raises(UserError) as err:
        data.load("digits", size=32)
    assert_one_line(err, "size", "digits")
    with pytest.raises(UserError):
        data.dataset_defaults("imagenet")


def test_dataset_defaults_follow_the_paper():
    assert data.dataset_defaults("cifar100")["test_fraction"] == 0.25
    assert data.dataset_defaults("organamnist")["test_fraction"] == 0.25
    assert data.dataset_defaults("officehome") == {
        "test_fraction": 0.15,
        "domains": True,
        "scheme": "domain",
        "needs_root": True,
    }
    assert data.dataset_defaults("digits")["needs_root"] is False


def test_image_set_rejects_labels_beyond_its_classes():
    with pytest.raises(UserError, match="labels span 0..3"):
        ImageSet("bad", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 3]), ("a", "b"))


# --- `fedsens data download` ----------------------------------------------------------------------


def test_cli_download_needs_no_network_for_digits_and_officehome(tmp_path):
    runner = CliRunner()
    digits = runner.invoke(app, ["data", "download", "digits"])
    assert digits.exit_code == 0 and "nothing to download" in digits.output
    office = runner.invoke(app, ["data", "download", "officehome", "--root", str(tmp_path)])
    assert office.exit_code == 0
    assert officehome.OFFICEHOME_URL in office.output and f"{tmp_path}/Real World/<class>/*.jpg" in office.output


def test_cli_download_errors_are_one_line():
    result = CliRunner().invoke(app, ["data", "download", "imagenet"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert result.output.startswith("error: unknown dataset 'imagenet'")
    result = CliRunner().invoke(app, ["data", "download", "cifar100"])
    assert result.exit_code == 2 and "--root" in result.output


def test_cli_download_cifar100_asks_torchvision_to_download(tmp_path, monkeypatch):
    calls = []

    class RecordingCIFAR100(cifar100.CIFAR100):
        def __init__(self, root, train, download):
            calls.append((root, train, download))

    monkeypatch.setattr(cifar100, "CIFAR100", RecordingCIFAR100)
    result = CliRunner().invoke(app, ["data", "download", "cifar100", "--root", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    assert calls == [(str(tmp_path / "new"), True, True), (str(tmp_path / "new"), False, True)]
    assert (tmp_path / "new").is_dir()


def test_cli_download_organamnist_asks_medmnist_for_the_size(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(organamnist, "OrganAMNIST", lambda **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(app, ["data", "download", "organamnist", "--root", str(tmp_path), "-d", "size=64"])
    assert result.exit_code == 0, result.output
    assert calls == [{"split": "train", "download": True, "root": str(tmp_path), "size": 64}]
    assert str(tmp_path / "organamnist_64.npz") in result.output


def test_cli_download_failure_names_the_manual_route(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise RuntimeError("\n   Automatic download failed!\n   Please download it manually.\n")

    monkeypatch.setattr(organamnist, "OrganAMNIST", offline)
    result = CliRunner().invoke(app, ["data", "download", "organamnist", "--root", str(tmp_path)])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "zenodo.org" in result.output and str(tmp_path / "organamnist.npz") in result.output
