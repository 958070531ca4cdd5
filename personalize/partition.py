"""Who holds which sample: client partitions as pure functions of the labels and a seed.

`make` gives every client disjoint train and test index arrays drawn from the same per-client
distribution; `save`/`load` keep them as a JSON manifest with a content hash, and `load_or_make`
reuses a saved manifest when the same parameters come again.

Schemes:
    iid           a random equal split
    dirichlet     label skew: per class, the shares over clients ~ Dir(alpha)
                  rule "capped" (the public FedPerfix code's): classes are dealt one after another and a
                  client already holding N / num_clients samples gets no share of the next class
    pathological  each client holds `classes_per_client` classes, a shard of each
    domain        clients spread evenly over the domains, Dirichlet label skew inside each domain

Classes (and domains) are numbered by first appearance before any draw, so renaming the label ids
gives exactly the same partition.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedsens.personalize import runio
from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import SCHEMES

RULES = ("plain", "capped")


@dataclass(frozen=True, eq=False)
class Partition:
    """Per-client train/test index arrays (int64, sorted) plus the parameters that made them."""

    params: dict
    train: list[np.ndarray]
    test: list[np.ndarray]
    hash: str

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def indices(self, split: str = "all") -> list[np.ndarray]:
        """Each client's indices for split "train", "test" or "all" (train then test)."""
        if split == "train":
            return list(self.train)
        if split == "test":
            return list(self.test)
        if split == "all":
            return [np.concatenate([tr, te]) for tr, te in zip(self.train, self.test)]
        raise UserError(f"unknown split {split!r}; use 'train', 'test' or 'all'")

    def label_histogram(self, labels, *, split: str = "all", num_classes: int | None = None) -> np.ndarray:
        """Counts per client (rows) and label id (columns)."""
        return _histogram(self.indices(split), _as_ints(labels, "labels"), num_classes)

    def domain_histogram(self, domains, *, split: str = "all", num_domains: int | None = None) -> np.ndarray:
        """Counts per client (rows) and domain id (columns)."""
        return _histogram(self.indices(split), _as_ints(domains, "domains"), num_domains)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Partition) and self.hash == other.hash

    def __hash__(self) -> int:
        return hash(self.hash)


def make(
    labels,
    domains=None,
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    test_fraction: float = 0.25,
    min_samples: int | None = None,
    max_redraws: int = 100,
    dataset: str | None = None,
    rule: str = "plain",
) -> Partition:
    """Partition the samples whose labels are given among `num_clients` clients.

    min_samples (default `default_min_samples(test_fraction)`: enough that every client gets at
    least one test and one train sample) is the fewest samples any client may hold; Dirichlet
    draws are repeated up to `max_redraws` more times until it holds, then a UserError says what
    to change. `dataset` only goes into the parameters, so two datasets never share a manifest.
    rule (dirichlet and domain schemes): "plain" draws every class's shares independently; "capped"
    is the public FedPerfix code's rule (see `_capped_counts`).
    """
    labels = _as_ints(labels, "labels")
    domains = None if domains is None else _as_ints(domains, "domains")
    params = _resolve_params(
        labels,
        domains,
        scheme=scheme,
        num_clients=num_clients,
        seed=seed,
        alpha=alpha,
        classes_per_client=classes_per_client,
        test_fraction=test_fraction,
        min_samples=min_samples,
        max_redraws=max_redraws,
        dataset=dataset,
        rule=rule,
    )
    rng = np.random.default_rng(seed)
    encoded = _encode_by_first_appearance(labels)
    if scheme == "iid":
        clients = np.array_split(rng.permutation(len(labels)), num_clients)
    elif scheme == "dirichlet":
        clients = _dirichlet(np.arange(len(labels)), encoded, num_clients, params, rng)
    elif scheme == "pathological":
        clients = _pathological(encoded, num_clients, classes_per_client, rng)
    else:
        clients = _domain(encoded, _encode_by_first_appearance(domains), num_clients, params, rng)
    _check_min_samples(clients, params)
    splits = [_split_client(idx, encoded, test_fraction, rng) for idx in clients]
    train = [tr for tr, _ in splits]
    test = [te for _, te in splits]
    return Partition(params=params, train=train, test=test, hash=_content_hash(params, train, test))


def default_min_samples(test_fraction: float) -> int:
    """Fewest samples per client so a `test_fraction` split leaves at least one on each side
    (4 at 0.25, 7 at 0.15); small enough that digits over 20 clients at alpha 0.3 draws at once."""
    return max(2, math.ceil(1 / min(test_fraction, 1 - test_fraction) - 1e-9))


def _resolve_params(
    labels: np.ndarray,
    domains: np.ndarray | None,
    *,
    scheme,
    num_clients,
    seed,
    alpha,
    classes_per_client,
    test_fraction,
    min_samples,
    max_redraws,
    dataset,
    rule="plain",
) -> dict:
    """Validate the arguments and return the JSON-ready parameters that identify a partition."""
    n = len(labels)
    if scheme not in SCHEMES:
        raise UserError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise UserError(f"num_clients={num_clients!r} must be a whole number >= 1")
    if not alpha > 0:
        raise UserError(
            f"alpha={alpha!r} must be > 0 (small = strong label skew, e.g. 0.1; large = near iid, e.g. 100)"
        )
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction={test_fraction!r} must lie strictly between 0 and 1, e.g. 0.25")
    if rule not in RULES:
        raise UserError(f"unknown partition rule {rule!r}; use one of {', '.join(RULES)}")
    if max_redraws < 0:
        raise UserError(f"max_redraws={max_redraws!r} must be >= 0")
    if min_samples is None:
        min_samples = default_min_samples(test_fraction)
    if min_samples < 1:
        raise UserError(f"min_samples={min_samples!r} must be >= 1")
    if domains is not None and len(domains) != n:
        raise UserError(f"domains has {len(domains)} entries but labels has {n}; give one domain per sample")
    num_classes = len(np.unique(labels))
    if scheme == "pathological" and not 1 <= classes_per_client <= num_classes:
        raise UserError(f"classes_per_client={classes_per_client!r} must lie between 1 and the {num_classes} classes")
    if scheme == "domain":
        if domains is None:
            raise UserError(
                "the 'domain' scheme needs per-sample domains; use a dataset with domains "
                "(e.g. officehome) or another scheme such as dirichlet"
            )
        num_domains = len(np.unique(domains))
        if num_clients < num_domains:
            raise UserError(
                f"num_clients={num_clients} is fewer than the {num_domains} domains; "
                f"use at least {num_domains} clients (ideally a multiple)"
            )
    if num_clients * min_samples > n:
        raise UserError(
            f"{num_clients} clients x at least {min_samples} samples each (min_samples) needs more than the "
            f"{n} samples; use at most {n // min_samples} clients (fewer for a skewed Dirichlet split) "
            "or lower min_samples"
        )
    params = {
        "scheme": scheme,
        "num_clients": int(num_clients),
        "seed": int(seed),
        "alpha": float(alpha),
        "classes_per_client": int(classes_per_client),
        "test_fraction": float(test_fraction),
        "min_samples": int(min_samples),
        "max_redraws": int(max_redraws),
        "num_samples": int(n),
        "data_hash": _data_hash(labels, domains if scheme == "domain" else None),
    }
    if dataset is not None:
        params["dataset"] = str(dataset)
    if rule != "plain":  # only then: manifests saved before rules existed keep their parameters and hash
        params["rule"] = rule
    return params


def _dirichlet(
    pool: np.ndarray, encoded: np.ndarray, num_clients: int, params: dict, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split the sample ids in `pool` with Dirichlet label skew, redrawing small clients."""
    pool_labels = encoded[pool]
    classes = np.unique(pool_labels)
    class_sizes = np.array([(pool_labels == c).sum() for c in classes])
    draw = _capped_counts if params.get("rule") == "capped" else _plain_counts
    for _ in range(params["max_redraws"] + 1):
        counts = draw(class_sizes, num_clients, params["alpha"], rng)
        if counts.sum(axis=0).min() >= params["min_samples"]:
            break
    else:
        smallest = int(counts.sum(axis=0).min())
        raise UserError(
            f"no Dirichlet draw in {params['max_redraws'] + 1} gave every client >= min_samples="
            f"{params['min_samples']} samples (alpha={params['alpha']}, num_clients={num_clients}, "
            f"{len(pool)} samples, smallest client {smallest}); raise alpha, use fewer clients or lower min_samples"
        )
    clients: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, row in zip(classes, counts):
        members = rng.permutation(pool[pool_labels == c])
        for client, part in enumerate(np.split(members, np.cumsum(row)[:-1])):
            clients[client].append(part)
    return [np.concatenate(parts) for parts in clients]


def _plain_counts(class_sizes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Every class's shares over the clients ~ Dir(alpha), independently."""
    shares = rng.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))
    return _counts_from_shares(shares, class_sizes)


def _capped_counts(class_sizes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """The public FedPerfix code's rule: classes are dealt in order, each by Dir(alpha) shares, but a
    client that already holds N / num_clients samples gets no share of the classes still to come.
    It keeps client sizes far more even than the plain rule (see the partition figures in docs/datasets.md)."""
    cap = class_sizes.sum() / num_clients
    held = np.zeros(num_clients, dtype=np.int64)
    rows = []
    for size in class_sizes:
        open_ = held < cap  # someone is always under the cap while samples are left to deal
        shares = rng.dirichlet(np.full(num_clients, alpha)) * open_
        if not shares.sum() > 0:  # a tiny alpha can put all the mass on capped clients
            shares = open_.astype(float)
        row = _counts_from_shares((shares / shares.sum())[None, :], np.array([size]))[0]
        held += row
        rows.append(row)
    return np.stack(rows)


def _counts_from_shares(shares: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """Integer counts (classes x clients) whose rows sum to the class sizes, cut by the shares."""
    cuts = np.floor(np.cumsum(shares, axis=1) * class_sizes[:, None]).astype(np.int64)
    cuts = np.minimum(cuts, class_sizes[:, None])
    cuts[:, -1] = class_sizes
    return np.diff(cuts, axis=1, prepend=0)


def _pathological(encoded: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client gets k distinct classes; each class is cut into one shard per client holding it."""
    num_classes = int(encoded.max()) + 1
    class_order = rng.permutation(num_classes)
    # k consecutive positions of a cycle through all classes are distinct whenever k <= classes,
    # and the cycle spreads the classes over the clients as evenly as possible.
    holdings = [class_order[(c * k + np.arange(k)) % num_classes] for c in rng.permutation(num_clients)]
    holders: dict[int, list[int]] = {}
    for client, held in enumerate(holdings):
        for cls in held:
            holders.setdefault(int(cls), []).append(client)
    clients: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in sorted(holders):
        members = rng.permutation(np.flatnonzero(encoded == cls))
        if len(members) < len(holders[cls]):
            raise UserError(
                f"a class with {len(members)} samples cannot be shared by {len(holders[cls])} clients; "
                "use fewer clients or a smaller classes_per_client"
            )
        for client, shard in zip(holders[cls], np.array_split(members, len(holders[cls]))):
            clients[client].append(shard)
    return [np.concatenate(parts) for parts in clients]


def _domain(
    encoded: np.ndarray, domain_ids: np.ndarray, num_clients: int, params: dict, rng: np.random.Generator
) -> list[np.ndarray]:
    """Consecutive blocks of clients per domain (as even as possible), Dirichlet skew inside each."""
    num_domains = int(domain_ids.max()) + 1
    clients: list[np.ndarray] = []
    for domain, block in enumerate(np.array_split(np.arange(num_clients), num_domains)):
        pool = np.flatnonzero(domain_ids == domain)
        if len(block) * params["min_samples"] > len(pool):
            raise UserError(
                f"a domain with {len(pool)} samples cannot give {len(block)} clients "
                f"min_samples={params['min_samples']} each; use fewer clients or lower min_samples"
            )
        clients.extend(_dirichlet(pool, encoded, len(block), params, rng))
    return clients


def _check_min_samples(clients: list[np.ndarray], params: dict) -> None:
    smallest = min(len(c) for c in clients)
    if smallest < params["min_samples"]:
        raise UserError(
            f"the {params['scheme']} partition gives a client only {smallest} samples "
            f"(min_samples={params['min_samples']}); use fewer clients or lower min_samples"
        )


def _split_client(
    idx: np.ndarray, encoded: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples into train/test, stratified by label (largest-remainder quotas)."""
    n = len(idx)
    if n < 2:
        return np.sort(idx).astype(np.int64), np.empty(0, dtype=np.int64)
    n_test = min(max(int(math.floor(n * test_fraction + 0.5)), 1), n - 1)
    shuffled = rng.permutation(idx)
    lab = encoded[shuffled]
    classes, sizes = np.unique(lab, return_counts=True)
    exact = sizes * n_test / n
    quota = np.floor(exact).astype(np.int64)
    leftover = n_test - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    order = np.argsort(lab, kind="stable")
    group = np.searchsorted(classes, lab[order])
    rank_in_class = np.arange(n) - np.asarray(np.searchsorted(lab[order], classes))[group]
    is_test = rank_in_class < quota[group]
    ordered = shuffled[order]
    return np.sort(ordered[~is_test]).astype(np.int64), np.sort(ordered[is_test]).astype(np.int64)


def _encode_by_first_appearance(values: np.ndarray) -> np.ndarray:
    """Renumber values 0.. in order of first appearance, so renaming label ids changes nothing."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank_of_value = np.argsort(np.argsort(first))
    return rank_of_value[inverse.reshape(-1)]


def _as_ints(values, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise UserError(f"{what} must be a 1-D array of integer ids, got shape {array.shape} dtype {array.dtype}")
    return array.astype(np.int64)


def _histogram(groups: list[np.ndarray], values: np.ndarray, width: int | None) -> np.ndarray:
    width = int(values.max()) + 1 if width is None else max(width, int(values.max()) + 1)
    return np.stack([np.bincount(values[g], minlength=width) for g in groups]) if groups else np.zeros((0, width), int)


def _data_hash(labels: np.ndarray, domains: np.ndarray | None) -> str:
    digest = hashlib.sha256(labels.astype("<i8").tobytes())
    if domains is not None:
        digest.update(b"domains" + domains.astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def _content_hash(params: dict, train: list[np.ndarray], test: list[np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for split in (train, test):
        for idx in split:
            digest.update(len(idx).to_bytes(8, "little") + np.asarray(idx, "<i8").tobytes())
    return digest.hexdigest()[:16]


# ---- the manifest on disk -----------------------------------------------------------------------


def manifest_path(path: str | Path) -> Path:
    """`path` itself when it names a .json file, else `path/partition.json`."""
    path = Path(path)
    return path if path.suffix == ".json" else path / "partition.json"


def save(partition: Partition, path: str | Path, *, labels, domains=None, classes=(), domain_names=()) -> Path:
    """Write the manifest (indices, parameters, seed, hash, histograms) and return its path."""
    labels = _as_ints(labels, "labels")
    if len(labels) != partition.params["num_samples"]:
        raise UserError(
            f"labels has {len(labels)} entries but the partition was made for "
            f"{partition.params['num_samples']} samples; pass the labels it was made from"
        )
    domain_hist = None
    if domains is not None:
        domain_hist = partition.domain_histogram(domains, num_domains=len(domain_names) or None).tolist()
    document = {
        "params": partition.params,
        "seed": partition.params["seed"],
        "hash": partition.hash,
        "train": [idx.tolist() for idx in partition.train],
        "test": [idx.tolist() for idx in partition.test],
        "label_histogram": partition.label_histogram(labels, num_classes=len(classes) or None).tolist(),
        "domain_histogram": domain_hist,
        "classes": list(classes),
        "domain_names": list(domain_names),
    }
    target = manifest_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a crash mid-write never leaves a half-written manifest
    runio.replace_atomically(target, lambda tmp: tmp.write_text(json.dumps(document, separators=(",", ":"))))
    return target


def load(path: str | Path) -> Partition:
    """Read a manifest written by `save`; a UserError if it is missing, malformed or edited."""
    target = manifest_path(path)
    if not target.is_file():
        raise UserError(f"no partition manifest at {target}; make one with `fedsens data split --out {target.parent}`")
    try:
        document = json.loads(target.read_text())
        params = dict(document["params"])
        train = [np.asarray(idx, dtype=np.int64) for idx in document["train"]]
        test = [np.asarray(idx, dtype=np.int64) for idx in document["test"]]
        stored_hash = str(document["hash"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{target} is not a partition manifest ({err}); delete it to make a new one") from None
    if _content_hash(params, train, test) != stored_hash:
        raise UserError(f"{target} was edited (its hash {stored_hash} no longer matches); delete it to make a new one")
    return Partition(params=params, train=train, test=test, hash=stored_hash)


def load_or_make(path: str | Path, labels, domains=None, *, classes=(), domain_names=(), **make_kwargs) -> Partition:
    """The saved partition at `path` when its parameters match `make_kwargs`, else a new, saved one."""
    labels = _as_ints(labels, "labels")
    domains = None if domains is None else _as_ints(domains, "domains")
    wanted = _resolve_params(labels, domains, **_with_make_defaults(labels, domains, make_kwargs))
    target = manifest_path(path)
    if target.is_file():
        saved = load(target)
        if saved.params == wanted:
            return saved
    partition = make(labels, domains, **make_kwargs)
    save(partition, target, labels=labels, domains=domains, classes=classes, domain_names=domain_names)
    return partition


def _with_make_defaults(labels: np.ndarray, domains: np.ndarray | None, make_kwargs: dict) -> dict:
    """make's keyword arguments with its defaults filled in (a TypeError for unknown ones)."""
    bound = inspect.signature(make).bind(labels, domains, **make_kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in ("labels", "domains")}


# ---- a readable per-client view -----------------------------------------------------------------


def summary_table(partition: Partition, labels, domains=None, domain_names=()) -> pd.DataFrame:
    """One row per client: client, train, test, classes (present), dominant_share, [domain]."""
    hist = partition.label_histogram(labels)
    totals = hist.sum(axis=1)
    table = pd.DataFrame(
        {
            "client": np.arange(partition.num_clients),
            "train": [len(idx) for idx in partition.train],
            "test": [len(idx) for idx in partition.test],
            "classes": (hist > 0).sum(axis=1),
            "dominant_share": np.round(hist.max(axis=1) / np.maximum(totals, 1), 3),
        }
    )
    if domains is not None:
        most_common = partition.domain_histogram(domains).argmax(axis=1)
        table["domain"] = [domain_names[d] if d < len(domain_names) else str(d) for d in most_common]
    return table
