"""Benchmark: one row per model family's tiny CPU variant (`fedsens models` lists them): parameters,
parameters per part, the FedPerfix reference difference and seconds per round.

- reference difference: the largest |plugged projection - formula| over every attention of the model in
  float64, the formula being the key/value projection plus 1.5 * up(tanh(down(x))) on its key and value
  parts (tests/test_families.py also checks the whole plugged attention against timm's own attention with
  the vanilla prefix folded into its weights);
- seconds per round: `fedsens train` with the embedded default (digits, 20 clients, 10 a round, 2 local
  epochs, AdamW) on the tiny variant, one torch thread, the mean over --rounds rounds (first round included).

Not a test: run it on a quiet machine, from the repository root:

    .venv/bin/python benchmarks/families.py              # 3 rounds per family
    .venv/bin/python benchmarks/families.py --rounds 5 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import pandas as pd
import torch

from fedsens.personalize import families, plugins
from fedsens.personalize import model as model_lib
from fedsens.personalize.config import RunConfig
from fedsens.personalize.federation import run


def reference_difference(name: str, args: dict) -> float:
    spec = model_lib.input_spec(name, data_channels=1, data_size=8, model_args=args)
    model = model_lib.build(name, 10, spec.in_chans, spec.img_size, model_args=args).double().eval()
    plain = copy.deepcopy(model)
    plugins.install(model, "fedperfix", mid_dim=8, scale=1.5, seed=1)
    worst = 0.0
    pairs = zip(families.of(model).attentions(model), families.of(plain).attentions(plain))
    for (_, attn), (_, original) in pairs:
        where, before = plugins.projections(attn), plugins.projections(original)
        assert where is not None and before is not None
        x = torch.randn(2, 5, where.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        k_off, v_off = (1.5 * attn.prefix.up(torch.tanh(attn.prefix.down(x)))).chunk(2, dim=-1)
        with torch.no_grad():
            if where.fused is not None:
                expected = before.fused(x) + torch.cat([torch.zeros_like(k_off), k_off, v_off], dim=-1)
                worst = max(worst, (where.fused(x) - expected).abs().max().item())
            else:
                assert where.key is not None and where.value is not None
                assert before.key is not None and before.value is not None
                worst = max(worst, (where.key(x) - before.key(x) - k_off).abs().max().item())
                worst = max(worst, (where.value(x) - before.value(x) - v_off).abs().max().item())
    return worst


def row(family: families.Family, rounds: int, out: Path) -> dict:
    name, args = family.examples[0], dict(family.tiny)
    spec = model_lib.input_spec(name, data_channels=1, data_size=8, model_args=args)
    table = model_lib.parts(model_lib.build(name, 10, spec.in_chans, spec.img_size, model_args=args))
    per_part = table.groupby("part")["numel"].sum()
    result = run(RunConfig(model=name, model_args=args, rounds=rounds, out=str(out / family.name)), quiet=True)
    return {
        "family": family.name,
        "model": name,
        "params": int(table["numel"].sum()),
        **{part: int(per_part.get(part, 0)) for part in ("embed", "attn", "mlp", "norm", "head")},
        "fedperfix_ref_diff": reference_difference(name, args),
        "seconds_per_round": round(float(result.summary["seconds_per_round"]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    options = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        out = options.out or Path(scratch)
        rows = []
        for family in families.all_families():
            rows.append(row(family, options.rounds, out))
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    if options.out is not None:
        frame.to_csv(options.out / "families.csv", index=False)


if __name__ == "__main__":
    main()
