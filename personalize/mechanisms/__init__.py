"""How a part stays on the client: one module per mechanism, each turning a resolved part spec into the
tensors a client keeps (`full`, `lora`, `lora-b`, `bias`, `adapter`, `prompt`, `prompt-deep`, `finetune`).

`install(model, spec, seed=..., backbone=...)` parses the spec (`spec`: `TERM[:MECHANISM[:KEY=VALUE]...]`),
lets each term's mechanism add its modules beside the model's own (no existing parameter is renamed) and
returns a `Placement`: the parameters kept local, those added, those fine-tuned before evaluation. A spec of
plain terms resolves exactly as `personalize.model.resolve` always did and changes nothing in the model.
`backbone="freeze"` leaves trainable only the added, the local and the fine-tuned tensors and the classifier
head (a frozen, randomly initialised head could not learn the clients' classes).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch
from torch import nn

from fedsens.personalize import model as model_lib
from fedsens.personalize.errors import UserError
from fedsens.personalize.mechanisms.registry import MECHANISMS, Mechanism, Placed, build, mechanism_class, names
from fedsens.personalize.mechanisms.spec import FULL, Term, is_plain, mechanism_of, parse, parts_of

for _module in pkgutil.iter_modules(__path__):  # every mechanism module registers itself on import
    importlib.import_module(f"{__name__}.{_module.name}")

BACKBONES = ("train", "freeze")

__all__ = [
    "BACKBONES",
    "FULL",
    "MECHANISMS",
    "Mechanism",
    "Placed",
    "Placement",
    "Term",
    "check",
    "install",
    "is_plain",
    "mechanism_class",
    "mechanism_of",
    "names",
    "parse",
    "parts_of",
]


@dataclass(frozen=True)
class Placement:
    """What a spec's mechanisms did to a model."""

    local: tuple[str, ...] = ()  # parameters each client keeps
    added: tuple[str, ...] = ()  # parameters the mechanisms created
    adapt: tuple[str, ...] = ()  # parameters each client fine-tunes before it is evaluated
    adapt_steps: int = 0


def check(spec: str) -> None:
    """The spec's grammar, mechanism names and options (no model needed): one clear line when bad."""
    for term in parse(spec):
        build(term.mechanism, dict(term.options))


def _groups(terms: list[Term]) -> list[tuple[Term, list[str]]]:
    """Terms with the same mechanism and options together (one adapter install for attn@0 and attn@3), in
    the order of their first term; each with its part terms."""
    groups: dict[tuple, tuple[Term, list[str]]] = {}
    for term in terms:
        key = (term.mechanism, term.options)
        groups.setdefault(key, (term, []))[1].append(term.part)
    return list(groups.values())


def install(model: nn.Module, spec: str, *, seed: int = 0, backbone: str = "train") -> Placement:
    """Apply `spec`'s mechanisms to `model` in place; its new tensors are initialised from `seed`."""
    if backbone not in BACKBONES:
        raise UserError(f"--backbone must be train or freeze (got {backbone!r})")
    if is_plain(spec):  # resolved as it always was: the same errors, nothing added
        placement = Placement(local=tuple(model_lib.resolve(model, spec)))
    else:
        placement = _install_terms(model, parse(spec), seed)
    if backbone == "freeze":
        _freeze_backbone(model, placement)
    return placement


def _install_terms(model: nn.Module, terms: list[Term], seed: int) -> Placement:
    if any(term.part == "none" for term in terms):
        raise UserError("a part spec with mechanisms cannot hold 'none'; write 'none' alone for FedAvg")
    table = model_lib.parts(model)  # before anything is added: terms select the model's own parameters
    generator = torch.Generator().manual_seed(seed)
    local: list[str] = []
    added: list[str] = []
    adapt: list[str] = []
    steps = 0
    for first, parts in _groups(terms):
        mechanism = build(first.mechanism, dict(first.options))
        chosen = set(model_lib.resolve(model, ",".join(parts)))
        placed = mechanism.install(model, table[table["param"].isin(chosen)], generator)
        local += placed.local
        added += placed.added
        adapt += placed.adapt
        steps = max(steps, placed.adapt_steps)
    return Placement(tuple(dict.fromkeys(local)), tuple(added), tuple(dict.fromkeys(adapt)), steps)


def _freeze_backbone(model: nn.Module, placement: Placement) -> None:
    table = model_lib.parts(model)
    head = set(table.loc[table["part"] == "head", "param"])
    trainable = {*placement.local, *placement.added, *placement.adapt, *head}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
