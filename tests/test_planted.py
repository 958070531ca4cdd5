"""The planted datasets: each answer holds by construction (personalize/datasets/planted.py)."""

from __future__ import annotations

import pytest
import torch

from fedsens.personalize import datasets
from fedsens.personalize.datasets import planted
from fedsens.personalize.errors import UserError

BASE = datasets.load("digits")


def _plant(effect: str, strength: float = 1.0, **options) -> datasets.ImageSet:
    return planted.plant(BASE, planted.Options(effect=effect, strength=strength, **options))


def _patch_embedding(channels: int, patch: int, seed: int = 0) -> torch.nn.Conv2d:
    """A ViT's patch embedding: one linear map of each patch's pixels (timm's PatchEmbed is this conv)."""
    torch.manual_seed(seed)
    return torch.nn.Conv2d(channels, 12, kernel_size=patch, stride=patch).double()


def test_domains_share_one_class_histogram_and_the_base_images():
    data = _plant("none")
    assert torch.equal(data.images, BASE.images) and torch.equal(data.labels, BASE.labels)
    assert data.domains is not None and data.domain_names == ("plain-0", "plain-1", "plain-2", "plain-3")
    histogram = torch.stack([torch.bincount(BASE.labels[data.domains == d], minlength=10) for d in range(4)])
    assert (histogram.max(0).values - histogram.min(0).values).max() <= 1  # the same distribution in every domain
    assert histogram.sum() == len(BASE)


def test_strength_is_the_share_of_domains_changed():
    assert [planted.Options(strength=s).changed_domains for s in (0, 0.1, 0.25, 0.5, 1)] == [0, 1, 1, 2, 4]
    assert planted.Options(effect="none", strength=1).changed_domains == 0
    data = _plant("recode", 0.5)
    assert data.domain_names == ("recode-0", "recode-1", "plain-2", "plain-3")
    plain = data.domains >= 2
    assert torch.equal(data.images[plain], BASE.images[plain]) and not torch.equal(data.images, BASE.images)


def test_concept_shift_renames_the_classes_by_one_permutation_per_domain():
    data = _plant("concept")
    assert torch.equal(data.images, BASE.images)
    permutations = []
    for d in range(4):
        members = data.domains == d
        pairs = set(zip(BASE.labels[members].tolist(), data.labels[members].tolist()))
        mapping = dict(pairs)
        assert len(mapping) == len(pairs) == 10  # a function of the true class: a head can undo it
        assert sorted(mapping.values()) == list(range(10))  # one to one: nothing is lost
        permutations.append(tuple(mapping[c] for c in range(10)))
    assert len(set(permutations)) == 4  # every domain names the classes its own way


def test_input_recoding_is_undone_exactly_by_a_clients_own_patch_embedding():
    data = _plant("recode")
    assert torch.equal(data.labels, BASE.labels)
    shared = _patch_embedding(1, 4)
    for d in range(4):
        members = data.domains == d
        recoded, original = data.images[members].double(), BASE.images[members].double()
        assert not torch.equal(recoded, original)
        # the order is recovered from one image's pixels here only to build the client's embedding
        order = _recovered_order(original, recoded, 4)
        local = _patch_embedding(1, 4)
        with torch.no_grad():
            local.weight.copy_(shared.weight.flatten(2)[..., order].view_as(shared.weight))
            local.bias.copy_(shared.bias)
        assert torch.allclose(local(recoded), shared(original))
        assert torch.equal(planted.recode_patches(BASE.images[members], torch.tensor(order), 4), data.images[members])


def _recovered_order(original: torch.Tensor, recoded: torch.Tensor, patch: int) -> list[int]:
    """A within-patch permutation that maps `original` to `recoded`: position k takes a source position
    whose pixels equal position k's in every patch of every image."""

    def positions(images: torch.Tensor) -> torch.Tensor:  # patch positions x (every patch of every image)
        n, c, h, w = images.shape
        patches = images.reshape(n, c, h // patch, patch, w // patch, patch).permute(3, 5, 0, 1, 2, 4)
        return patches.reshape(patch * patch, -1)

    source, target = positions(original), positions(recoded)
    order = []
    for k in range(patch * patch):
        matches = [m for m in range(patch * patch) if torch.equal(target[k], source[m])]
        assert matches, f"position {k} of the recoded patches is no position of the base patches"
        order.append(matches[0])
    return order


def test_the_feature_shift_is_an_affine_change_of_the_tokens_undone_by_the_patch_embedding():
    data = _plant("feature")
    assert torch.equal(data.labels, BASE.labels)
    shared = _patch_embedding(1, 4)
    for d in range(4):
        members = data.domains == d
        shifted, original = data.images[members].double(), BASE.images[members].double()
        # the contrast and brightness of the domain, read back from two pixel values' images
        scale, shift = _affine_fit(original, shifted)
        assert 0.5 <= scale <= 1 and 0 <= shift <= 255 * (1 - scale) + 1
        local = _patch_embedding(1, 4)
        with torch.no_grad():  # W x = (W / a)(a x + b) - W b / a
            local.weight.copy_(shared.weight / scale)
            local.bias.copy_(shared.bias - shared.weight.sum(dim=(1, 2, 3)) * shift / scale)
        error = (local(shifted) - shared(original)).abs().max()
        assert error < 0.5 * shared.weight.abs().sum(dim=(1, 2, 3)).max() / scale  # the uint8 rounding only
        assert not torch.allclose(shared(shifted), shared(original), atol=1.0)


def _affine_fit(original: torch.Tensor, shifted: torch.Tensor) -> tuple[float, float]:
    x, y = original.flatten(), shifted.flatten()
    scale = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return scale, float(y.mean() - scale * x.mean())


def test_the_registry_loads_it_with_options_and_bad_options_are_one_line():
    data = datasets.load("planted", effect="concept", strength=0.25, domains=2, seed=3)
    assert data.domain_names == ("concept-0", "plain-1") and len(data) == len(BASE)
    assert torch.equal(data.labels[data.domains == 1], BASE.labels[data.domains == 1])
    again = datasets.load("planted", effect="concept", strength=0.25, domains=2, seed=3)
    assert torch.equal(again.labels, data.labels) and torch.equal(again.domains, data.domains)
    for options, message in (
        (dict(effect="rotate"), "effect='rotate'"),
        (dict(strength=1.5), "strength=1.5"),
        (dict(domains=1), "domains=1"),
        (dict(base="planted"), "base=planted"),
    ):
        with pytest.raises(UserError, match=message):
            datasets.load("planted", **options)
    with pytest.raises(UserError, match="do not tile"):
        datasets.load("planted", effect="recode", patch=3)
