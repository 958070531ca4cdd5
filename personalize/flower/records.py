"""What crosses Flower's boundary: tensors as ArrayRecords, a RunConfig as Flower's flat run config."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError

# Run-config keys that are not RunConfig fields: how the apps run rather than what they compute.
ENGINE_KEYS = {"torch-threads": 1, "reply-timeout": 600.0, "quiet": True}
MAPPING_FIELDS = ("method_options", "data_options", "model_args")  # RunConfig fields that travel as JSON strings
# A train reply's metric when local training hit a non-finite loss (the reply then carries no tensors).
NONFINITE_KEY = "nonfinite-loss"


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Name-keyed tensors as an ArrayRecord (the names travel with the arrays, so order never matters)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        record[name] = Array.from_torch_tensor(tensor)
    return record


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    # clone: np.load's buffer is not ours to keep, and methods update their state in place
    return {name: torch.from_numpy(array.numpy()).to(device).clone() for name, array in record.items()}


def run_config_of(config: RunConfig, **engine: Any) -> dict[str, bool | int | float | str]:
    """A RunConfig as Flower's run config: one key per field that is set (Flower has no None)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    for name in MAPPING_FIELDS:  # Flower's values are scalars
        values[name] = json.dumps(dict(getattr(config, name)))
    return {**values, **{k: v for k, v in ENGINE_KEYS.items() if k not in engine}, **engine}


def config_of(run_config: Mapping[str, Any]) -> RunConfig:
    """The RunConfig a Flower run config describes (engine keys are left out)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(k for k in run_config if k not in fields and k not in ENGINE_KEYS)
    if unknown:
        raise UserError(f"the Flower run config has unknown keys {unknown}; use RunConfig field names")
    values: dict[str, Any] = {}
    for name, value in run_config.items():
        if name not in fields:
            continue
        if name in MAPPING_FIELDS and isinstance(value, str):
            values[name] = json.loads(value)
            continue
        default = fields[name].default
        # TOML and --run-config give 1 for 1.0 and cannot say None: coerce to the field's type
        values[name] = float(value) if isinstance(default, float) and not isinstance(value, bool) else value
    return RunConfig(**values)


def engine_option(run_config: Mapping[str, Any], key: str) -> Any:
    return run_config.get(key, ENGINE_KEYS[key])


def number(record: MetricRecord, key: str) -> float:
    """One number of a metric record (a record also holds lists; fedsens sends none)."""
    value = record[key]
    if isinstance(value, list):
        raise TypeError(f"metric {key!r} is a list, not a number")
    return float(value)


def scalar(content: RecordDict, record: str, key: str) -> Any:
    """One value of a message's config or metric record (`record` names it)."""
    if record in content.config_records:
        return content.config_records[record][key]
    return content.metric_records[record][key]
