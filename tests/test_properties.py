"""Property-based tests: partitions and part specs hold their promises for any input hypothesis can think of."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsens.personalize import model as model_lib
from fedsens.personalize import partition
from fedsens.personalize.errors import UserError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def partition_inputs(draw):
    n_classes = draw(st.integers(1, 6))
    n = draw(st.integers(4, 120))
    labels = np.array(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    scheme = draw(st.sampled_from(["iid", "dirichlet", "pathological", "domain"]))
    domains = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))) if scheme == "domain" else None
    return dict(
        labels=labels,
        domains=domains,
        scheme=scheme,
        num_clients=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**31 - 1)),
        alpha=draw(st.floats(0.05, 10.0)),
        classes_per_client=draw(st.integers(1, 3)),
        test_fraction=draw(st.sampled_from([0.15, 0.25, 0.5])),
        min_samples=draw(st.one_of(st.none(), st.integers(1, 10))),
        max_redraws=5,
    )


@SETTINGS
@given(partition_inputs())
def test_partitions_are_disjoint_complete_deterministic_and_respect_min_size_or_say_why(kwargs):
    labels, domains = kwargs.pop("labels"), kwargs.pop("domains")
    try:
        first = partition.make(labels, domains, **kwargs)
    except UserError as err:
        assert str(err) and "\n" not in str(err)  # one clear line
        return
    train, test = first.train, first.test
    everything = np.concatenate([*train, *test])
    assert len(everything) == len(np.unique(everything))  # disjoint
    if kwargs["scheme"] in ("iid", "dirichlet"):
        assert sorted(everything.tolist()) == list(range(len(labels)))  # complete
    assert len(train) == len(test) == kwargs["num_clients"]
    minimum = kwargs["min_samples"] or partition.default_min_samples(kwargs["test_fraction"])
    assert all(len(tr) + len(te) >= minimum for tr, te in zip(train, test))
    again = partition.make(labels, domains, **kwargs)
    assert again.hash == first.hash and all(np.array_equal(a, b) for a, b in zip(train, again.train))


@pytest.fixture(scope="module")
def vit():
    return model_lib.build("vit-nano", 10, 3, 32, seed=0)


TERMS = [*model_lib.PART_TYPES, "all", "blocks.0", "blocks.1.attn", "head", "heads", "blocks.9", "attn@0", "mlp@1-0"]


@SETTINGS
@given(st.lists(st.sampled_from(TERMS), min_size=1, max_size=3), st.randoms(use_true_random=False))
def test_every_part_spec_resolves_to_the_same_parameters_by_name_or_fails_with_a_message(vit, terms, rnd):
    spec = ",".join(terms)
    try:
        names = model_lib.resolve(vit, spec)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    shuffled = terms[:]
    rnd.shuffle(shuffled)
    assert set(model_lib.resolve(vit, ",".join(shuffled))) == set(names)  # order of terms does not matter
    assert set(names) <= {n for n, _ in vit.named_parameters()}
    union = set().union(*(set(model_lib.resolve(vit, t)) for t in dict.fromkeys(terms)))
    assert set(names) == union  # a spec is the union of its terms
