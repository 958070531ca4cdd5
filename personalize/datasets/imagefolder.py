"""imagefolder: the user's own images, one folder per class (`DIR/<class>/*.png`), or one folder per domain
holding the class folders (`DIR/<domain>/<class>/*.jpg`, like Office-Home) for `--scheme domain`.

Files are found with torchvision's ImageFolder rules (its extensions, sorted class names), decoded once at
the model's input size and cached beside the images (`DIR/.fedsens_cache_imagefolder_<size>.pt`, rebuilt
when a file's path or size changes). Every image becomes 8-bit RGB: grey and palette images are expanded,
CMYK converted, 16- and 32-bit images scaled to 8 bits by their type's range, alpha composited over black.
An image that cannot be decoded stops the load with one line naming the file, unless `skip_bad_images`
is set: then it is left out and counted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fedsens.personalize import trees
from fedsens.personalize.datasets.imageset import (
    ImageSet,
    Undecoded,
    decode_images,
    decoded_once,
)
from fedsens.personalize.datasets.registry import DatasetSpec, register
from fedsens.personalize.errors import UserError

DEFAULT_SIZE = 64  # outside a run (`fedsens data split`); a run decodes at the model's input size


@dataclass(frozen=True)
class Options:
    """The loader's options (`--data-option KEY=VALUE`); the decoded size is the run's (the model's input), as
    for Office-Home."""

    skip_bad_images: bool = field(
        default=False, metadata={"help": "leave undecodable images out (counted) instead of stopping"}
    )


def how_to_get(root: Path | str = "DIR", **_) -> str:
    return f"put one folder per class under {root} ({root}/<class>/*.jpg), or {root}/<domain>/<class>/*.jpg"


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(path: Path) -> bool:
    return any(p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS) for p in path.iterdir())


def layout(root: Path) -> dict[str, Path]:
    """Domain name -> folder of class folders ({'': root} when root holds the class folders itself)."""
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; {how_to_get(root)}")
    first = _subfolders(root)
    if not first:
        raise UserError(f"image folder {root} holds no class folders; {how_to_get(root)}")
    if any(_has_images(folder) for folder in first):
        return {"": root}
    if all(_subfolders(folder) for folder in first):
        return {folder.name: folder for folder in first}
    raise UserError(f"image folder {root}: {first[0]} holds neither images nor class folders; {how_to_get(root)}")


def _samples(root: Path, domains: dict[str, Path]) -> tuple[list[str], list[tuple[str, str, int]]]:
    """The class names (union over domains) and (path, class, domain index) of every image file."""
    found: list[tuple[str, str, int]] = []
    classes: set[str] = set()
    read_once = trees.read_once()  # a folder linked twice is read once
    for domain_index, folder in enumerate(domains.values()):
        names, _ = find_classes(str(folder))
        for class_name in names:
            class_folder = folder / class_name
            if not any(p.name.lower().endswith(IMG_EXTENSIONS) for p in class_folder.rglob("*") if p.is_file()):
                raise UserError(f"class folder {class_folder} has no images; add some or remove the folder")
        class_index = {n: i for i, n in enumerate(names)}
        for path, index in make_dataset(str(folder), class_index, is_valid_file=read_once):
            found.append((path, names[index], domain_index))
        classes.update(names)
    return sorted(classes), found


def _fingerprint(root: Path, samples: list[tuple[str, str, int]], size: int, skip: bool) -> str:
    digest = hashlib.sha256(f"size={size};skip={skip}".encode())
    for path, _, _ in samples:
        digest.update(f"\n{os.path.relpath(path, root)}:{os.path.getsize(path)}".encode())
    return digest.hexdigest()


def _decode(samples: list[tuple[str, str, int]], classes: list[str], size: int, skip: bool, quiet: bool) -> dict:
    class_id = {name: index for index, name in enumerate(classes)}
    undecoded = (Undecoded(path, path, class_id[class_name], domain) for path, class_name, domain in samples)
    payload = decode_images(undecoded, len(samples), size, skip_bad_images=skip, quiet=quiet, desc="images")
    return {**payload, "classes": list(classes)}


def load(
    root: Path | None, *, size: int = DEFAULT_SIZE, skip_bad_images: bool = False, quiet: bool = False
) -> ImageSet:
    options = Options(skip_bad_images=skip_bad_images)
    if size < 1:
        raise UserError(f"imagefolder size {size} must be a positive number of pixels")
    root = SPEC.require_root(root)
    trees.check_no_loops(root, "the image folder")  # rglob and ImageFolder would follow a loop ~40 levels deep
    domains = layout(root)
    classes, samples = _samples(root, domains)
    fingerprint = _fingerprint(root, samples, size, options.skip_bad_images)
    cache = root / f".fedsens_cache_imagefolder_{size}.pt"
    decode = partial(_decode, samples, classes, size, options.skip_bad_images, quiet)
    payload = decoded_once(cache, fingerprint, decode, name="imagefolder", quiet=quiet)
    if not len(payload["labels"]):
        raise UserError(f"no image in {root} could be decoded; {how_to_get(root)}")
    has_domains = list(domains) != [""]
    return ImageSet(
        "imagefolder",
        payload["images"],
        payload["labels"],
        tuple(payload["classes"]),
        payload["domains"] if has_domains else None,
        tuple(domains) if has_domains else (),
    )


def present(root: Path) -> bool:
    try:
        layout(root)
    except UserError:
        return False
    return True


SPEC = register(
    DatasetSpec(
        "imagefolder",
        load,
        "your own images: DIR/<class>/*.jpg, or DIR/<domain>/<class>/*.jpg for --scheme domain",
        needs_root=True,
        channels=3,
        how_to_get=how_to_get,
        present=present,
        decodes_at="size",
        Options=Options,
        reports_progress=True,
    )
)
