"""Named datasets -> one in-memory ImageSet: uint8 images (N x C x H x W), int64 labels, domains.

Real datasets go through the ecosystem's own readers (torchvision's CIFAR-100 pickles, medmnist's
npz layout, torchvision's ImageFolder for Office-Home), official splits merged: partitions
re-split per client. `digits` needs no download (the default); `synthetic` is for tests.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.info import INFO
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR100, ImageFolder
from tqdm import tqdm

from fedsens.personalize.errors import UserError

OFFICEHOME_URL = "https://www.hemanthdv.org/officeHomeDataset.html"
# The four Office-Home domains in their canonical order, each with the spellings seen in the wild.
OFFICEHOME_DOMAINS = (("Art",), ("Clipart",), ("Product",), ("Real World", "Real_World"))
MEDMNIST_SIZES = (28, 64, 128, 224)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class ImageSet:
    """A whole dataset in memory; partitions refer to samples by row index."""

    name: str
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    classes: tuple[str, ...]
    domains: torch.Tensor | None = None  # int64, N: index into domain_names
    domain_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = _image_set_problem(self)
        if problem:
            raise UserError(f"malformed dataset {self.name!r}: {problem}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]


def _image_set_problem(data: ImageSet) -> str | None:
    n = data.images.shape[:1]
    if data.images.dtype != torch.uint8 or data.images.ndim != 4:
        return f"images must be uint8 N x C x H x W, got {data.images.dtype} {tuple(data.images.shape)}"
    for field, ids, count in (
        ("labels", data.labels, len(data.classes)),
        ("domains", data.domains, len(data.domain_names)),
    ):
        if ids is not None and (ids.dtype != torch.int64 or ids.shape != n):
            return f"{field} must be int64 with one per image, got {ids.dtype} {tuple(ids.shape)}"
        if ids is not None and len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < count:
            return f"{field} span {int(ids.min())}..{int(ids.max())} but there are {count} names for them"
    return None


def names() -> tuple[str, ...]:
    """The dataset names `load` knows, the embedded default first."""
    return tuple(_loaders())


def load(name: str, root: str | Path | None = None, **options) -> ImageSet:
    """Load dataset `name` (from `root` for the real ones); `options` are the loader's keywords.

    digits: none. synthetic: num_samples, num_classes, image_size, channels, seed, noise,
    num_domains. cifar100: verify. organamnist: size. officehome: size, quiet.
    """
    loader = _loader(name)
    known = [param for param in inspect.signature(loader).parameters if param != "root"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; it takes: {', '.join(known) or 'none'}"
        )
    return loader(None if root is None else Path(root).expanduser(), **options)


def dataset_defaults(name: str) -> dict:
    """Per-dataset settings from the paper: the per-client test share, and whether it has domains."""
    _loader(name)
    if name == "officehome":
        return {"test_fraction": 0.15, "domains": True, "scheme": "domain", "needs_root": True}
    return {
        "test_fraction": 0.25,
        "domains": False,
        "scheme": "dirichlet",
        "needs_root": name in ("cifar100", "organamnist"),
    }


def _loaders() -> dict[str, Callable[..., ImageSet]]:
    return {
        "digits": _load_digits,
        "synthetic": _load_synthetic,
        "cifar100": _load_cifar100,
        "organamnist": _load_organamnist,
        "officehome": _load_officehome,
    }


def _loader(name: str) -> Callable[..., ImageSet]:
    loaders = _loaders()
    if name not in loaders:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(loaders)}")
    return loaders[name]


def _how_to_get(name: str, root: Path | str = "DIR", size: int = 28) -> str:
    if name == "officehome":
        return (
            f"download Office-Home from {OFFICEHOME_URL} and unzip it so that {root}/Art/<class>/*.jpg exists "
            f"(`fedsens data download officehome --root {root}` shows the layout)"
        )
    size_flag = f" --size {size}" if name == "organamnist" and size != 28 else ""
    return f"run `fedsens data download {name} --root {root}{size_flag}`"


def _require_root(name: str, root: Path | None, size: int = 28) -> Path:
    if root is None:
        raise UserError(
            f"dataset {name!r} needs a data root folder; {_how_to_get(name, size=size)} and pass that DIR as the root"
        )
    return root


# --- digits and synthetic: no files ---------------------------------------------------------


def _load_digits(root: Path | None) -> ImageSet:
    bunch = load_digits()
    # Pixel values are ink counts 0..16; stretch them to the 0..255 range the other datasets use.
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    classes = tuple(str(label) for label in bunch.target_names)
    return ImageSet("digits", torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64)), classes)


def synthetic_options(clients: int, per_client: int, image_size: int, classes: int) -> dict:
    """The `synthetic` loader's options for a population of `clients` x `per_client` samples
    (per_client 0: the loader's fixed default set), so scale can be tested from the command line."""
    if per_client < 0:
        raise UserError(f"--synthetic-per-client must be >= 0 (got {per_client})")
    options = {"image_size": image_size, "num_classes": classes}
    return {**options, "num_samples": clients * per_client} if per_client else options


def _load_synthetic(
    root: Path | None,
    *,
    num_samples: int = 512,
    num_classes: int = 10,
    image_size: int = 16,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.25,
    num_domains: int = 0,
) -> ImageSet:
    """Each class is a blocky random template plus Gaussian noise; each domain adds its own shift."""
    for option, value, least in (
        ("num_samples", num_samples, 1),
        ("num_classes", num_classes, 1),
        ("image_size", image_size, 1),
        ("channels", channels, 1),
        ("num_domains", num_domains, 0),
    ):
        if value < least:
            raise UserError(f"synthetic option {option}={value} must be at least {least}")
    if noise < 0:
        raise UserError(f"synthetic option noise={noise} must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    templates = _blocky(torch.rand(num_classes, channels, 4, 4, generator=generator), image_size)
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=generator)]
    pixels = templates[labels] + noise * torch.randn(num_samples, channels, image_size, image_size, generator=generator)
    domains = None
    if num_domains:
        shifts = _blocky(torch.rand(num_domains, channels, 4, 4, generator=generator) - 0.5, image_size) * 0.3
        domains = torch.randint(num_domains, (num_samples,), generator=generator)
        pixels = pixels + shifts[domains]
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = tuple(f"class_{index}" for index in range(num_classes))
    domain_names = tuple(f"domain_{index}" for index in range(num_domains))
    return ImageSet("synthetic", images, labels, classes, domains, domain_names)


def _blocky(coarse: torch.Tensor, image_size: int) -> torch.Tensor:
    # Coarse blocks rather than pixel noise: patch-level structure a tiny ViT picks up quickly.
    return F.interpolate(coarse, size=(image_size, image_size), mode="nearest")


# --- CIFAR-100: torchvision's pickle reader ---------------------------------------------------


class _UncheckedCIFAR100(CIFAR100):
    """torchvision's CIFAR-100 reader with its md5 checks off (files must still exist)."""

    train_list = [[file, None] for file, _ in CIFAR100.train_list]
    test_list = [[file, None] for file, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def _load_cifar100(root: Path | None, *, verify: bool = True) -> ImageSet:
    """Train then test, fine labels. verify=False skips the md5 check, for files written by hand."""
    root = _require_root("cifar100", root)
    folder = root / CIFAR100.base_folder
    files = [file for file, _ in CIFAR100.train_list + CIFAR100.test_list] + [CIFAR100.meta["filename"]]
    missing = [file for file in files if not (folder / file).is_file()]
    if missing:
        raise UserError(f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}; {_how_to_get('cifar100', root)}")
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
            f"{_how_to_get('cifar100', root)} (or load with verify=False for files you wrote yourself)"
        ) from None
    except (KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as err:
        fix = _how_to_get("cifar100", root)
        raise UserError(
            f"malformed CIFAR-100 pickles in {folder} ({_one_line(err)}); delete that folder and {fix}"
        ) from None


# --- OrganAMNIST: medmnist's npz file ---------------------------------------------------------


def medmnist_file(root: Path, size: int) -> Path:
    """Where medmnist keeps OrganAMNIST at `size` pixels: organamnist.npz, organamnist_64.npz, ..."""
    return root / f"organamnist{'' if size == 28 else f'_{size}'}.npz"


def _check_medmnist_size(size: int) -> None:
    if size not in MEDMNIST_SIZES:
        raise UserError(f"OrganAMNIST size {size} does not exist; choose one of {', '.join(map(str, MEDMNIST_SIZES))}")


def _load_organamnist(root: Path | None, *, size: int = 28) -> ImageSet:
    """All three official splits (train, val, test) merged, in that order."""
    _check_medmnist_size(size)
    root = _require_root("organamnist", root, size)
    path = medmnist_file(root, size)
    if not path.is_file():
        raise UserError(f"OrganAMNIST not found: no {path}; {_how_to_get('organamnist', root, size)}")
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
        fix = _how_to_get("organamnist", root, size)
        raise UserError(f"malformed OrganAMNIST file {path} ({_one_line(err)}); delete it and {fix}") from None


# --- Office-Home: ImageFolder per domain, resized once, cached ----------------------------------


def _load_officehome(root: Path | None, *, size: int = 64, quiet: bool = False) -> ImageSet:
    """Every domain folder present; images squashed to size x size (aspect ignored) and cached."""
    if size < 1:
        raise UserError(f"Office-Home size {size} must be a positive number of pixels")
    root = _require_root("officehome", root)
    folders = _officehome_folders(root, size)
    fingerprint = _file_fingerprint(root, folders, size)
    cache = root / f".fedsens_cache_officehome_{size}.pt"
    payload = _read_cache(cache, fingerprint)
    if payload is None:
        payload = _decode_officehome(folders, size, quiet)
        payload["fingerprint"] = fingerprint
        _write_cache(cache, payload)
    classes, domain_names = tuple(payload["classes"]), tuple(payload["domain_names"])
    return ImageSet("officehome", payload["images"], payload["labels"], classes, payload["domains"], domain_names)


def _officehome_folders(root: Path, size: int) -> dict[str, ImageFolder]:
    """Domain folder name -> ImageFolder over its class folders, in the canonical domain order."""
    spelled = [
        next((root / name for name in spellings if (root / name).is_dir()), None) for spellings in OFFICEHOME_DOMAINS
    ]
    found = [path for path in spelled if path is not None]
    if not found:
        fix = _how_to_get("officehome", root)
        raise UserError(f"Office-Home not found: no Art, Clipart, Product or Real World folder in {root}; {fix}")
    folders = {}
    for path in found:
        try:
            # allow_empty: a domain may lack a class; the class list is the union over domains.
            folders[path.name] = ImageFolder(str(path), loader=partial(_read_small_rgb, size=size), allow_empty=True)
        except FileNotFoundError:
            raise UserError(
                f"Office-Home domain {path} has no class folders; {_how_to_get('officehome', root)}"
            ) from None
    if not any(folder.samples for folder in folders.values()):
        raise UserError(f"Office-Home folders in {root} hold no images; {_how_to_get('officehome', root)}")
    return folders


def _read_small_rgb(path: str, size: int) -> Image.Image:
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEGs decode straight at 1/2..1/8 scale: much faster
        return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def _file_fingerprint(root: Path, folders: dict[str, ImageFolder], size: int) -> str:
    """A hash of every image's path and byte size, so a changed tree is decoded again."""
    digest = hashlib.sha256(f"size={size}".encode())
    for folder in folders.values():
        for path, _ in folder.samples:
            digest.update(f"\n{os.path.relpath(path, root)}:{os.path.getsize(path)}".encode())
    return digest.hexdigest()


def _decode_officehome(folders: dict[str, ImageFolder], size: int, quiet: bool) -> dict:
    classes = sorted(set().union(*(folder.classes for folder in folders.values())))
    class_id = {name: index for index, name in enumerate(classes)}
    total = sum(len(folder.samples) for folder in folders.values())
    images = torch.empty(total, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(total, dtype=torch.int64)
    domains = torch.empty(total, dtype=torch.int64)
    row = 0
    with tqdm(total=total, desc=f"Office-Home -> {size}px (once)", disable=quiet) as bar:
        for domain, folder in enumerate(folders.values()):
            for path, local_label in folder.samples:
                try:
                    image = folder.loader(path)
                except OSError as err:
                    raise UserError(
                        f"cannot read Office-Home image {path} ({_one_line(err)}); replace or delete that file"
                    ) from None
                images[row] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
                labels[row] = class_id[folder.classes[local_label]]
                domains[row] = domain
                row += 1
                bar.update()
    return {"images": images, "labels": labels, "domains": domains, "classes": classes, "domain_names": list(folders)}


def _read_cache(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        return None  # an unreadable cache is simply rebuilt
    if not isinstance(payload, dict) or payload.get("fingerprint") != fingerprint:
        return None
    return payload


def _write_cache(path: Path, payload: dict) -> None:
    partial_file = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, partial_file)
        os.replace(partial_file, path)  # atomic: a reader never sees half a cache
    except OSError as err:
        partial_file.unlink(missing_ok=True)
        warnings.warn(
            f"could not write the Office-Home cache {path} ({err}); the next load decodes the images again",
            stacklevel=2,
        )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# --- download ---------------------------------------------------------------------------------
