"""ImageSet: a whole dataset in memory, as every loader returns it; and what the loaders of users' images share:
one decoder (any PIL mode -> 8-bit RGB at the run's size), the loop that decodes a whole set (bad images named or
skipped and counted), and the cache of decoded images written beside the data."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fedsens.personalize import runio
from fedsens.personalize.datasets.registry import one_line
from fedsens.personalize.errors import UserError


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


def _read_decoded_cache(path: Path, fingerprint: str) -> dict | None:
    """A loader's cache of decoded images (a torch file holding a dict with its `fingerprint`), or None when
    it is missing, unreadable or made from other files (the loader then decodes again and rewrites it)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    return payload if isinstance(payload, dict) and payload.get("fingerprint") == fingerprint else None


def _write_decoded_cache(path: Path, payload: dict) -> None:
    """Write a loader's cache atomically (a reader never sees half of one); a folder that cannot take it is a
    warning, not an error: the next load decodes again."""
    try:
        runio.replace_atomically(path, lambda tmp: torch.save(payload, tmp))
    except OSError as err:
        warnings.warn(f"could not write the image cache {path} ({err}); the next load decodes again", stacklevel=3)


def decoded_once(cache: Path, fingerprint: str, decode: Callable[[], dict], *, name: str, quiet: bool) -> dict:
    """A loader's decoded images: read from `cache` when it was made from the same files and options (its
    `fingerprint`), else `decode()`d and written there. Images the decode left out (`skipped`) are counted in a
    warning unless `quiet`."""
    payload = _read_decoded_cache(cache, fingerprint)
    if payload is None:
        payload = {**decode(), "fingerprint": fingerprint}
        _write_decoded_cache(cache, payload)
    if payload.get("skipped") and not quiet:
        warnings.warn(f"{name}: left out {payload['skipped']} image(s) that could not be decoded", stacklevel=3)
    return payload


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit scaled by their range, alpha over black, CMYK/palette/grey converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(source: str | Path | IO[bytes], size: int) -> np.ndarray:
    """An image file (a path or an open binary file) as size x size x 3 uint8 (aspect ignored, as Office-Home is
    read); OSError/ValueError when undecodable."""
    with Image.open(source) as image:
        image.draft("RGB", (size, size))  # JPEGs decode straight at a fraction of their size
        image.load()
        return np.array(to_rgb(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


@dataclass(frozen=True)
class Undecoded:
    """One image still to decode: what `Image.open` reads, the words that name it in an error, its ids."""

    source: str | Path | IO[bytes]  # a path or an open binary file (made when the sample is reached)
    where: str
    label: int
    domain: int = 0


def decode_images(
    samples: Iterable[Undecoded], total: int, size: int, *, skip_bad_images: bool, quiet: bool, desc: str
) -> dict:
    """Every sample decoded at size x size: {images, labels, domains, skipped}. An image that cannot be decoded
    stops with one line naming it, or is left out and counted when `skip_bad_images`."""
    images = torch.empty(total, 3, size, size, dtype=torch.uint8)
    labels, domains, kept, bad = [], [], 0, 0
    for sample in tqdm(samples, total=total, desc=f"{desc} -> {size}px (once)", disable=quiet):
        try:
            pixels = read_image(sample.source, size)
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on broken files
            if not skip_bad_images:
                raise UserError(
                    f"cannot decode image {sample.where} ({one_line(err)}); "
                    "replace or delete it, or pass --data-option skip_bad_images=true to leave such images out"
                ) from None
            bad += 1
            continue
        images[kept] = torch.from_numpy(pixels).permute(2, 0, 1)
        labels.append(sample.label)
        domains.append(sample.domain)
        kept += 1
    return {
        "images": images[:kept].clone(),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "domains": torch.tensor(domains, dtype=torch.int64),
        "skipped": bad,
    }
