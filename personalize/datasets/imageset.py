"""ImageSet: a whole dataset in memory, as every loader returns it."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

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


def read_decoded_cache(path: Path, fingerprint: str) -> dict | None:
    """A loader's cache of decoded images (a torch file holding a dict with its `fingerprint`), or None when
    it is missing, unreadable or made from other files (the loader then decodes again and rewrites it)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    return payload if isinstance(payload, dict) and payload.get("fingerprint") == fingerprint else None
