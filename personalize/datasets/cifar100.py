"""cifar100: CIFAR-100 (60,000 32x32 colour images, 100 fine classes) through torchvision's pickle reader,
train then test merged."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR100

from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.datasets.registry import DatasetSpec, one_line, register
from fedsens.personalize.errors import UserError


class _UncheckedCIFAR100(CIFAR100):
    """torchvision's CIFAR-100 reader with its md5 checks off (files must still exist)."""

    train_list = [[file, None] for file, _ in CIFAR100.train_list]
    test_list = [[file, None] for file, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def _files() -> list[str]:
    return [file for file, _ in CIFAR100.train_list + CIFAR100.test_list] + [CIFAR100.meta["filename"]]


def load(root: Path | None, *, verify: bool = True) -> ImageSet:
    """Train then test, fine labels. verify=False (--no-verify) skips the md5 check, for files written by hand."""
    root = SPEC.require_root(root)
    folder = root / CIFAR100.base_folder
    missing = [file for file in _files() if not (folder / file).is_file()]
    if missing:
        raise UserError(f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}; {SPEC.instructions(root)}")
    reader = CIFAR100 if verify else _UncheckedCIFAR100
    try:
        splits = [reader(str(root), train=train, download=False) for train in (True, False)]
        # torchvision hands back N x H x W x C; the rest of fedsens uses N x C x H x W.
        images = torch.from_numpy(np.concatenate([split.data for split in splits])).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([label for split in splits for label in split.targets], dtype=torch.int64)
        return ImageSet("cifar100", images, labels, tuple(splits[0].classes))
    except RuntimeError:  # torchvision's md5 check failed
        raise UserError(
            f"CIFAR-100 files in {folder} fail their md5 check (incomplete or altered); delete that folder and "
            f"{SPEC.instructions(root)} (or, for files you wrote yourself, pass --no-verify)"
        ) from None
    except (KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as err:
        fix = SPEC.instructions(root)
        problem = f"malformed CIFAR-100 pickles in {folder} ({one_line(err)})"
        raise UserError(f"{problem}; delete that folder and {fix}") from None


def download(root: Path, *, verify: bool = True) -> str:
    if not verify and present(root):  # files the user wrote: nothing to fetch, and no md5 to check
        return f"cifar100: files present in {root / CIFAR100.base_folder} (md5 check skipped: --no-verify)"
    try:
        for train in (True, False):  # the second call finds the archive unpacked and checks it
            CIFAR100(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"could not download CIFAR-100 into {root} ({one_line(err)}); "
            f"check the network, or fetch {CIFAR100.url} yourself and unpack it in {root}"
        ) from None
    return f"cifar100: ready in {root / CIFAR100.base_folder}"


def present(root: Path) -> bool:
    return all((root / CIFAR100.base_folder / file).is_file() for file in _files())


SPEC = register(
    DatasetSpec(
        "cifar100",
        load,
        "CIFAR-100: 60,000 32x32 colour images, 100 classes (train and test merged)",
        needs_root=True,
        image_size=32,
        channels=3,
        classes=100,
        download=download,
        present=present,
        verifies=True,
    )
)
