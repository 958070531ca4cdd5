"""organamnist: MedMNIST's OrganAMNIST (58,850 grey abdominal CT slices, 11 organs) from medmnist's npz,
its three official splits merged."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from medmnist import OrganAMNIST
from medmnist.info import INFO

from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.datasets.registry import DatasetSpec, one_line, register
from fedsens.personalize.errors import UserError

MEDMNIST_SIZES = (28, 64, 128, 224)


def medmnist_file(root: Path, size: int) -> Path:
    """Where medmnist keeps OrganAMNIST at `size` pixels: organamnist.npz, organamnist_64.npz, ..."""
    return root / f"organamnist{'' if size == 28 else f'_{size}'}.npz"


def check_size(size: int) -> None:
    if size not in MEDMNIST_SIZES:
        raise UserError(f"OrganAMNIST size {size} does not exist; choose one of {', '.join(map(str, MEDMNIST_SIZES))}")


def how_to_get(root: Path | str = "DIR", size: int = 28, **_) -> str:
    size_flag = f" -d size={size}" if size != 28 else ""
    return f"run `fedsens data download organamnist --root {root}{size_flag}`"


@dataclass(frozen=True)
class Options:
    """`--data-option` keys of OrganAMNIST."""

    size: int = field(default=28, metadata={"help": "MedMNIST's image side: 28, 64, 128 or 224 (its own file each)"})


def load(root: Path | None, *, size: int = 28) -> ImageSet:
    """All three official splits (train, val, test) merged, in that order."""
    check_size(size)
    root = SPEC.require_root(root, size=size)
    path = medmnist_file(root, size)
    if not path.is_file():
        raise UserError(f"OrganAMNIST not found: no {path}; {how_to_get(root, size)}")
    # Read with numpy rather than medmnist.OrganAMNIST: that class asserts the official sample
    # counts (its __len__), which rejects subsets such as the small files the tests write. The
    # file and its keys are exactly the ones medmnist reads.
    try:
        with np.load(path) as npz:
            images = np.concatenate([npz[f"{split}_images"] for split in ("train", "val", "test")])
            labels = np.concatenate([npz[f"{split}_labels"].reshape(-1) for split in ("train", "val", "test")])
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"images are {images.dtype} {images.shape}, expected uint8 N x H x W")
        names_by_id = INFO["organamnist"]["label"]
        classes = tuple(names_by_id[str(index)] for index in range(len(names_by_id)))
        return ImageSet(
            "organamnist", torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64)), classes
        )
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        fix = how_to_get(root, size)
        raise UserError(f"malformed OrganAMNIST file {path} ({one_line(err)}); delete it and {fix}") from None


def download(root: Path, *, size: int = 28) -> str:
    check_size(size)
    try:
        # One npz holds all three splits; asking for one split downloads the file.
        OrganAMNIST(split="train", download=True, root=str(root), size=size)
    except (OSError, RuntimeError) as err:
        url = INFO["organamnist"]["url" if size == 28 else f"url_{size}"]
        raise UserError(
            f"could not download OrganAMNIST into {root} ({one_line(err)[:200]}); "
            f"check the network, or fetch {url} yourself and save it as {medmnist_file(root, size)}"
        ) from None
    return f"organamnist: ready in {medmnist_file(root, size)}"


def present(root: Path) -> bool:
    return any(medmnist_file(root, size).is_file() for size in MEDMNIST_SIZES)


SPEC = register(
    DatasetSpec(
        "organamnist",
        load,
        "MedMNIST OrganAMNIST: 58,850 grey CT slices, 11 organs (train, val and test merged)",
        needs_root=True,
        image_size=28,
        channels=1,
        classes=11,
        how_to_get=how_to_get,
        download=download,
        present=present,
        Options=Options,
    )
)
