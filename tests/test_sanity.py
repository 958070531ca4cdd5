"""The reference check: a FedAvg reference that did not learn stops the sweep; the sanity columns; --calibrate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real World")


def write_digits_officehome(root: Path, *, size: int = 32, seed: int = 0) -> Path:
    """The 8x8 digits as an Office-Home folder tree: each image upsampled to `size` px RGB and given to one of
    the four domains at random, each domain with its own colours and contrast (feature skew across domains)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    domain_of = rng.integers(0, len(OFFICEHOME_DOMAINS), size=len(digits.target))
    # (ink colour, paper colour, contrast): what a domain does to every one of its images
    looks = (
        ((120, 60, 20), (230, 210, 170), 0.5),  # Art: brown ink on cream paper, low contrast
        ((250, 250, 250), (20, 20, 120), 1.0),  # Clipart: white on dark blue (inverted)
        ((10, 10, 10), (255, 255, 255), 1.0),  # Product: black on white
        ((40, 110, 40), (150, 150, 150), 0.35),  # Real World: green on grey, washed out
    )
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        domain = int(domain_of[index])
        contrast = looks[domain][2]
        ink, paper = (np.asarray(c, dtype=float) for c in looks[domain][:2])
        strength = (image / 16.0 * contrast)[..., None]
        pixels = paper * (1 - strength) + ink * strength + rng.normal(0, 8, size=(8, 8, 3))
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        folder = root / OFFICEHOME_DOMAINS[domain] / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{index:05d}.jpg", quality=90)
    return root
