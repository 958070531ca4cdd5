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


# ---- a local-parameter budget: `--personalize auto --from SWEEP --budget 20k` -------------------------------

BUDGET_UNITS = {"": 1, "k": 1_000, "m": 1_000_000}


def parse_budget(text: str) -> int:
    """'20k' -> 20000, '1.5M' -> 1500000, '800' -> 800 (local parameters per client)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not match:
        raise UserError(f"--budget {text!r} is not a parameter count; write e.g. 20k, 1.5M or 800")
    value = int(float(match.group(1)) * BUDGET_UNITS[match.group(2).lower()])
    if value < 1:
        raise UserError(f"--budget {text!r} must allow at least one local parameter")
    return value


@dataclass(frozen=True)
class BudgetCell:
    cell: str  # the cell's part spec, e.g. attn:lora
    gain: float  # its mean gain over FedAvg (the ranking's score)
    low: float  # the lower end of its interval (bootstrap where there is one, else t)
    local_params: float


@dataclass(frozen=True)
class BudgetPlacement:
    spec: str  # the part spec to train, e.g. head,attn:lora
    budget: int
    cells: tuple[BudgetCell, ...]
    predicted_gain: float  # the chosen cells' gains added up
    local_params: float
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def _footprint(cell: str) -> list[tuple[str, frozenset[int] | None]]:
    """What a cell occupies: (part type or module path, its blocks; None = all of them) per term."""
    from fedsens.personalize import mechanisms
    from fedsens.personalize.blocks import parse_blocks

    taken = []
    for term in mechanisms.parse(cell):
        kind, _, blocks = term.part.partition("@")
        chosen = parse_blocks(blocks, what=f"cell {cell!r}") if blocks else None
        taken.append((kind, frozenset(chosen) if chosen is not None else None))
    return taken


def _overlap(a: str, b: str) -> bool:
    """Two cells cannot both be kept: they name the same part type in overlapping blocks (attn and attn:lora,
    attn@2 and attn@0-3), or either names everything (all)."""
    for kind_a, blocks_a in _footprint(a):
        for kind_b, blocks_b in _footprint(b):
            if "all" in (kind_a, kind_b) or kind_a.startswith(kind_b + ".") or kind_b.startswith(kind_a + "."):
                return True
            if kind_a == kind_b and (blocks_a is None or blocks_b is None or blocks_a & blocks_b):
                return True
    return False


def _best_combination(cells: list[BudgetCell], budget: int) -> list[BudgetCell]:
    """The compatible cells of highest total gain within the budget (exact branch and bound over the few
    resolved cells: best gain first, a branch dropped once even all the remaining gains could not beat the best)."""
    ordered = sorted(cells, key=lambda c: -c.gain)
    best: list[BudgetCell] = []
    best_gain = 0.0

    def search(index: int, chosen: list[BudgetCell], gain: float, cost: float) -> None:
        nonlocal best, best_gain
        if gain > best_gain:
            best, best_gain = list(chosen), gain
        if index == len(ordered) or gain + sum(c.gain for c in ordered[index:]) <= best_gain:
            return
        cell = ordered[index]
        fits = cost + cell.local_params <= budget and not any(_overlap(cell.cell, c.cell) for c in chosen)
        if fits:
            search(index + 1, [*chosen, cell], gain + cell.gain, cost + cell.local_params)
        search(index + 1, chosen, gain, cost)

    search(0, [], 0.0, 0.0)
    return best


def place_within_budget(sweep_dir: str | Path, budget: int) -> BudgetPlacement:
    """Among the sweep's cells whose gain over FedAvg is resolved above zero (the lower end of its interval
    above 0), the compatible combination with the highest predicted gain (the cells' gains added) whose local
    parameters fit `budget`."""
    sweep_dir = Path(sweep_dir)
    ranking = _ranking(sweep_dir)
    if "local_params" not in ranking:
        raise UserError(f"{sweep_dir}'s ranking.csv has no local_params; run the sweep again to rewrite it")
    gains = ranking[(ranking["metric"] == "gain_vs_fedavg") & ranking["rank"].notna()]
    gains = gains.groupby("part", sort=False).mean(numeric_only=True)  # mean over partitions
    bootstrap = "boot_low" in gains and gains["boot_low"].notna().all()
    low = gains["boot_low"] if bootstrap else gains["ci_low"]
    candidates = [
        BudgetCell(str(part), float(row["score"]), float(low[part]), float(row["local_params"]))
        for part, row in gains.iterrows()
        if pd.notna(low[part]) and low[part] > 0 and pd.notna(row["local_params"])
    ]
    interval = "95% hierarchical bootstrap" if bootstrap else "95% t-interval across seeds"
    if not candidates:
        raise UserError(
            f"no cell of the sweep in {sweep_dir} gains over FedAvg with its {interval} above zero, so the sweep "
            "cannot say what is worth keeping local; run more seeds, or choose with --top K"
        )
    chosen = _best_combination(candidates, budget)
    if not chosen:
        cheapest = min(candidates, key=lambda c: c.local_params)
        raise UserError(
            f"no resolved cell fits --budget {budget:,}: the cheapest, {cheapest.cell}, keeps "
            f"{cheapest.local_params:,.0f} parameters local"
        )
    order = sorted(chosen, key=lambda c: -c.gain)
    predicted = sum(c.gain for c in order)
    cost = sum(c.local_params for c in order)
    considered = ", ".join(f"{c.cell} ({c.gain:+.4f}, {c.local_params:,.0f})" for c in candidates)
    why = (
        f"cells resolved above zero ({interval}; gain, local parameters): {considered}. Within {budget:,} local "
        f"parameters the compatible cells of highest total gain are {' + '.join(c.cell for c in order)}: "
        f"predicted gain {predicted:+.4f} (the cells' gains added, as if they did not interact; "
        f"`fedsens compare --from SWEEP --budget` measures it), {cost:,.0f} local parameters."
    )
    spec = ",".join(dict.fromkeys(term.strip() for c in order for term in c.cell.split(",")))
    return BudgetPlacement(spec, budget, tuple(order), predicted, cost, why)
