"""A run's context: its device, dataset, partition and model, built once (`build_context`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsens.personalize import datasets as dataset_lib
from fedsens.personalize import model as model_lib
from fedsens.personalize import partition as partition_lib
from fedsens.personalize import runio
from fedsens.personalize.client import RunContext
from fedsens.personalize.config import RunConfig
from fedsens.personalize.datasets.imageset import ImageSet
from fedsens.personalize.engine.tensors import named_tensors, split_names
from fedsens.personalize.errors import UserError
from fedsens.personalize.inputs import BatchPreparer
from fedsens.personalize.methods import Method


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but none is available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name} asks for a GPU this machine lacks; it has {torch.cuda.device_count()}")
    return device


def partition_options(config: RunConfig) -> dict[str, Any]:
    """The `partition.make` keywords a run's settings ask for (the run and the preflight draw the same)."""
    return dict(
        scheme=config.scheme,
        num_clients=config.clients,
        seed=config.seed,
        alpha=config.alpha,
        classes_per_client=config.classes_per_client,
        test_fraction=dataset_lib.test_fraction(config.dataset, config.test_fraction),
        min_samples=config.min_samples,
        rule=config.partition_rule,
    )


def load_partition(config: RunConfig, dataset: ImageSet, out: Path) -> partition_lib.Partition:
    """The run's partition: a given partition.json (copied into `out`), or drawn once and saved there."""
    target = out / "partition.json"
    if config.scheme.endswith(".json"):
        source = Path(config.scheme)
        if not source.is_file():
            raise UserError(f"partition file {source} does not exist; write one with `fedsens data split`")
        part = partition_lib.load(source)
        if source.resolve() != target.resolve():
            runio.write_text(target, source.read_text())
    else:
        part = partition_lib.load_or_make(
            target,
            dataset.labels,
            dataset.domains,
            **partition_options(config),
            dataset=config.dataset,
            classes=dataset.classes,
            domain_names=dataset.domain_names,
        )
    if part.num_clients != config.clients:
        raise UserError(f"the partition has {part.num_clients} clients but --clients is {config.clients}")
    return part


def load_dataset(config: RunConfig) -> ImageSet:
    """The run's dataset; one that decodes its images (Office-Home) decodes them at the model's input size."""
    spec = dataset_lib.get(config.dataset)
    input_size = None
    if spec.decodes_at is not None:
        # Without a fixed native size the images count as large: a small preset then caps its input at 32 px.
        native = spec.image_size or 1024
        input_size = model_lib.input_spec(
            config.model, data_channels=spec.channels or 3, data_size=native, model_args=config.model_args
        ).img_size
    return dataset_lib.load_for_run(
        config.dataset, config.data_root, options=config.data_options, input_size=input_size, verify=config.verify
    )


def build_model(config: RunConfig, dataset: ImageSet) -> tuple[nn.Module, model_lib.InputSpec]:
    """The run's model for this dataset (seeded, from its weights where given) and its input spec, before
    the method changes it: what the run trains and what the preflight checks."""
    spec = model_lib.input_spec(
        config.model, data_channels=dataset.channels, data_size=dataset.image_size, model_args=config.model_args
    )
    model = model_lib.build(
        config.model,
        dataset.num_classes,
        spec.in_chans,
        spec.img_size,
        patch_size=spec.patch_size,
        seed=config.seed,
        **model_lib.source_options(config),
    )
    return model, spec


def build_context(config: RunConfig, method: Method, out: Path) -> RunContext:
    """Everything a run builds once: device, data (on the device), partition, the model with the method's
    and the part spec's mechanisms' changes, the parts manifest and the local/shared split of the tensors."""
    device = resolve_device(config.device)
    dataset = load_dataset(config)
    part = load_partition(config, dataset, out)
    model, spec = build_model(config, dataset)
    with torch.random.fork_rng(devices=[]):  # plugins are initialised from the run's seed too
        torch.manual_seed(config.seed + 1)
        method.prepare_model(model)
        placement = method.place(model)  # the spec's mechanisms: what each client keeps
    model.to(device)
    table = model_lib.marked(model, placement.local)
    local, shared = split_names(model, list(placement.local))
    prepare = BatchPreparer(spec, config.augment_shift, config.augment_scale)
    return RunContext(
        config,
        model,
        device,
        dataset,
        part,
        table,
        prepare,
        dataset.images.to(device),
        dataset.labels.to(device),
        local,
        shared,
        out,
        named_tensors(model),
    )
