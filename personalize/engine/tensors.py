"""A model's tensors by name: what a client's state, a checkpoint and a message are made of."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent floating buffer by name: what a client state is made of."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    named.update({n: b for n, b in model.named_buffers() if n not in named})
    return named


def split_names(model: nn.Module, local_params: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(local, shared) tensor names: the spec's parameters plus the buffers of modules that own a local
    parameter are local; everything else is shared."""
    wanted = set(local_params)
    owners = {name.rsplit(".", 1)[0] for name in wanted}
    params = {name for name, _ in model.named_parameters()}
    local: list[str] = []
    shared: list[str] = []
    for name in named_tensors(model):
        is_local = name in wanted or (name not in params and name.rsplit(".", 1)[0] in owners)
        (local if is_local else shared).append(name)
    return tuple(local), tuple(shared)


def snapshot(named: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the named tensors (`named`: the run's name -> tensor map, built once)."""
    return {n: named[n].detach().clone() for n in names}


@torch.no_grad()
def assign(named: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    """Load `values` into the model's tensors of the same names, in place."""
    for name, value in values.items():
        named[name].copy_(value)


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
