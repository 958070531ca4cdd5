"""Every MedMNIST 2D dataset by its medmnist name (pathmnist, dermamnist, bloodmnist, ... at 28/64/128/224 px),
read from medmnist's own npz files with its metadata (class names, channels, URLs), three official splits
merged, as OrganAMNIST is."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import medmnist
import numpy as np
import torch
from medmnist.info import INFO

from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.datasets.medmnist_names import NAMES
from fedsens.personalize.datasets.registry import DatasetSpec, one_line, register
from fedsens.personalize.errors import UserError

SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class Options:
    """`--data-option` keys of every MedMNIST 2D set."""

    size: int = field(default=28, metadata={"help": "MedMNIST's image side: 28, 64, 128 or 224 (its own file each)"})


def npz_file(flag: str, root: Path, size: int) -> Path:
    """Where medmnist keeps a dataset at `size` pixels: pathmnist.npz, pathmnist_64.npz, ..."""
    return root / f"{flag}{'' if size == 28 else f'_{size}'}.npz"


def _check_size(flag: str, size: int) -> None:
    if size not in SIZES:
        raise UserError(f"{flag} size {size} does not exist; choose one of {', '.join(map(str, SIZES))}")


def how_to_get(flag: str, root: Path | str = "DIR", size: int = 28, **_) -> str:
    size_flag = f" -d size={size}" if size != 28 else ""
    return f"run `fedsens data download {flag} --root {root}{size_flag}`"


def load(flag: str, root: Path | None, *, size: int = 28) -> ImageSet:
    _check_size(flag, size)
    if root is None:
        raise UserError(f"dataset {flag!r} needs a data root folder; {how_to_get(flag)} and pass --data-root DIR")
    path = npz_file(flag, root, size)
    if not path.is_file():
        raise UserError(f"{flag} not found: no {path}; {how_to_get(flag, root, size)}")
    info = INFO[flag]
    try:
        with np.load(path) as npz:  # the keys medmnist reads; its class asserts the official counts, so numpy
            images = np.concatenate([npz[f"{split}_images"] for split in ("train", "val", "test")])
            labels = np.concatenate([npz[f"{split}_labels"].reshape(-1) for split in ("train", "val", "test")])
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images are {images.dtype} {images.shape}, expected uint8 N x H x W (x 3)")
        chw = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        if chw.shape[1] != info["n_channels"]:
            raise ValueError(f"images have {chw.shape[1]} channels, medmnist says {info['n_channels']}")
        classes = tuple(info["label"][str(index)] for index in range(len(info["label"])))
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"labels outside 0..{len(classes) - 1}")
        return ImageSet(
            flag, torch.from_numpy(np.ascontiguousarray(chw)), torch.from_numpy(labels.astype(np.int64)), classes
        )
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(
            f"malformed {flag} file {path} ({one_line(err)}); delete it and {how_to_get(flag, root, size)}"
        ) from None


def download(flag: str, root: Path, *, size: int = 28) -> str:
    _check_size(flag, size)
    info = INFO[flag]
    try:
        getattr(medmnist, info["python_class"])(split="train", download=True, root=str(root), size=size)
    except (OSError, RuntimeError) as err:
        url = info["url" if size == 28 else f"url_{size}"]
        raise UserError(
            f"could not download {flag} into {root} ({one_line(err)[:200]}); "
            f"check the network, or fetch {url} yourself and save it as {npz_file(flag, root, size)}"
        ) from None
    return f"{flag}: ready in {npz_file(flag, root, size)}"


def present(flag: str, root: Path) -> bool:
    return any(npz_file(flag, root, size).is_file() for size in SIZES)


def _loader(flag: str):
    def load_flag(root: Path | None, *, size: int = 28) -> ImageSet:
        return load(flag, root, size=size)

    return load_flag


def _downloader(flag: str):
    def download_flag(root: Path, *, size: int = 28) -> str:
        return download(flag, root, size=size)

    return download_flag


def _summary(flag: str) -> str:
    info = INFO[flag]
    total = sum(info["n_samples"].values())
    colour = "RGB" if info["n_channels"] == 3 else "grey"
    return f"MedMNIST {info['python_class']}: {total:,} {colour} images, {len(info['label'])} classes (splits merged)"


SPECS = {
    flag: register(
        DatasetSpec(
            flag,
            _loader(flag),
            _summary(flag),
            needs_root=True,
            image_size=28,
            channels=INFO[flag]["n_channels"],
            classes=len(INFO[flag]["label"]),
            how_to_get=partial(how_to_get, flag),
            download=_downloader(flag),
            present=partial(present, flag),
            Options=Options,
        )
    )
    for flag in NAMES
}
