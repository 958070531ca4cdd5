"""digits: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); ships with it, no download.
The embedded default: small enough for a CPU run in a minute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.datasets.registry import DatasetSpec, register


def load(root: Path | None) -> ImageSet:
    bunch = load_digits()
    # Pixel values are ink counts 0..16; stretch them to the 0..255 range the other datasets use.
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    classes = tuple(str(label) for label in bunch.target_names)
    return ImageSet("digits", torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64)), classes)


SPEC = register(
    DatasetSpec(
        "digits",
        load,
        "scikit-learn's 8x8 handwritten digits; ships with scikit-learn (the embedded default)",
        image_size=8,
        channels=1,
        classes=10,
        how_to_get=lambda root="DIR", **_: "nothing to download; it ships with scikit-learn",
    )
)
