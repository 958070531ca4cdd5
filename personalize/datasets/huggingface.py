"""huggingface: a Hugging Face dataset saved with `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (the form in
which Flower users keep their data), read through `datasets.load_from_disk`.

Its columns are named by options: an image column (datasets' `Image` feature), a label column (a `ClassLabel`,
whose names become the classes, or plain integers or strings, numbered in sorted order) and, for
`--scheme domain`, a domain column (the same kinds). A DatasetDict's splits are merged, as the built-in datasets'
official splits are (partitions re-split per client), unless `split` names the ones to read. Images are decoded
with imagefolder's decoder (every PIL mode to 8-bit RGB, squashed to the run's size), once: the result is cached
in the saved folder (`DIR/.fedsens_cache_huggingface_<size>.pt`), rebuilt when the saved files or the options
change. The `datasets` package is an optional extra (`pip install 'fedsens[hf]'`), imported only when loading.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fedsens.personalize.datasets.imageset import (
    ImageSet,
    Undecoded,
    decode_images,
    decoded_once,
)
from fedsens.personalize.datasets.registry import DatasetSpec, one_line, register
from fedsens.personalize.errors import UserError

DEFAULT_SIZE = 64  # outside a run (`fedsens data split`); a run decodes at the model's input size
DECODE_BATCH = 256  # rows read from the arrow files at a time
INSTALL = "pip install 'fedsens[hf]'"


@dataclass(frozen=True)
class Options:
    """The loader's options (`--data-option KEY=VALUE`); the decoded size is the run's, as for imagefolder."""

    image_column: str = field(default="image", metadata={"help": "the column of images (datasets' Image feature)"})
    label_column: str = field(
        default="label", metadata={"help": "the column of labels (ClassLabel names become the classes)"}
    )
    domain_column: str = field(default="", metadata={"help": "the column of domains for --scheme domain (none: '')"})
    split: str = field(default="", metadata={"help": "a DatasetDict's split(s) to read, comma-separated ('': all)"})
    skip_bad_images: bool = field(
        default=False, metadata={"help": "leave undecodable images out (counted) instead of stopping"}
    )


def how_to_get(root: Path | str = "DIR", **_) -> str:
    return (
        f"save a datasets.Dataset or DatasetDict with .save_to_disk('{root}') (needs {INSTALL}) and name its "
        "columns with -d image_column=... -d label_column=... [-d domain_column=...]"
    )


def present(root: Path) -> bool:
    return (root / "state.json").is_file() or (root / "dataset_dict.json").is_file()


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise UserError(
            f"dataset huggingface reads folders written by the datasets package, which cannot be imported "
            f"({one_line(err)}); install it with {INSTALL} (or pip install datasets)"
        ) from None
    return datasets


def _splits(loaded: Any, root: Path, wanted: str, datasets: Any) -> dict[str, Any]:
    """Split name -> Dataset ('' for a Dataset saved alone); a DatasetDict's splits in saved order unless named."""
    if isinstance(loaded, datasets.Dataset):
        if wanted:
            raise UserError(f"{root} holds one dataset saved without splits; leave out -d split={wanted}")
        return {"": loaded}
    names = [name.strip() for name in wanted.split(",") if name.strip()] or list(loaded)
    missing = [name for name in names if name not in loaded]
    if missing:
        raise UserError(
            f"{root} has no split {missing[0]!r}; its splits: {', '.join(loaded)}; "
            "choose with -d split=NAME[,NAME] or leave it out to merge them all"
        )
    return {name: loaded[name] for name in names}


def _load_saved(root: Path, wanted: str) -> dict[str, Any]:
    datasets = _import_datasets()
    if not present(root):
        raise UserError(
            f"{root} is not a saved Hugging Face dataset (no state.json or dataset_dict.json); {how_to_get(root)}"
        )
    try:
        loaded = datasets.load_from_disk(str(root))
    except (OSError, ValueError, KeyError, TypeError) as err:  # pyarrow's errors derive from OSError/ValueError
        raise UserError(
            f"cannot read the saved dataset {root} ({one_line(err)}); save it again with save_to_disk"
        ) from None
    return _splits(loaded, root, wanted, datasets)


def _describe_columns(dataset: Any) -> str:
    return ", ".join(f"{name} ({type(feature).__name__})" for name, feature in dataset.features.items())


def _feature(splits: dict[str, Any], column: str, option: str, root: Path) -> Any:
    """The column's feature, the same in every split read; one line naming the columns when it is absent."""
    found = []
    for name, dataset in splits.items():
        if column not in dataset.features:
            where = f"{root}" + (f" (split {name})" if name else "")
            raise UserError(
                f"{where} has no column {column!r}; its columns: {_describe_columns(dataset)}; "
                f"name the right one with -d {option}=NAME"
            )
        found.append(dataset.features[column])
    if any(feature != found[0] for feature in found[1:]):
        raise UserError(f"column {column!r} differs between the splits of {root}; read one with -d split=NAME")
    return found[0]


def _ids_and_names(splits: dict[str, Any], column: str, option: str, root: Path) -> tuple[list[int], tuple[str, ...]]:
    """Every row's id (splits concatenated) and the names: a ClassLabel's own, else the sorted distinct values."""
    datasets = _import_datasets()
    feature = _feature(splits, column, option, root)
    per_split = {name: list(dataset[column]) for name, dataset in splits.items()}
    values = [value for split_values in per_split.values() for value in split_values]
    if isinstance(feature, datasets.ClassLabel):
        for name, split_values in per_split.items():  # -1 (or none) is datasets' "no label"
            row = next(
                (row for row, v in enumerate(split_values) if v is None or not 0 <= v < feature.num_classes), None
            )
            if row is not None:
                raise UserError(
                    f"{_where(root, name, row)} has {column} {split_values[row]}, not one of its ClassLabel's "
                    f"{feature.num_classes} names; drop such rows before save_to_disk"
                )
        return values, tuple(feature.names)
    kind = getattr(feature, "dtype", "")
    if not isinstance(feature, datasets.Value) or not (kind.startswith(("int", "uint")) or kind.endswith("string")):
        raise UserError(
            f"column {column!r} of {root} is {feature}, not labels (a ClassLabel, integers or strings); "
            f"name the right one with -d {option}=NAME"
        )
    if any(value is None for value in values):
        raise UserError(f"column {column!r} of {root} has empty values; drop those rows before save_to_disk")
    distinct = sorted(set(values))
    number = {value: index for index, value in enumerate(distinct)}
    return [number[value] for value in values], tuple(str(value) for value in distinct)


def _where(root: Path, split: str, row: int) -> str:
    return f"row {row} of {root}" + (f" (split {split})" if split else "")


def _undecoded(
    splits: dict[str, Any], column: str, labels: list[int], domains: list[int], root: Path
) -> Iterator[Undecoded]:
    """The image of every row, as the bytes (or the path) datasets stored, read a batch at a time."""
    datasets = _import_datasets()
    start = 0  # rows of the splits before this one: labels and domains run over all splits
    for name, dataset in splits.items():
        stored = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        row = 0
        for batch in stored.iter(batch_size=DECODE_BATCH):
            for image in batch[column]:
                kept = image or {}
                source = io.BytesIO(kept["bytes"]) if kept.get("bytes") else kept.get("path") or io.BytesIO(b"")
                yield Undecoded(source, _where(root, name, row), labels[start + row], domains[start + row])
                row += 1
        start += row


def _fingerprint(root: Path, splits: dict[str, Any], options: Options, size: int) -> str:
    """A hash of the options, the size and the saved files (their json in full, the arrow files' names and sizes)."""
    digest = hashlib.sha256(json.dumps({**asdict(options), "size": size}, sort_keys=True).encode())
    folders = [root, *(root / name for name in splits if name)]  # a DatasetDict keeps each split in its own folder
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".json":
                digest.update(f"{path.relative_to(root)}:".encode() + path.read_bytes())
            elif path.suffix == ".arrow":
                digest.update(f"{path.relative_to(root)}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def _check_images(splits: dict[str, Any], options: Options, root: Path) -> None:
    datasets = _import_datasets()
    feature = _feature(splits, options.image_column, "image_column", root)
    if not isinstance(feature, datasets.Image):
        raise UserError(
            f"column {options.image_column!r} of {root} is {feature}, not images (datasets' Image feature); "
            f"its columns: {_describe_columns(next(iter(splits.values())))}; name it with -d image_column=NAME"
        )


def _decode(root: Path, splits: dict[str, Any], options: Options, size: int, quiet: bool) -> dict:
    _check_images(splits, options, root)
    labels, classes = _ids_and_names(splits, options.label_column, "label_column", root)
    domains: list[int] = [0] * len(labels)
    domain_names: tuple[str, ...] = ()
    if options.domain_column:
        domains, domain_names = _ids_and_names(splits, options.domain_column, "domain_column", root)
    samples = _undecoded(splits, options.image_column, labels, domains, root)
    payload = decode_images(
        samples, len(labels), size, skip_bad_images=options.skip_bad_images, quiet=quiet, desc="saved dataset"
    )
    return {**payload, "classes": list(classes), "domain_names": list(domain_names)}


def load(
    root: Path | None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    domain_column: str = "",
    split: str = "",
    skip_bad_images: bool = False,
    size: int = DEFAULT_SIZE,
    quiet: bool = False,
) -> ImageSet:
    """The saved dataset under root, decoded at size x size (the run's input size in a run)."""
    options = Options(
        image_column=image_column,
        label_column=label_column,
        domain_column=domain_column,
        split=split,
        skip_bad_images=skip_bad_images,
    )
    if size < 1:
        raise UserError(f"huggingface size {size} must be a positive number of pixels")
    root = SPEC.require_root(root)
    splits = _load_saved(root, options.split)
    fingerprint = _fingerprint(root, splits, options, size)
    cache = root / f".fedsens_cache_huggingface_{size}.pt"
    decode = partial(_decode, root, splits, options, size, quiet)
    payload = decoded_once(cache, fingerprint, decode, name="huggingface", quiet=quiet)
    if not len(payload["labels"]):
        raise UserError(f"the saved dataset {root} holds no image that could be decoded; {how_to_get(root)}")
    has_domains = bool(options.domain_column)
    return ImageSet(
        "huggingface",
        payload["images"],
        payload["labels"],
        tuple(payload["classes"]),
        payload["domains"] if has_domains else None,
        tuple(payload["domain_names"]) if has_domains else (),
    )


SPEC = register(
    DatasetSpec(
        "huggingface",
        load,
        "a Hugging Face dataset saved with save_to_disk: image, label and optional domain columns (-d to name them)",
        needs_root=True,
        channels=3,
        how_to_get=how_to_get,
        present=present,
        decodes_at="size",
        Options=Options,
        reports_progress=True,
    )
)
