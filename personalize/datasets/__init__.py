"""Named datasets -> one in-memory ImageSet: uint8 images (N x C x H x W), int64 labels, domains.

One module per dataset (digits, synthetic, cifar100, organamnist, officehome), each registering a
DatasetSpec; `registry` knows them all without importing torch. Real datasets go through the
ecosystem's own readers, official splits merged: partitions re-split per client.
"""

from fedsens.personalize.datasets.registry import (
    DEFAULT_TEST_FRACTION,
    DatasetSpec,
    dataset_defaults,
    get,
    is_present,
    load,
    load_for_run,
    names,
    register,
    test_fraction,
    unregister,
)

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "DatasetSpec",
    "dataset_defaults",
    "get",
    "is_present",
    "load",
    "load_for_run",
    "names",
    "register",
    "test_fraction",
    "unregister",
]
