"""Check a batch of run configurations before any of them trains.

A grid (sweep, comparison) catches a run's failure and goes on, which is right for a NaN loss in one
cell and wrong for bad input: an unknown dataset, missing files, a partition that cannot be drawn or a
part spec that matches nothing would fail every cell the same way. `check` raises the first such
problem as one UserError, having trained nothing and written nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedsens.personalize import partition as partition_lib
from fedsens.personalize.config import RunConfig
from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.engine.context import build_model, load_dataset, partition_options, resolve_device
from fedsens.personalize.errors import UserError
from fedsens.personalize.methods import get_method


def check(configs: Iterable[RunConfig]) -> None:
    """Load each dataset once, draw each partition once, resolve each method's local parts once."""
    datasets: dict[tuple, ImageSet] = {}
    partitions: set[tuple] = set()
    manifests: set[tuple] = set()
    for config in configs:
        resolve_device(config.device)  # --device tpu is bad input, not a failed cell
        key = (config.dataset, config.data_root, config.model, str(config.model_args), config.verify)
        if key not in datasets:
            datasets[key] = load_dataset(config)  # as the run will load it (size, --no-verify)
        dataset = datasets[key]
        _check_partition(config, dataset, partitions)
        method = get_method(config)
        spec = method.local_spec()
        built = (config.model, str(config.model_args), config.weights, config.pretrained)
        if (*built, config.dataset, config.method, spec) in manifests:
            continue
        manifests.add((*built, config.dataset, config.method, spec))
        model, _ = build_model(config, dataset)  # the run's own model, patch size included
        method.prepare_model(model)
        method.place(model)  # resolves the spec and installs its mechanisms, as the run will


def _check_partition(config: RunConfig, dataset: ImageSet, seen: set[tuple]) -> None:
    if config.scheme.endswith(".json"):
        partition_lib.load(config.scheme)
        return
    key = (
        *(config.dataset, config.scheme, config.alpha, config.clients, config.seed, config.partition_rule),
        *(config.min_samples, config.test_fraction, config.classes_per_client),
    )
    if key in seen:
        return
    seen.add(key)
    part = partition_lib.make(dataset.labels, dataset.domains, **partition_options(config))
    if part.num_clients != config.clients:  # pragma: no cover - make always gives num_clients
        raise UserError(f"the partition has {part.num_clients} clients but --clients is {config.clients}")
