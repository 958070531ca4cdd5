"""place_fedperfix: adapter blocks and extra local parts from a sweep's ranking.csv (constructed folders)."""

from __future__ import annotations

import pandas as pd
import pytest

from fedsens.personalize.errors import UserError
from fedsens.sensitivity.placement import place_fedperfix


def _sweep(tmp_path, gains: dict[str, float], depth: int = 4):
    ranked = sorted(gains, key=gains.get, reverse=True)
    rows = [dict(part=p, score=gains[p], rank=ranked.index(p) + 1, metric="gain_vs_fedavg") for p in ranked]
    pd.DataFrame(rows).to_csv(tmp_path / "ranking.csv", index=False)
    cell = tmp_path / "cells" / "s0-none"
    cell.mkdir(parents=True)
    parts = [dict(param=f"blocks.{b}.attn.qkv.weight", part="attn", block=b) for b in range(depth)]
    pd.DataFrame([*parts, dict(param="head.weight", part="head", block=None)]).to_csv(cell / "parts.csv", index=False)
    return tmp_path


def test_per_block_cells_choose_the_blocks_and_parts_above_attention_stay_local(tmp_path):
    gains = {"head": 0.3, "embed": 0.2, "attn": 0.1, "mlp": 0.05, "attn@1": 0.09, "attn@3": 0.07, "attn@0": 0.01}
    placement = place_fedperfix(_sweep(tmp_path, gains), 2)
    assert placement.blocks == (1, 3)
    assert placement.local == "embed"  # head is FedPerfix's own; mlp ranked below attention
    assert "attn@1 > attn@3 > attn@0" in placement.why and "embed ranked above attention" in placement.why


def test_without_per_block_cells_the_last_blocks_and_nothing_extra(tmp_path):
    placement = place_fedperfix(_sweep(tmp_path, {"attn": 0.2, "head": 0.1, "mlp": 0.0}), 3)
    assert placement == place_fedperfix(tmp_path, 3)
    assert placement.blocks == (1, 2, 3) and placement.local == ""
    assert "no per-block" in placement.why


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="not a finished sweep"):
        place_fedperfix(tmp_path, 2)
    with pytest.raises(UserError, match="--top-blocks must be in 1..4"):
        place_fedperfix(_sweep(tmp_path, {"attn": 0.2, "head": 0.1}), 5)
