"""planted: any dataset fedsens loads, split into domains with a personalization effect whose answer is known.

The base dataset's samples are dealt to `domains` domains class by class (every domain gets the same class
histogram, to within one sample), then the first round(strength x domains) domains are changed, each by its
own draw of the effect; the others stay as loaded. A sweep on the `domain` scheme with iid labels inside
each domain (a large alpha) then has one right answer per effect, fixed by construction:

- `concept`: each changed domain names the classes by its own permutation. The images are the base
  dataset's, so the features can stay shared and only the map from features to class names differs: the
  head (whatever follows the features) must lead; a client's own head undoes the permutation exactly.
- `recode`: each changed domain permutes the pixels inside every `patch` x `patch` patch by its own
  permutation (the same one in every patch, every channel). A patch embedding is linear in its patch's
  pixels, so a client's own patch embedding (its weight's columns permuted) undoes it exactly, and no
  later part can, as every later part sees only the embedded tokens: embed must lead. Training must not
  augment (a random shift moves the patch grid), and the model must see the images at their own size with
  this patch size.
- `feature`: each changed domain rescales and shifts the pixels, x -> a x + b (contrast a in [0.5, 1],
  brightness b keeping every pixel in range). After the linear patch embedding W that is an affine change of
  the token features, a W x + W b: a scale of every token and one shift vector. It is undone exactly by a
  client's own patch embedding (W / a, bias - W b / a), and for the scale also by the first block's norm
  (LayerNorm divides it out of every token but the position embedding); no transform of the pixels alone
  can reach the norms and not the embedding, so the answer is embed or norm, not norm alone.
- `none`: no domain is changed (strength is ignored): every domain has the same distribution, so no part
  may be resolved above zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedsens.personalize.datasets import registry
from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.errors import UserError

EFFECTS = ("concept", "recode", "feature", "none")
# The part(s) a sweep must rank first on each effect (none: nothing may be resolved above zero).
EXPECTED_PARTS: dict[str, tuple[str, ...]] = {
    "concept": ("head",),
    "recode": ("embed",),
    "feature": ("embed", "norm"),
    "none": (),
}


@dataclass(frozen=True)
class Options:
    """base: the dataset to change (any registered name but planted); effect: one of EFFECTS; strength: the
    share of the domains changed, in [0, 1] (rounded to whole domains, at least one above 0); domains: how many
    domains; patch: the side of the patches `recode` permutes inside (the model's patch size); seed: the
    domain assignment and every effect's draws."""

    base: str = "digits"
    effect: str = "concept"
    strength: float = 1.0
    domains: int = 4
    patch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base == "planted":
            raise UserError("planted option base=planted: choose the dataset to plant the effect in, e.g. digits")
        if self.effect not in EFFECTS:
            raise UserError(f"planted option effect={self.effect!r}: choose one of {', '.join(EFFECTS)}")
        if not 0 <= self.strength <= 1:
            raise UserError(f"planted option strength={self.strength} must be in [0, 1] (the share of domains changed)")
        if self.domains < 2:
            raise UserError(f"planted option domains={self.domains} must be at least 2")
        if self.patch < 1:
            raise UserError(f"planted option patch={self.patch} must be at least 1")

    @property
    def changed_domains(self) -> int:
        """How many domains carry the effect (the first ones)."""
        if self.effect == "none" or self.strength == 0:
            return 0
        return min(self.domains, max(1, round(self.strength * self.domains)))


def assign_domains(labels: torch.Tensor, domains: int, generator: torch.Generator) -> torch.Tensor:
    """Deal each class's samples (shuffled) to the domains in turn: every domain the same class histogram
    to within one sample, independent of the images."""
    assigned = torch.empty_like(labels)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        offset = int(torch.randint(domains, (1,), generator=generator))  # no domain always gets the extra one
        assigned[members] = (torch.arange(len(members)) + offset) % domains
    return assigned


def recode_patches(images: torch.Tensor, order: torch.Tensor, patch: int) -> torch.Tensor:
    """The pixels inside every patch x patch patch rearranged: position k of a patch takes the pixel at
    position order[k] (row-major inside the patch), in every patch and channel."""
    n, channels, height, width = images.shape
    if height % patch or width % patch:
        raise UserError(f"planted recode: the {height}x{width} images do not tile into {patch}x{patch} patches")
    rows, cols = height // patch, width // patch
    patches = images.reshape(n, channels, rows, patch, cols, patch).permute(0, 1, 2, 4, 3, 5)
    flat = patches.reshape(n, channels, rows, cols, patch * patch)[..., order]
    back = flat.reshape(n, channels, rows, cols, patch, patch).permute(0, 1, 2, 4, 3, 5)
    return back.reshape(n, channels, height, width).contiguous()


def affine_pixels(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x -> scale x + shift per channel (pixels as 0..255), rounded back to uint8."""
    values = images.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return values.round().clamp(0, 255).to(torch.uint8)


def draw_affine(channels: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A contrast in [0.5, 1] and a brightness that keeps 0..255 in range, per channel."""
    scale = 0.5 + 0.5 * torch.rand(channels, generator=generator, dtype=torch.float64)
    shift = torch.rand(channels, generator=generator, dtype=torch.float64) * 255 * (1 - scale)
    return scale, shift


def plant(data: ImageSet, options: Options) -> ImageSet:
    """`data` split into domains, the first `options.changed_domains` of them changed by the effect."""
    generator = torch.Generator().manual_seed(options.seed)
    domains = assign_domains(data.labels, options.domains, generator)
    images, labels = data.images.clone(), data.labels.clone()
    for domain in range(options.changed_domains):
        members = torch.nonzero(domains == domain).flatten()
        if options.effect == "concept":
            renaming = torch.randperm(data.num_classes, generator=generator)
            labels[members] = renaming[data.labels[members]]
        elif options.effect == "recode":
            order = torch.randperm(options.patch * options.patch, generator=generator)
            images[members] = recode_patches(data.images[members], order, options.patch)
        elif options.effect == "feature":
            scale, shift = draw_affine(data.channels, generator)
            images[members] = affine_pixels(data.images[members], scale, shift)
    domain_names = tuple(
        f"{options.effect}-{d}" if d < options.changed_domains else f"plain-{d}" for d in range(options.domains)
    )
    return ImageSet(f"planted-{options.effect}-{data.name}", images, labels, data.classes, domains, domain_names)


def load(
    root: Path | None,
    *,
    base: str = Options.base,
    effect: str = Options.effect,
    strength: float = Options.strength,
    domains: int = Options.domains,
    patch: int = Options.patch,
    seed: int = Options.seed,
) -> ImageSet:
    options = Options(base, effect, float(strength), int(domains), int(patch), int(seed))
    return plant(registry.load(options.base, root), options)


SPEC = registry.register(
    registry.DatasetSpec(
        "planted",
        load,
        "a loaded dataset (digits by default) split into domains with a planted effect whose answer is known "
        "(concept -> head, recode -> embed, feature -> embed/norm, none -> nothing); `fedsens validate` uses it",
        domains=True,
        scheme="domain",
        how_to_get=lambda root="DIR", **_: "nothing to download for the digits base; another base needs its files",
        Options=Options,
    )
)
