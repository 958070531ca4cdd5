"""`--model-arg KEY=VALUE` -> timm constructor options, parsed without importing torch (CLI start-up).

Values read as Python literals of the kinds timm's constructors take: integers, floats, true/false,
none, comma lists (`depths=2,2,6,2` -> [2, 2, 6, 2]); anything else stays a string (`global_pool=map`).
Lists are kept as lists so that config.json reads back equal; `as_timm_kwargs` turns them into tuples.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from fedsens.personalize.errors import UserError

# Set by the run itself from the data and the method: never a --model-arg.
RESERVED = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def _scalar(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if re.fullmatch(r"[+-]?\d+", lowered):
        return int(lowered)
    try:
        return float(lowered)
    except ValueError:
        return text.strip()


def parse_value(text: str) -> Any:
    if "," in text:
        return [_scalar(piece) for piece in text.split(",") if piece.strip()]
    return _scalar(text)


def parse(items: Iterable[str] | None) -> dict[str, Any]:
    """['depth=2', 'depths=2,2'] -> {'depth': 2, 'depths': [2, 2]}; one clear line for a bad item."""
    parsed: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise UserError(f"--model-arg {item!r} is not KEY=VALUE; write e.g. --model-arg depth=4")
        if key in parsed:
            raise UserError(f"--model-arg {key} is given twice; give each option once")
        if key in RESERVED:
            raise UserError(f"--model-arg {key} is set by fedsens itself (data, --weights, --pretrained); drop it")
        parsed[key] = parse_value(value)
    return parsed


def check(args: Mapping[str, Any]) -> dict[str, Any]:
    """A model-args mapping given to RunConfig directly: string keys, JSON-ready values, no reserved key."""
    checked: dict[str, Any] = {}
    for key, value in dict(args).items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise UserError(f"model argument {key!r} is not a keyword name")
        if key in RESERVED:
            raise UserError(f"model argument {key} is set by fedsens itself; drop it")
        checked[key] = list(value) if isinstance(value, tuple) else value
    return checked


def as_timm_kwargs(args: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in dict(args or {}).items()}


def text(args: Mapping[str, Any] | None) -> str:
    """{'depth': 2, 'depths': [2, 2]} -> 'depth=2 depths=2,2' (how the protocol block shows them)."""

    def shown(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        return str(value).lower() if isinstance(value, bool) or value is None else str(value)

    return " ".join(f"{key}={shown(value)}" for key, value in dict(args or {}).items())
