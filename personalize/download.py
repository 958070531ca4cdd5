"""Fetching the real datasets where that can be automated, and saying how to get the rest."""

from __future__ import annotations

from pathlib import Path

from medmnist import OrganAMNIST
from medmnist.info import INFO
from torchvision.datasets import CIFAR100

from fedsens.personalize.data import (
    OFFICEHOME_DOMAINS,
    OFFICEHOME_URL,
    _check_medmnist_size,
    _loader,
    _one_line,
    medmnist_file,
)
from fedsens.personalize.errors import UserError


def download(name: str, root: str | Path | None = None, *, size: int = 28) -> str:
    """Fetch `name` into `root` where that can be automated; return what was done or what to do."""
    _loader(name)
    if name in ("digits", "synthetic"):
        where = "ships with scikit-learn" if name == "digits" else "is generated on load"
        return f"{name}: nothing to download; it {where}"
    if name == "officehome":
        return officehome_instructions(Path(root) if root is not None else None)
    if name == "organamnist":
        _check_medmnist_size(size)
    if root is None:
        raise UserError(f"downloading {name} needs --root DIR (root=...), the folder to download into")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if name == "cifar100":
        return _download_cifar100(root)
    return _download_organamnist(root, size)


def _download_cifar100(root: Path) -> str:
    try:
        for train in (True, False):  # the second call finds the archive unpacked and checks it
            CIFAR100(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"could not download CIFAR-100 into {root} ({_one_line(err)}); "
            f"check the network, or fetch {CIFAR100.url} yourself and unpack it in {root}"
        ) from None
    return f"cifar100: ready in {root / CIFAR100.base_folder}"


def _download_organamnist(root: Path, size: int) -> str:
    try:
        # One npz holds all three splits; asking for one split downloads the file.
        OrganAMNIST(split="train", download=True, root=str(root), size=size)
    except (OSError, RuntimeError) as err:
        url = INFO["organamnist"]["url" if size == 28 else f"url_{size}"]
        raise UserError(
            f"could not download OrganAMNIST into {root} ({_one_line(err)[:200]}); "
            f"check the network, or fetch {url} yourself and save it as {medmnist_file(root, size)}"
        ) from None
    return f"organamnist: ready in {medmnist_file(root, size)}"


def officehome_instructions(root: Path | None = None) -> str:
    """Office-Home is handed out from its project page, not a stable file URL: say how to get it."""
    target = root if root is not None else Path("DIR")
    domains = "\n".join(f"       {target}/{spellings[0]}/<class>/*.jpg" for spellings in OFFICEHOME_DOMAINS)
    return (
        "officehome: not downloaded automatically; fetch it by hand:\n"
        f"  1. Get OfficeHomeDataset_10072016.zip from the Office-Home page ({OFFICEHOME_URL};\n"
        "     Venkateswara et al., Deep Hashing Network for Unsupervised Domain Adaptation, CVPR 2017).\n"
        "  2. Unzip it and place the four domain folders so that the layout is\n"
        f"{domains}\n"
        "     ('Real_World' is accepted too), each domain holding the same 65 class folders.\n"
        f"  3. Load it with root {target}; the first load resizes every image once and caches the\n"
        f"     result in {target}/.fedsens_cache_officehome_<size>.pt."
    )
