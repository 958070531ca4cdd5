"""From a finished sweep's ranking to where FedPerfix puts its adapters and what else it keeps local.

FedPerfix personalizes attention through per-block adapters plus the head. The sweep says (a) which
blocks' attention is most sensitive, when it ran per-block attention cells (`attn@K`, from
`fedsens sweep --per-block attn`), and (b) which other part types gain more than attention when kept
local. `place_fedperfix` turns that into a placement: the adapters go into the `top_blocks` blocks
ranked most sensitive (without per-block cells: the last `top_blocks` blocks, the default the public code
also uses when given a depth), and the part types ranked above attention, other than the head FedPerfix
keeps local anyway, become extra local terms.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from fedsens.personalize import runio
from fedsens.personalize.errors import UserError
from fedsens.sensitivity.ranking import accuracy_order

PER_BLOCK_ATTN = re.compile(r"^attn@(\d+)$")
ALREADY_LOCAL = ("head", "plugin", "attn", "all")  # FedPerfix's own local parts, and the no-sharing extreme


@dataclass(frozen=True)
class Placement:
    blocks: tuple[int, ...]  # adapter blocks, ascending
    local: str  # extra part-spec terms kept local (e.g. "embed"), "" for none
    why: str  # one paragraph a person can read in placement.json

    def as_dict(self) -> dict:
        return asdict(self)


def _ranking(sweep_dir: Path) -> pd.DataFrame:
    path = sweep_dir / "ranking.csv"
    if not path.is_file():
        raise UserError(
            f"{sweep_dir} is not a finished sweep folder (no ranking.csv); run `fedsens sweep --out {sweep_dir}` first"
        )
    return runio.read_table(path, "run the sweep again to rewrite it", required=("part", "metric", "rank", "score"))


def attention_blocks(sweep_dir: Path) -> list[int]:
    """The model's blocks holding attention, from any cell's parts.csv."""
    for parts_csv in sorted((sweep_dir / "cells").glob("*/parts.csv")):
        parts = runio.read_table(parts_csv, "re-run the sweep", required=("part", "block"))
        blocks = parts.loc[parts["part"] == "attn", "block"].dropna()
        if len(blocks):
            return sorted({int(b) for b in blocks})
    raise UserError(f"no cell of {sweep_dir} records its model's parts (cells/*/parts.csv); re-run the sweep")


def place_fedperfix(sweep_dir: str | Path, top_blocks: int) -> Placement:
    """The adapter blocks and extra local parts the sweep in `sweep_dir` suggests for FedPerfix."""
    sweep_dir = Path(sweep_dir)
    order = accuracy_order(_ranking(sweep_dir))  # ranked parts, best first
    available = attention_blocks(sweep_dir)
    if not 1 <= top_blocks <= len(available):
        raise UserError(f"--top-blocks must be in 1..{len(available)} (the model's attention blocks); got {top_blocks}")
    per_block = [(int(m.group(1)), part) for part in order.index if (m := PER_BLOCK_ATTN.match(str(part)))]
    if per_block:
        chosen = tuple(sorted(block for block, _ in per_block[:top_blocks]))
        blocks_why = (
            f"adapters in blocks {', '.join(map(str, chosen))}: the {top_blocks} blocks whose attention gained most "
            f"when kept local (per-block order: {' > '.join(p for _, p in per_block)})"
        )
    else:
        chosen = tuple(available[-top_blocks:])
        blocks_why = (
            f"adapters in the last {top_blocks} blocks ({', '.join(map(str, chosen))}): the sweep ran no per-block "
            "attention cells (fedsens sweep --per-block attn), so it cannot say which blocks"
        )
    types = [str(p) for p in order.index if not PER_BLOCK_ATTN.match(str(p)) and "@" not in str(p)]
    above = types[: types.index("attn")] if "attn" in types else []
    extra = [p for p in above if p not in ALREADY_LOCAL]
    terms = list(dict.fromkeys(t.strip() for p in extra for t in p.split(",") if t.strip() not in ALREADY_LOCAL))
    if "attn" not in types:
        local_why = "the sweep did not rank attention, so no extra part is kept local"
    elif terms:
        local_why = f"{', '.join(terms)} ranked above attention (order: {' > '.join(types)}), so kept local too"
    else:
        local_why = f"no part other than the head ranked above attention (order: {' > '.join(types)})"
    return Placement(chosen, ",".join(terms), f"{blocks_why}; {local_why}.")
