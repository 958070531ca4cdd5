"""officehome: Office-Home (15,588 images, 65 classes, four domains) through torchvision's ImageFolder,
one folder per domain; decoded once at the wanted size and cached beside the images."""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from fedsens.personalize import trees
from fedsens.personalize.datasets.imageset import ImageSet, decoded_once
from fedsens.personalize.datasets.registry import DatasetSpec, one_line, register
from fedsens.personalize.errors import UserError

OFFICEHOME_URL = "https://www.hemanthdv.org/officeHomeDataset.html"
# The four Office-Home domains in their canonical order, each with the spellings seen in the wild.
OFFICEHOME_DOMAINS = (("Art",), ("Clipart",), ("Product",), ("Real World", "Real_World"))
DEFAULT_SIZE = 64  # when loaded outside a run (`fedsens data split`); a run decodes at the model's input size


def how_to_get(root: Path | str = "DIR", **_) -> str:
    return (
        f"download Office-Home from {OFFICEHOME_URL} and unzip it so that {root}/Art/<class>/*.jpg exists "
        f"(`fedsens data download officehome --root {root}` shows the layout)"
    )


def instructions(root: Path | None = None) -> str:
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
        f"  3. Load it with root {target}; the first load at each image size resizes every image once and\n"
        f"     caches the result in {target}/.fedsens_cache_officehome_<size>.pt."
    )


def load(root: Path | None, *, size: int = DEFAULT_SIZE, quiet: bool = False) -> ImageSet:
    """Every domain folder present; images squashed to size x size (aspect ignored) and cached per size."""
    if size < 1:
        raise UserError(f"Office-Home size {size} must be a positive number of pixels")
    root = SPEC.require_root(root)
    folders = _folders(root, size)
    fingerprint = _file_fingerprint(root, folders, size)
    cache = root / f".fedsens_cache_officehome_{size}.pt"
    payload = decoded_once(cache, fingerprint, partial(_decode, folders, size, quiet), name="officehome", quiet=quiet)
    classes, domain_names = tuple(payload["classes"]), tuple(payload["domain_names"])
    return ImageSet("officehome", payload["images"], payload["labels"], classes, payload["domains"], domain_names)


def _domain_paths(root: Path) -> list[Path]:
    spelled = [
        next((root / name for name in spellings if (root / name).is_dir()), None) for spellings in OFFICEHOME_DOMAINS
    ]
    return [path for path in spelled if path is not None]


def present(root: Path) -> bool:
    return bool(_domain_paths(root))


def _folders(root: Path, size: int) -> dict[str, ImageFolder]:
    """Domain folder name -> ImageFolder over its class folders, in the canonical domain order."""
    found = _domain_paths(root)
    if not found:
        fix = how_to_get(root)
        raise UserError(f"Office-Home not found: no Art, Clipart, Product or Real World folder in {root}; {fix}")
    folders = {}
    for path in found:
        trees.check_no_loops(path, "the Office-Home domain")  # ImageFolder would follow a loop ~40 levels deep
        try:
            # allow_empty: a domain may lack a class; the class list is the union over domains. Each real file
            # once: a folder linked twice is not counted twice.
            folders[path.name] = ImageFolder(
                str(path), loader=partial(read_rgb, size=size), allow_empty=True, is_valid_file=trees.read_once()
            )
        except FileNotFoundError:
            raise UserError(f"Office-Home domain {path} has no class folders; {how_to_get(root)}") from None
    if not any(folder.samples for folder in folders.values()):
        raise UserError(f"Office-Home folders in {root} hold no images; {how_to_get(root)}")
    return folders


def read_rgb(path: str, size: int) -> Image.Image:
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEGs decode straight at 1/2..1/8 scale: much faster
        return to_8bit(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


# Pillow's modes of greyscale images deeper than 8 bits (a 16-bit PNG opens as "I;16" or "I").
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit version of a 16-bit greyscale image, scaled (0..65535 -> 0..255): Pillow's convert("RGB")
    clips such values at 255 instead, so a mid-grey 16-bit photo would come out almost white."""
    if image.mode not in WIDE_GREY_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def _file_fingerprint(root: Path, folders: dict[str, ImageFolder], size: int) -> str:
    """A hash of every image's path and byte size, so a changed tree is decoded again."""
    digest = hashlib.sha256(f"size={size}".encode())
    for folder in folders.values():
        for path, _ in folder.samples:
            digest.update(f"\n{os.path.relpath(path, root)}:{os.path.getsize(path)}".encode())
    return digest.hexdigest()


def _decode(folders: dict[str, ImageFolder], size: int, quiet: bool) -> dict:
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
                        f"cannot read Office-Home image {path} ({one_line(err)}); replace or delete that file"
                    ) from None
                images[row] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
                labels[row] = class_id[folder.classes[local_label]]
                domains[row] = domain
                row += 1
                bar.update()
    return {"images": images, "labels": labels, "domains": domains, "classes": classes, "domain_names": list(folders)}


SPEC = register(
    DatasetSpec(
        "officehome",
        load,
        "Office-Home: 15,588 photos, 65 classes, four domains (Art, Clipart, Product, Real World)",
        test_fraction=0.15,
        domains=True,
        scheme="domain",
        needs_root=True,
        channels=3,
        classes=65,
        how_to_get=how_to_get,
        guide=instructions,
        present=present,
        decodes_at="size",
        reports_progress=True,
    )
)
