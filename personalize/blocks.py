"""The one grammar of block ranges, written after `@` in a part spec (`attn@9-11`) and in FedPerfix's
`blocks` option: a block `3`, a range `9-11`, a list `0,9-11`, or `all` (0-based, as in `blocks.K`).

`parse_blocks` checks the grammar alone (an option can be checked before any model exists);
`resolve_blocks` also checks the blocks against the model's depth, naming those that do not exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fedsens.personalize.errors import UserError

GRAMMAR = "write a block like 3, a range like 9-11, a list like 0,9-11, or all"
_TERM = re.compile(r"(\d+)(?:-(\d+))?")


def parse_blocks(text: str, *, what: str) -> tuple[int, ...] | None:
    """The blocks `text` names, sorted and once each; None for `all`. `what` names the text in errors."""
    if text.strip() == "all":
        return None
    chosen: set[int] = set()
    for term in (t.strip() for t in text.split(",")):
        match = _TERM.fullmatch(term)
        if not match:
            raise UserError(f"{what}: bad block range {term!r}; {GRAMMAR}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise UserError(f"{what}: block range {term!r} runs backwards; write the low block first")
        chosen.update(range(low, high + 1))
    return tuple(sorted(chosen))


def spans(blocks: Iterable[int]) -> str:
    """Sorted block numbers as runs: 2-99, or 3, 5-6."""
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ", ".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in runs)


def resolve_blocks(text: str, depth: int, *, what: str) -> list[int]:
    """The blocks `text` names in a model of `depth` blocks (`all`: every block); every one must exist."""
    blocks = parse_blocks(text, what=what)
    if blocks is None:
        return list(range(depth))
    missing = [b for b in blocks if b >= depth]
    if missing:
        noun = "block" if len(missing) == 1 else "blocks"
        verb = "does" if len(missing) == 1 else "do"
        has = f"blocks 0-{depth - 1}" if depth > 1 else "block 0" if depth == 1 else "no blocks"
        raise UserError(f"{what}: {noun} {spans(missing)} {verb} not exist; the model has {has}")
    return list(blocks)
