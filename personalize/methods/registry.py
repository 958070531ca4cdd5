"""The method registry: each method is a class registered under its name with `@register_method`.

A method class declares its `Options` (a frozen dataclass: defaults, one line of help per field in
`field(metadata={"help": ...})`), the `paper` it comes from, the parts it keeps local, and its row
in the paper's main table (`paper_row`, None for methods outside it). `RunConfig.method_options` is
a plain mapping; `resolve_options` turns it into the method's `Options`, parsing strings (as the
command line gives them) into each field's type, and names the valid keys when one is wrong.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fedsens.personalize import options as options_lib
from fedsens.personalize.errors import UserError
from fedsens.personalize.options import parse_assignments as parse_assignments  # re-exported: -o's parser
from fedsens.personalize.options import type_name as type_name  # re-exported: `fedsens methods` shows it

if TYPE_CHECKING:
    from fedsens.personalize.methods.base import Method

METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


def register_method(cls: M) -> M:
    """Class decorator: make `cls` available under `cls.name` (to RunConfig, the CLI, `fedsens methods`)."""
    name = getattr(cls, "name", "")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"method name {name!r} must be lowercase letters, digits and dashes")
    params = getattr(cls.Options, "__dataclass_params__", None)  # set on every dataclass
    if not dataclasses.is_dataclass(cls.Options) or params is None or not params.frozen:
        raise ValueError(f"{cls.__qualname__}.Options must be a frozen dataclass")
    registered = METHODS.get(name)
    if registered is not None and registered is not cls:
        raise ValueError(f"method {name!r} is already registered by {registered.__module__}.{registered.__qualname__}")
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(names())} (`fedsens methods` lists them)")
    return METHODS[name]


def names() -> list[str]:
    """Every method name: the paper's table in row order, then the others as registered."""
    return [*paper_methods(), *(name for name, cls in METHODS.items() if cls.paper_row is None)]


def paper_labels() -> dict[str, str]:
    """Each method -> the paper's table row it reproduces (its `paper_label`), for the methods that say."""
    return {name: cls.paper_label for name, cls in METHODS.items() if cls.paper_label}


def paper_methods() -> tuple[str, ...]:
    """The methods of the paper's main table, in its row order."""
    rows = sorted((cls.paper_row, name) for name, cls in METHODS.items() if cls.paper_row is not None)
    return tuple(name for _, name in rows)


def option_fields(cls: type[Method]) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type) of a method's options, in declaration order."""
    return options_lib.fields_of(cls.Options)


def valid_keys(cls: type[Method]) -> str:
    return options_lib.valid_keys(cls.Options)


def resolve_options(cls: type[Method], given: Mapping[str, Any]) -> Any:
    """The method's Options from a mapping (unknown keys and wrong types are one UserError line)."""
    return options_lib.resolve(cls.Options, given, owner=f"method {cls.name}")


def options_dict(options: Any) -> dict[str, Any]:
    """Options as the plain JSON-friendly mapping RunConfig keeps and config.json records."""
    return dataclasses.asdict(options)
