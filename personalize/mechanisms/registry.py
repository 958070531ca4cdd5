"""The mechanisms by name: each a small class that turns the parameters a term selects into what a client keeps.

A mechanism's `install(model, selected, generator)` may add modules beside the existing ones (their
parameters get new names; existing names never change, as the FedPerfix plugin is added) and returns a
`Placed`: the parameter names kept local, the names it added (local or federated), and the names each client
fine-tunes before it is evaluated. The engine sees only parameter names, so the client store, aggregation,
resume, batched evaluation and Flower need nothing per mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from fedsens.personalize import options as options_lib
from fedsens.personalize.errors import UserError


@dataclass(frozen=True)
class Placed:
    """What one mechanism did to the model for its terms."""

    local: tuple[str, ...] = ()  # parameters each client keeps
    added: tuple[str, ...] = ()  # parameters the mechanism created (local or federated)
    adapt: tuple[str, ...] = ()  # parameters each client fine-tunes before it is evaluated
    adapt_steps: int = 0


@dataclass(frozen=True)
class NoOptions:
    """The options of a mechanism that takes none."""


class Mechanism:
    """Base of the mechanisms: `name`, `summary`, `Options` (a frozen dataclass filled from the term's
    KEY=VALUE options) and `install`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any):
        self.options = options

    def install(self, model: nn.Module, selected: pd.DataFrame, generator: torch.Generator) -> Placed:
        """`selected`: the parts-table rows (`param, part, block, ...`) of the term's parameters."""
        raise NotImplementedError


MECHANISMS: dict[str, type[Mechanism]] = {}


def register(cls: type[Mechanism]) -> type[Mechanism]:
    MECHANISMS[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(MECHANISMS)


def mechanism_class(name: str) -> type[Mechanism]:
    if name not in MECHANISMS:
        raise UserError(f"unknown mechanism {name!r} in the part spec; choose one of {', '.join(MECHANISMS)}")
    return MECHANISMS[name]


def build(name: str, given: dict[str, str]) -> Mechanism:
    """The mechanism `name` with its options parsed (unknown keys and wrong types are one clear line)."""
    cls = mechanism_class(name)
    return cls(options_lib.resolve(cls.Options, given, owner=f"mechanism {name}"))


def linear_modules(model: nn.Module, selected: pd.DataFrame) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules whose weight the term selected, in model order."""
    modules = dict(model.named_modules())
    found = []
    for param in selected["param"]:
        path, _, leaf = str(param).rpartition(".")
        if leaf == "weight" and isinstance(modules.get(path), nn.Linear):
            found.append((path, modules[path]))
    return found


def refuse(mechanism: str, selected: pd.DataFrame, why: str) -> UserError:
    parts = ", ".join(dict.fromkeys(selected["part"].astype(str))) or "nothing"
    return UserError(f"mechanism {mechanism} cannot keep {parts} local: {why}")
