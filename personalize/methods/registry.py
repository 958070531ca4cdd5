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
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fedsens.personalize.errors import UserError

if TYPE_CHECKING:
    from fedsens.personalize.methods.base import Method

METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


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
    hints = typing.get_type_hints(cls.Options)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls.Options)}


def type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args and len(args) < len(typing.get_args(kind)):
        return f"{type_name(args[0])} or none"
    return getattr(kind, "__name__", str(kind))


def _coerce(kind: Any, value: Any) -> Any:
    """`value` as `kind` (int, float, bool, str or Optional of one); strings are parsed. ValueError if not."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return _coerce(next(a for a in args if a is not type(None)), value)
    if kind is str:
        if isinstance(value, str):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    raise ValueError(value)


def valid_keys(cls: type[Method]) -> str:
    fields = option_fields(cls)
    if not fields:
        return "it takes no options"
    return "its options: " + ", ".join(f"{name} ({type_name(kind)})" for name, (_, kind) in fields.items())


def resolve_options(cls: type[Method], given: Mapping[str, Any]) -> Any:
    """The method's Options from a mapping (unknown keys and wrong types are one UserError line)."""
    fields = option_fields(cls)
    values = {}
    for key, value in given.items():
        if key not in fields:
            raise UserError(f"method {cls.name} has no option {key!r}; {valid_keys(cls)}")
        kind = fields[key][1]
        try:
            values[key] = _coerce(kind, value)
        except ValueError:
            raise UserError(
                f"option {key} of method {cls.name} must be {type_name(kind)} (got {value!r}); {valid_keys(cls)}"
            ) from None
    return cls.Options(**values)


def options_dict(options: Any) -> dict[str, Any]:
    """Options as the plain JSON-friendly mapping RunConfig keeps and config.json records."""
    return dataclasses.asdict(options)


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """['scale=0.5', 'local=blocks.11'] (repeated -o/--option) -> {'scale': '0.5', 'local': 'blocks.11'}."""
    parsed: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"-o {item!r} is not KEY=VALUE; write e.g. -o scale=0.5 (`fedsens methods` lists options)")
        if key in parsed:
            raise UserError(f"-o {key} is given twice; give each option once")
        parsed[key] = value.strip()
    return parsed
