"""What `fedsens models` shows: the supported families with example names, and one model's part manifest
(parameters and bytes per part and per block) built without training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from fedsens.personalize import families
from fedsens.personalize import model as model_lib
from fedsens.personalize import model_args as model_args_lib


def family_table() -> pd.DataFrame:
    """One row per family: name, what it is, timm's model modules, example names, how its parts are placed."""
    rows = [
        {
            "family": family.name,
            "title": family.title,
            "timm_modules": ", ".join(family.timm_modules),
            "examples": ", ".join(family.examples),
            "tiny": model_args_lib.text(family.tiny),
            "notes": family.notes,
        }
        for family in families.all_families()
    ]
    return pd.DataFrame(rows)


def families_text() -> str:
    lines = ["Model families (--model NAME; any timm name of these modules, pretrained tag optional):"]
    for row in family_table().itertuples():
        lines += [
            f"  {row.family}: {row.title}",
            f"      e.g. {row.examples}",
            f"      timm modules: {row.timm_modules}; parts: {row.notes}",
            f"      tiny CPU variant: --model {row.examples.split(', ')[0]} "
            + " ".join(f"--model-arg {item}" for item in row.tiny.split()),
        ]
    lines.append(
        f"Presets: {', '.join(model_lib.MODEL_SHAPES)}. One model's parts: fedsens models NAME [--model-arg ...]"
    )
    return "\n".join(lines)


def build_for_manifest(name: str, model_args: Mapping[str, Any] | None, classes: int) -> tuple[Any, Any]:
    spec = model_lib.input_spec(name, data_channels=3, data_size=32, model_args=model_args)
    model = model_lib.build(
        name, classes, spec.in_chans, spec.img_size, patch_size=spec.patch_size or None, model_args=model_args
    )
    return model, spec


def part_totals(table: pd.DataFrame) -> pd.DataFrame:
    totals = table.groupby("part", sort=False).agg(tensors=("param", "size"), params=("numel", "sum"))
    totals["bytes"] = table.groupby("part", sort=False)["bytes"].sum()
    totals["share"] = (totals["params"] / totals["params"].sum()).round(4)
    return totals.reset_index()


def block_totals(table: pd.DataFrame) -> pd.DataFrame:
    """Parameters per block (rows, -1 = outside the blocks) and part (columns), with the stage where there is one."""
    index = ["block", "stage"] if "stage" in table.columns else ["block"]
    grid = table.pivot_table(index=index, columns="part", values="numel", aggfunc="sum", fill_value=0)
    grid["bytes"] = table.groupby(index)["bytes"].sum()
    return grid.reset_index()


def manifest_text(name: str, model_args: Mapping[str, Any] | None = None, classes: int = 10) -> str:
    model, spec = build_for_manifest(name, model_args, classes)
    table = model_lib.parts(model)
    family = families.of(model)
    norm = f"mean {spec.mean}, std {spec.std}" if spec.mean is not None else "mean 0.5, std 0.5"
    args = model_args_lib.text(model_args)
    lines = [
        f"{name}{' ' + args if args else ''}: family {family.name} ({type(model).__name__}), "
        f"{int(table['numel'].sum()):,} parameters ({int(table['bytes'].sum()) / 1e6:.2f} MB), "
        f"{len(family.blocks(model))} blocks, {classes} classes",
        f"input: {spec.in_chans}x{spec.img_size}x{spec.img_size}, {spec.interpolation}, {norm}",
        "",
        "per part:",
        part_totals(table).to_string(index=False),
        "",
        "per block (-1: outside the blocks):",
        block_totals(table).to_string(index=False),
    ]
    return "\n".join(lines)
