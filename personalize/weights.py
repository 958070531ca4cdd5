"""Pretrained weights through timm's own loading, offline: a local file (`--weights FILE`) or timm's
weights for the model name from the local Hugging Face cache (`--pretrained`).

Either way the model is made by `timm.create_model(name, pretrained=True)` with the file laid over the
model's pretrained configuration (`pretrained_cfg_overlay=dict(file=...)`), so timm's checkpoint filter
runs: position embeddings resampled to the input size, the first convolution adapted to the channel
count, the classifier dropped when the class count differs (it then keeps its seeded init). Nothing
here reaches the network: the cache is only looked up (`try_to_load_from_cache`), and the load runs
with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsens.personalize.errors import UserError

HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_file(name: str) -> Path:
    """The cached weights of timm model `name` (its default or given pretrained tag), or one line saying
    where they were looked for and how to fill the cache."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise UserError(f"timm has no pretrained weights for {name!r}; train it from scratch or pass --weights FILE")
    hub_id = cfg.hf_hub_id
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILENAMES
        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename, cache_dir=_hub_cache())
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if isinstance(cfg.url, str) and cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return cached
    where = f"the Hugging Face cache {_hub_cache()} (repo {hub_id})" if hub_id else f"{torch.hub.get_dir()}/checkpoints"
    raise UserError(
        f"--pretrained: no cached weights for {name} in {where}; fill it on a machine with network "
        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), copy the cache here or set "
        "HF_HOME to it, or pass --weights FILE"
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors (safetensors, or a torch state dict, possibly under 'state_dict' / 'model')."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is one line about this file
        raise UserError(f"cannot read weights file {path} ({' '.join(str(err).split())[:200]})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} holds no state dict (name -> tensor); save model.state_dict()")
    return state


def _file_classes(state: dict[str, torch.Tensor], classifiers: tuple[str, ...]) -> int | None:
    for classifier in classifiers:
        weight = state.get(f"{classifier}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _first_mismatch(message: str) -> str:
    found = re.search(r'(?:size mismatch for |key\(s\) in state_dict: ")([\w.]+)', message)
    return found.group(1) if found else " ".join(message.split())[:200]


class _KeyReport(logging.Handler):
    """Collects the keys timm reports missing or unexpected when it loads non-strictly (classifier dropped)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"(Missing|Unexpected) keys \(([^)]*)\)", record.getMessage())
        if found:
            keys = [key.strip() for key in found.group(2).split(",") if key.strip()]
            (self.missing if found.group(1) == "Missing" else self.unexpected).extend(keys)


@contextlib.contextmanager
def _key_report() -> Iterator[_KeyReport]:
    logger = logging.getLogger("timm.models._builder")
    report, level = _KeyReport(), logger.level
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)


def create_from_file(timm_name: str, path: Path, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """`timm.create_model(timm_name, pretrained=True, ...)` with weights from `path` through timm's loading."""
    import timm
    from timm.models import get_pretrained_cfg

    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; give the path of a .safetensors or torch state dict")
    cfg = get_pretrained_cfg(timm_name)
    classifier = cfg.classifier if cfg is not None else "head"
    classifiers = tuple(classifier) if isinstance(classifier, (list, tuple)) else (classifier or "head",)
    state = _read_state(path)
    overlay: dict[str, Any] = {"file": str(path), "custom_load": path.suffix == ".npz"}
    if path.suffix != ".npz":
        overlay["num_classes"] = _file_classes(state, classifiers) or 0  # timm drops the head when it differs
    fix = "give weights of this architecture (and the same --model-arg values)"
    try:
        with _offline(), _key_report() as report:
            model = timm.create_model(
                timm_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
            )
    except RuntimeError as err:
        raise UserError(
            f"weights file {path} does not fit {timm_name} with these options: first mismatching tensor "
            f"{_first_mismatch(str(err))}; {fix}"
        ) from None
    dropped = {f"{classifier}.{leaf}" for classifier in classifiers for leaf in ("weight", "bias")}
    wrong = [key for key in report.missing if key not in dropped] + report.unexpected
    if wrong:
        raise UserError(f"weights file {path} does not fit {timm_name}: first mismatching tensor {wrong[0]}; {fix}")
    return model
