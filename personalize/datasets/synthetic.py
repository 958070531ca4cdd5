"""synthetic: class templates plus noise, generated on load; for tests and smoke runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.datasets.registry import DatasetSpec, register
from fedsens.personalize.errors import UserError

SAMPLES_PER_DRAW = 4096  # a multiple of 16: block-wise draws give the same numbers as one draw of all


@dataclass(frozen=True)
class Options:
    """`--data-option` keys of the synthetic set (the loader's keywords, with its defaults)."""

    num_samples: int = field(
        default=512, metadata={"help": "images in the set, e.g. clients x 8 for a large population"}
    )
    num_classes: int = field(default=10, metadata={"help": "classes"})
    image_size: int = field(default=16, metadata={"help": "image side in pixels"})
    channels: int = field(default=3, metadata={"help": "colour channels"})
    seed: int = field(default=0, metadata={"help": "seed of the templates and the noise"})
    noise: float = field(default=0.25, metadata={"help": "standard deviation of the Gaussian noise"})
    num_domains: int = field(default=0, metadata={"help": "domains, each with its own shift (0: none)"})


def load(
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
    shape = (channels, image_size, image_size)
    noise_state = generator.get_state()
    domains = shifts = None
    if num_domains:  # drawn after the noise, as one draw of all the noise would leave the generator
        for start in range(0, num_samples, SAMPLES_PER_DRAW):
            torch.randn(min(SAMPLES_PER_DRAW, num_samples - start), *shape, generator=generator)
        shifts = _blocky(torch.rand(num_domains, channels, 4, 4, generator=generator) - 0.5, image_size) * 0.3
        domains = torch.randint(num_domains, (num_samples,), generator=generator)
        generator.set_state(noise_state)
    # Block by block, so that a population of millions of images never holds them all as floats.
    images = torch.empty(num_samples, *shape, dtype=torch.uint8)
    for start in range(0, num_samples, SAMPLES_PER_DRAW):
        stop = min(start + SAMPLES_PER_DRAW, num_samples)
        pixels = templates[labels[start:stop]] + noise * torch.randn(stop - start, *shape, generator=generator)
        if domains is not None and shifts is not None:
            pixels = pixels + shifts[domains[start:stop]]
        images[start:stop] = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    classes = tuple(f"class_{index}" for index in range(num_classes))
    domain_names = tuple(f"domain_{index}" for index in range(num_domains))
    return ImageSet("synthetic", images, labels, classes, domains, domain_names)


def _blocky(coarse: torch.Tensor, image_size: int) -> torch.Tensor:
    # Coarse blocks rather than pixel noise: patch-level structure a tiny ViT picks up quickly.
    return F.interpolate(coarse, size=(image_size, image_size), mode="nearest")


SPEC = register(
    DatasetSpec(
        "synthetic",
        load,
        "blocky class templates plus noise, generated on load (tests, smoke runs)",
        image_size=16,
        channels=3,
        classes=10,
        how_to_get=lambda root="DIR", **_: "nothing to download; it is generated on load",
        Options=Options,
    )
)
