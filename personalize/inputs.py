"""Turning uint8 images into model-ready batches on the device, and the client's batch stream.

The dataset stays uint8 (on the device when it is CUDA); each batch is converted, resized to the
model's input, channel-repeated only when the model wants 3 channels, normalised (mean 0.5, std 0.5,
as the public FedPerfix code does, or the timm model's own mean/std) and, while training, randomly
shifted/scaled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedsens.personalize.model import InputSpec


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, round, client, ...): any round can be replayed alone."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True)
class BatchPreparer:
    """uint8 N x C x H x W -> float batch the model takes."""

    spec: InputSpec
    augment_shift: float = 0.0  # max translation as a fraction of the image side (0 = no augmentation)
    augment_scale: float = 0.0  # max relative zoom in/out

    def __call__(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if x.shape[1] == 1 and self.spec.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.spec.img_size or x.shape[-2] != self.spec.img_size:
            x = F.interpolate(
                x,
                size=(self.spec.img_size, self.spec.img_size),
                mode=self.spec.interpolation,
                align_corners=None if self.spec.interpolation == "nearest" else False,
                antialias=self.spec.interpolation != "nearest" and x.shape[-1] > self.spec.img_size,
            )
            if self.spec.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)  # bicubic overshoots the pixel range
        if generator is not None and (self.augment_shift > 0 or self.augment_scale > 0):
            x = self._random_affine(x, generator)
        if self.spec.mean is None or self.spec.std is None:
            return (x - 0.5) / 0.5
        mean = torch.tensor(self.spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _random_affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        draws = torch.rand(n, 3, generator=generator) * 2 - 1  # uniform in [-1, 1]
        zoom = 1.0 + self.augment_scale * draws[:, 0]
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = zoom
        theta[:, 1, 1] = zoom
        theta[:, :, 2] = 2 * self.augment_shift * draws[:, 1:]  # grid units span [-1, 1]
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        # Padding with the darkest value: digits and medical scans have a dark background.
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: np.ndarray,
    prepare: BatchPreparer,
    *,
    batch_size: int,
    generator: torch.Generator | None = None,
    epochs: int = 1,
    steps: int | None = None,
    augment: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (when a generator is given) mini-batches of a client's split; `steps` overrides epochs."""
    index = torch.as_tensor(indices, dtype=torch.long)
    if len(index) == 0:
        return
    done = 0
    while True:
        order = index[torch.randperm(len(index), generator=generator)] if generator is not None else index
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size].to(images.device)
            x = prepare(images[chunk], generator=generator if augment else None)
            yield x, labels[chunk]
            done += 1
            if steps is not None and done >= steps:
                return
        epochs -= 1
        if steps is None and epochs <= 0:
            return
