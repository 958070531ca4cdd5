"""Options owned by their owner: a frozen dataclass per method or dataset, filled from a plain mapping.

`resolve(Options, given, owner=...)` parses strings (as the command line gives them, `-o KEY=VALUE`,
`-d KEY=VALUE`) into each field's type and names the valid keys when one is wrong. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from fedsens.personalize.errors import UserError

TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def fields_of(options: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type) of an options dataclass, in declaration order."""
    hints = typing.get_type_hints(options)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(options)}


def type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args and len(args) < len(typing.get_args(kind)):
        return f"{type_name(args[0])} or none"
    return getattr(kind, "__name__", str(kind))


def coerce(kind: Any, value: Any) -> Any:
    """`value` as `kind` (int, float, bool, str or Optional of one); strings are parsed. ValueError if not."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return coerce(next(a for a in args if a is not type(None)), value)
    if kind is str:
        if isinstance(value, str):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return int(value)
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = float(value)
        if number is not None and math.isfinite(number):  # nan and inf would surface rounds later as a "divergence"
            return number
    raise ValueError(value)


def _non_finite(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def valid_keys(options: type) -> str:
    fields = fields_of(options)
    if not fields:
        return "it takes no options"
    return "its options: " + ", ".join(f"{name} ({type_name(kind)})" for name, (_, kind) in fields.items())


def resolve(options: type, given: Mapping[str, Any], *, owner: str) -> Any:
    """`options` filled from `given` (unknown keys and wrong types are one UserError line naming `owner`)."""
    fields = fields_of(options)
    values = {}
    for key, value in given.items():
        if key not in fields:
            raise UserError(f"{owner} has no option {key!r}; {valid_keys(options)}")
        kind = fields[key][1]
        try:
            values[key] = coerce(kind, value)
        except ValueError:
            raise UserError(
                f"option {key} of {owner} must be {'a finite number' if _non_finite(value) else type_name(kind)} "
                f"(got {value!r}); {valid_keys(options)}"
            ) from None
    return options(**values)


def parse_assignments(
    items: list[str] | None, *, flag: str = "-o", example: str = "scale=0.5", lister: str = "fedsens methods"
) -> dict[str, str]:
    """['scale=0.5', 'local=blocks.11'] (a repeated -o or -d) -> {'scale': '0.5', 'local': 'blocks.11'}; `flag`,
    `example` and `lister` say which option its errors are about."""
    parsed: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} {example} (`{lister}` lists options)")
        if key in parsed:
            raise UserError(f"{flag} {key} is given twice; give each option once")
        parsed[key] = value.strip()
    return parsed
