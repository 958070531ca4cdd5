"""Client partitions: coverage, disjointness, determinism, skew, stratification, manifests, CLI."""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import partition as P
from fedsens.personalize.errors import UserError


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_digits().target.astype(np.int64)


@pytest.fixture(scope="module")
def labels_and_domains() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.integers(0, 10, 1600), rng.integers(0, 4, 1600)


def all_indices(part: P.Partition) -> np.ndarray:
    return np.concatenate(part.train + part.test)


def dominant_share(hist: np.ndarray) -> float:
    return float((hist.max(axis=1) / hist.sum(axis=1)).mean())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "domain"])
def test_every_sample_used_once(scheme, labels_and_domains):
    labels, domains = labels_and_domains
    part = P.make(labels, domains, scheme=scheme, num_clients=8, seed=0, alpha=0.5)
    used = all_indices(part)
    assert part.num_clients == 8
    assert len(np.unique(used)) == len(used)  # disjoint, within and across clients
    assert all(idx.dtype == np.int64 for idx in part.train + part.test)
    # with 8 clients x 2 classes over 10 classes, pathological leaves no class unheld either
    assert np.array_equal(np.sort(used), np.arange(len(labels)))


def test_train_and_test_of_a_client_are_disjoint(digits_labels):
    part = P.make(digits_labels, scheme="dirichlet", num_clients=20, seed=0, alpha=0.3)
    for tr, te in zip(part.train, part.test):
        assert len(te) > 0 and len(tr) > 0
        assert not set(tr.tolist()) & set(te.tolist())


def test_deterministic_given_seed_and_different_across_seeds(digits_labels):
    first = P.make(digits_labels, scheme="dirichlet", num_clients=20, seed=3, alpha=0.3)
    again = P.make(digits_labels, scheme="dirichlet", num_clients=20, seed=3, alpha=0.3)
    other = P.make(digits_labels, scheme="dirichlet", num_clients=20, seed=4, alpha=0.3)
    assert first.hash == again.hash and first == again
    assert all(np.array_equal(a, b) for a, b in zip(first.train + first.test, again.train + again.test))
    assert other.hash != first.hash
    assert not np.array_equal(first.label_histogram(digits_labels), other.label_histogram(digits_labels))


def test_renaming_label_ids_gives_the_same_partition(digits_labels):
    renamed = np.random.default_rng(1).permutation(10)[digits_labels] + 100
    for scheme in ("dirichlet", "pathological", "iid"):
        base = P.make(digits_labels, scheme=scheme, num_clients=10, seed=0, alpha=0.3)
        moved = P.make(renamed, scheme=scheme, num_clients=10, seed=0, alpha=0.3)
        assert all(np.array_equal(a, b) for a, b in zip(base.train + base.test, moved.train + moved.test))


def test_torch_labels_match_numpy_labels(digits_labels):
    from_numpy = P.make(digits_labels, scheme="dirichlet", num_clients=10, seed=0)
    from_torch = P.make(torch.from_numpy(digits_labels), scheme="dirichlet", num_clients=10, seed=0)
    assert from_numpy.hash == from_torch.hash


def test_small_alpha_skews_and_large_alpha_is_near_uniform(digits_labels):
    def mean_dominant(alpha: float) -> float:
        shares = [
            dominant_share(
                P.make(digits_labels, scheme="dirichlet", num_clients=20, seed=s, alpha=alpha).label_histogram(
                    digits_labels
                )
            )
            for s in range(3)
        ]
        return float(np.mean(shares))

    skewed, uniform = mean_dominant(0.1), mean_dominant(100.0)
    assert skewed > 0.5  # a client's largest class is most of its data
    assert uniform < 0.2  # close to the 0.1 of ten balanced classes
    iid = P.make(digits_labels, scheme="iid", num_clients=20, seed=0)
    assert dominant_share(iid.label_histogram(digits_labels)) < 0.25


def test_train_and_test_follow_the_same_label_distribution(digits_labels):
    part = P.make(digits_labels, scheme="dirichlet", num_clients=20, seed=0, alpha=0.3, test_fraction=0.25)
    test_hist = part.label_histogram(digits_labels, split="test")
    whole = part.label_histogram(digits_labels)
    # stratified: every class of every client sends its share to test, up to rounding
    assert np.abs(test_hist - 0.25 * whole).max() <= 1.5
    train_dist = part.label_histogram(digits_labels, split="train")
    train_dist = train_dist / train_dist.sum(axis=1, keepdims=True)
    test_dist = test_hist / test_hist.sum(axis=1, keepdims=True)
    total_variation = 0.5 * np.abs(train_dist - test_dist).sum(axis=1)
    assert total_variation.mean() < 0.12  # about 0.085 here; an unstratified split gives about 0.25
    sizes = np.array([[len(tr), len(te)] for tr, te in zip(part.train, part.test)])
    assert np.allclose(sizes[:, 1] / sizes.sum(axis=1), 0.25, atol=0.03)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_k_classes_per_client(k, digits_labels):
    part = P.make(digits_labels, scheme="pathological", num_clients=20, seed=0, classes_per_client=k)
    hist = part.label_histogram(digits_labels)
    assert ((hist > 0).sum(axis=1) == k).all()
    holders = (hist > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1  # classes spread evenly over clients


def test_domain_scheme_keeps_clients_in_one_domain_and_spreads_them(labels_and_domains):
    labels, domains = labels_and_domains
    part = P.make(labels, domains, scheme="domain", num_clients=10, seed=0, alpha=0.3)
    dom_hist = part.domain_histogram(domains)
    assert ((dom_hist > 0).sum(axis=1) == 1).all()
    clients_per_domain = np.bincount(dom_hist.argmax(axis=1), minlength=4)
    assert sorted(clients_per_domain.tolist()) == [2, 2, 3, 3]
    iid = P.make(labels, scheme="iid", num_clients=10, seed=0)
    skewed, balanced = dominant_share(part.label_histogram(labels)), dominant_share(iid.label_histogram(labels))
    assert skewed > balanced + 0.08  # label skew inside the domains (about 0.27 vs 0.14)


def test_too_small_clients_stop_with_a_bounded_clear_error(digits_labels):
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"alpha=0\.001.*num_clients=50.*raise alpha"):
        P.make(digits_labels, scheme="dirichlet", num_clients=50, seed=0, alpha=0.001, min_samples=20)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"alpha": -1.0}, "alpha=-1.0 must be > 0"),
        ({"num_clients": 5000}, "more than the 1797 samples"),
        ({"num_clients": 0}, "num_clients=0"),
        ({"scheme": "stripes"}, "unknown partition scheme 'stripes'"),
        ({"scheme": "domain"}, "needs per-sample domains"),
        ({"test_fraction": 0.0}, "test_fraction=0.0"),
        ({"test_fraction": 1.0}, "test_fraction=1.0"),
        ({"num_clients": 1000}, "at least 4 samples each"),
        ({"scheme": "pathological", "classes_per_client": 11}, "classes_per_client=11"),
    ],
)
def test_bad_arguments_raise_one_clear_line(kwargs, message, digits_labels):
    arguments = {"scheme": "dirichlet", "num_clients": 10, "seed": 0, **kwargs}
    with pytest.raises(UserError, match=message) as caught:
        P.make(digits_labels, **arguments)
    assert "\n" not in str(caught.value)


def test_domain_scheme_needs_a_client_per_domain(labels_and_domains):
    labels, domains = labels_and_domains
    with pytest.raises(UserError, match="fewer than the 4 domains"):
        P.make(labels, domains, scheme="domain", num_clients=3, seed=0)


def test_default_min_samples_leaves_a_sample_on_each_side():
    assert P.default_min_samples(0.25) == 4
    assert P.default_min_samples(0.15) == 7
    assert P.default_min_samples(0.5) == 2


def test_save_and_load_round_trip(tmp_path, labels_and_domains):
    labels, domains = labels_and_domains
    part = P.make(labels, domains, scheme="domain", num_clients=8, seed=2, dataset="toy")
    path = P.save(
        part,
        tmp_path,
        labels=labels,
        domains=domains,
        classes=[f"c{i}" for i in range(10)],
        domain_names=["A", "B", "C", "D"],
    )
    assert path == tmp_path / "partition.json"
    document = json.loads(path.read_text())
    assert set(document) == {
        "params",
        "seed",
        "hash",
        "train",
        "test",
        "label_histogram",
        "domain_histogram",
        "classes",
        "domain_names",
    }
    assert document["seed"] == 2 and document["params"]["dataset"] == "toy"
    assert np.array(document["label_histogram"]).sum() == len(labels)
    assert np.array(document["domain_histogram"]).shape == (8, 4)
    loaded = P.load(path)
    assert loaded.hash == part.hash and loaded.params == part.params
    assert all(np.array_equal(a, b) for a, b in zip(loaded.train + loaded.test, part.train + part.test))


def test_load_rejects_an_edited_manifest(tmp_path, digits_labels):
    part = P.make(digits_labels, scheme="iid", num_clients=4, seed=0)
    path = P.save(part, tmp_path / "p.json", labels=digits_labels)
    document = json.loads(path.read_text())
    document["train"][0], document["train"][1] = document["train"][1], document["train"][0]
    path.write_text(json.dumps(document))
    with pytest.raises(UserError, match="was edited"):
        P.load(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a partition manifest"):
        P.load(path)
    with pytest.raises(UserError, match="no partition manifest"):
        P.load(tmp_path / "missing")


def test_load_or_make_reuses_a_matching_manifest(tmp_path, monkeypatch, digits_labels):
    kwargs = {"scheme": "dirichlet", "num_clients": 10, "seed": 0, "alpha": 0.3, "dataset": "digits"}
    made = P.load_or_make(tmp_path, digits_labels, **kwargs)
    assert (tmp_path / "partition.json").is_file()

    calls = []
    original = P.make

    @functools.wraps(original)  # a spy: keeps make's signature, counts the calls
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(P, "make", spy)
    reused = P.load_or_make(tmp_path, torch.from_numpy(digits_labels), **kwargs)
    assert reused.hash == made.hash and calls == []

    other_alpha = P.load_or_make(tmp_path, digits_labels, **{**kwargs, "alpha": 5.0})
    other_dataset = P.load_or_make(tmp_path, digits_labels, **{**kwargs, "dataset": "other"})
    assert len({made.hash, other_alpha.hash, other_dataset.hash}) == 3
    assert len(calls) == 2
    assert P.load(tmp_path).hash == other_dataset.hash  # the newest one was saved


def test_load_or_make_remakes_for_different_labels(tmp_path, digits_labels):
    kwargs = {"scheme": "iid", "num_clients": 4, "seed": 0}
    first = P.load_or_make(tmp_path, digits_labels, **kwargs)
    second = P.load_or_make(tmp_path, (digits_labels + 1) % 10, **kwargs)
    assert first.params["data_hash"] != second.params["data_hash"]


def test_summary_table_has_one_row_per_client(labels_and_domains):
    labels, domains = labels_and_domains
    part = P.make(labels, domains, scheme="domain", num_clients=8, seed=0)
    table = P.summary_table(part, labels, domains, ("A", "B", "C", "D"))
    assert list(table.columns) == ["client", "train", "test", "classes", "dominant_share", "domain"]
    assert len(table) == 8 and table["train"].sum() + table["test"].sum() == len(labels)
    assert set(table["domain"]) == {"A", "B", "C", "D"}
    assert table["dominant_share"].between(0.1, 1).all()
    assert "domain" not in P.summary_table(part, labels).columns


def test_cli_split_writes_the_manifest_and_reuses_it(tmp_path):
    runner = CliRunner()
    arguments = [
        "data",
        "split",
        "--dataset",
        "digits",
        "--clients",
        "10",
        "--alpha",
        "0.5",
        "--seed",
        "1",
        "--out",
        str(tmp_path),
    ]
    started = time.perf_counter()
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - started < 30
    part = P.load(tmp_path / "partition.json")
    assert part.num_clients == 10 and part.params["dataset"] == "digits" and part.params["alpha"] == 0.5
    assert part.hash in result.output and "dominant_share" in result.output
    assert len(json.loads((tmp_path / "partition.json").read_text())["classes"]) == 10
    written = (tmp_path / "partition.json").stat().st_mtime_ns
    again = runner.invoke(app, [*arguments, "--quiet"])
    assert again.exit_code == 0 and part.hash in again.output and "dominant_share" not in again.output
    assert (tmp_path / "partition.json").stat().st_mtime_ns == written


def test_cli_split_bad_alpha_is_one_error_line(tmp_path):
    result = CliRunner().invoke(app, ["data", "split", "--alpha", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: alpha=0.0 must be > 0" in result.output
    assert "Traceback" not in result.output


def _cifar_shaped_labels():
    return np.repeat(np.arange(100), 600)  # 600 per class x 100 classes, as CIFAR-100 train+test


def test_capped_rule_stops_filling_a_client_at_its_share_and_keeps_sizes_even():
    labels = _cifar_shaped_labels()
    sizes = {}
    for rule in ("plain", "capped"):
        part = P.make(labels, scheme="dirichlet", num_clients=64, seed=1, alpha=0.5, min_samples=4, rule=rule)
        sizes[rule] = np.array([len(tr) + len(te) for tr, te in zip(part.train, part.test)])
    cap = len(labels) / 64
    # a capped client received nothing after reaching the cap, so it overshoots by less than one class
    assert sizes["capped"].max() < cap + 600
    assert sizes["capped"].std() < sizes["plain"].std() / 2
    assert sizes["capped"].sum() == len(labels)


def test_capped_rule_redraws_until_min_samples_and_names_the_fix_when_impossible():
    labels = _cifar_shaped_labels()
    part = P.make(labels, scheme="dirichlet", num_clients=64, seed=1, alpha=0.5, min_samples=256, rule="capped")
    assert min(len(tr) + len(te) for tr, te in zip(part.train, part.test)) >= 256
    assert part.params["rule"] == "capped" and part.params["min_samples"] == 256
    with pytest.raises(UserError, match="min_samples=900"):
        P.make(
            labels, scheme="dirichlet", num_clients=64, seed=1, alpha=0.5, min_samples=900, rule="capped", max_redraws=3
        )
    with pytest.raises(UserError, match="partition rule"):
        P.make(labels, scheme="dirichlet", num_clients=4, seed=1, rule="greedy")


def test_plain_rule_keeps_the_manifest_parameters_of_before():
    part = P.make(np.repeat(np.arange(4), 10), scheme="dirichlet", num_clients=2, seed=0, alpha=1.0)
    assert "rule" not in part.params
