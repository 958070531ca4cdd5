"""Personalization mechanisms (personalize/mechanisms): each answer known by construction."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedsens.cli import app
from fedsens.personalize import mechanisms, runio
from fedsens.personalize import model as model_lib
from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import run
from fedsens.personalize.hooks import Hook

TINY = dict(dataset="synthetic", model="vit-nano", clients=4, join_ratio=0.5, rounds=3, local_steps=2, device="cpu")


def nano() -> nn.Module:
    return model_lib.build("vit-nano", 10, 1, 8, patch_size=4, seed=0)


def numel(model: nn.Module, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def linears_of(model: nn.Module, part: str) -> list[nn.Linear]:
    table = model_lib.parts(model)
    modules = dict(model.named_modules())
    weights = table.loc[(table["part"] == part) & table["param"].str.endswith(".weight"), "param"]
    return [modules[w[: -len(".weight")]] for w in weights if isinstance(modules.get(w[: -len(".weight")]), nn.Linear)]


@pytest.mark.parametrize(("part", "rank"), [("attn", 4), ("mlp", 2), ("head", 3)])
def test_lora_keeps_r_times_in_plus_out_per_linear(part, rank):
    model = nano()
    expected = sum(rank * (m.in_features + m.out_features) for m in linears_of(model, part))
    placement = mechanisms.install(model, f"{part}:lora:r={rank}")
    assert numel(model, placement.local) == expected
    model_b = nano()
    only_b = mechanisms.install(model_b, f"{part}:lora-b:r={rank}")  # FedSA-LoRA: B local, A federated
    assert numel(model_b, only_b.local) == sum(rank * m.out_features for m in linears_of(model_b, part))
    assert set(only_b.added) - set(only_b.local) == {n for n in only_b.added if n.endswith(".lora.a")}


@pytest.mark.parametrize(
    "spec", ["attn:lora", "mlp:lora-b", "head:lora", "attn:adapter", "mlp:adapter", "head:adapter", "attn@1:adapter"]
)
def test_zero_initialised_mechanisms_start_as_the_plain_model(spec):
    plain, changed = nano(), nano()
    before = {n: p.detach().clone() for n, p in changed.named_parameters()}
    placement = mechanisms.install(changed, spec, seed=5)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert placement.added and set(placement.local) <= set(placement.added)
    torch.testing.assert_close(changed(x), plain(x), rtol=0, atol=1e-6)
    params = dict(changed.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in before.items())  # no existing name changed or moved
    assert set(model_lib.parts(changed).set_index("param").loc[list(placement.added), "part"]) == {"plugin"}


def test_prompts_enter_the_sequence_and_leave_before_the_head():
    model = nano()
    placement = mechanisms.install(model, "attn:prompt-deep:tokens=3", seed=1)
    assert placement.local == ("blocks.0.prompt.tokens", "blocks.1.prompt.tokens")
    seen = []
    model.blocks[1].register_forward_hook(lambda _m, _a, out: seen.append(out.shape[1]))
    model.norm.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[1]))
    model(torch.randn(2, 1, 8, 8))
    tokens = 1 + (8 // 4) ** 2  # the class token and four patches
    assert seen == [tokens + 3, tokens]
    with torch.no_grad():  # the prompts are what changes the output
        before = model(torch.ones(1, 1, 8, 8))
        model.blocks[0].prompt.tokens.add_(torch.randn(3, 48, generator=torch.Generator().manual_seed(1)))
        assert not torch.allclose(before, model(torch.ones(1, 1, 8, 8)))


def test_plain_specs_resolve_as_before_and_bad_terms_are_one_line():
    model = nano()
    assert mechanisms.install(model, "attn@1,head").local == tuple(model_lib.resolve(model, "attn@1,head"))
    biases = ("blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias", "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.bias")
    assert mechanisms.install(nano(), "mlp:bias").local == biases
    for spec, message in [
        ("embed:lora", "no linear layer"),
        ("norm:adapter", "beside attn, mlp or head"),
        ("attn:nope", "unknown mechanism 'nope'"),
        ("attn:lora:rank=3", "no option 'rank'"),
        ("attn:lora:r", "not KEY=VALUE"),
        ("none,attn:lora", "'none' alone"),
    ]:
        with pytest.raises(UserError, match=message):
            mechanisms.check(spec)
            mechanisms.install(nano(), spec)
    swin = model_lib.build("swin_tiny_patch4_window7_224", 4, 3, 32, model_args=dict(window_size=4, embed_dim=16,
                           depths=(1, 2), num_heads=(1, 2)))  # fmt: skip
    with pytest.raises(UserError, match="prompt tokens fit ViT / DeiT models only"):
        mechanisms.install(swin, "embed:prompt")


def test_train_runs_with_a_lora_term_and_keeps_only_its_tensors(tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", "--dataset", "synthetic", "--model", "vit-nano", "--rounds", "1", "--clients", "4",
         "--local-steps", "1", "--device", "cpu", "--quiet", "--personalize", "attn:lora,head",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    parts = pd.read_csv(tmp_path / "parts.csv")
    local = parts[parts["local"]]
    assert set(local["part"]) == {"plugin", "head"} and local["param"].str.contains(r"\.lora\.[ab]$|^head\.").all()
    assert int(local["numel"].sum()) == runio.read_json(tmp_path / "summary.json")["local_params"]
    bad = CliRunner().invoke(app, ["train", "--personalize", "attn:lora:r=0", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "option r must be at least 1" in bad.output and "Traceback" not in bad.output


def test_finetune_federates_as_fedavg_and_adapts_only_to_evaluate(tmp_path):
    fedavg = run(RunConfig(out=str(tmp_path / "fedavg"), **TINY), quiet=True)
    tuned = run(RunConfig(personalize="head:finetune:steps=5", out=str(tmp_path / "tuned"), **TINY), quiet=True)
    shared = [runio.load_checkpoint(tmp_path / f / "checkpoint.pt")["shared"] for f in ("fedavg", "tuned")]
    assert shared[0].keys() == shared[1].keys()
    assert all(torch.equal(shared[0][n], shared[1][n]) for n in shared[0])  # nothing local: the same federation
    assert tuned.summary["local_params"] == 0
    assert not fedavg.metrics["accuracy"].equals(tuned.metrics["accuracy"])  # 5 steps on the head per client


def test_frozen_backbone_trains_only_the_added_local_and_head_tensors(tmp_path):
    config = RunConfig(personalize="attn:lora", backbone="freeze", out=str(tmp_path), **TINY)
    run(config, quiet=True)
    state = runio.load_checkpoint(tmp_path / "checkpoint.pt")
    start = nano_like(config)
    for name, tensor in state["shared"].items():
        if name.startswith("head."):
            assert not torch.equal(tensor, start[name])
        else:
            assert torch.equal(tensor, start[name]), name
    assert not torch.equal(state["local"]["tensors"]["blocks.0.attn.qkv.lora.b"], torch.zeros_like(
        state["local"]["tensors"]["blocks.0.attn.qkv.lora.b"]))  # fmt: skip


def nano_like(config: RunConfig) -> dict[str, torch.Tensor]:
    """The run's model as built (seeded), before any training."""
    from fedsens.personalize.engine.context import build_context
    from fedsens.personalize.methods import get_method

    method = get_method(config)
    ctx = build_context(config.replace(out=config.out + "-start"), method, _fresh(config.out + "-start"))
    return {n: t.detach().clone() for n, t in ctx.named.items()}


def _fresh(path: str):
    from pathlib import Path

    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


class Killer(Hook):
    table = "killer"

    def on_round_end(self, round_):
        if round_ == 2:
            raise KeyboardInterrupt("killed")
        return []


def test_a_killed_lora_run_resumes_to_the_same_tables(tmp_path):
    config = dict(TINY, personalize="attn:lora:r=2,head")
    whole = run(RunConfig(out=str(tmp_path / "whole"), **config), quiet=True)
    cut = RunConfig(out=str(tmp_path / "cut"), **config)
    with pytest.raises(KeyboardInterrupt):
        run(cut, hooks=[Killer()], quiet=True)
    resumed = run(cut, resume=True, quiet=True)
    pd.testing.assert_frame_equal(whole.metrics, resumed.metrics)
    columns = ["round", "acc_mean", "acc_std", "up_bytes", "down_bytes"]
    pd.testing.assert_frame_equal(whole.rounds[columns], resumed.rounds[columns])


def test_flower_gives_the_builtin_tables_with_a_lora_cell(tmp_path):
    pytest.importorskip("flwr")
    from fedsens.personalize.flower.engine import run_simulation

    config = RunConfig(personalize="attn:lora,head", out=str(tmp_path / "builtin"), seed=3, **TINY)
    builtin = run(config, quiet=True)
    flower = run_simulation(config.replace(out=str(tmp_path / "flower")), quiet=True)
    keys = ["round", "client", "protocol"]
    pair = builtin.metrics.merge(flower.metrics, on=keys, suffixes=("_builtin", "_flower"))
    assert len(pair) == len(flower.metrics) == 4 * 3
    assert (pair["accuracy_builtin"] - pair["accuracy_flower"]).abs().max() <= 1e-5
    assert (pair["loss_builtin"] - pair["loss_flower"]).abs().max() <= 1e-5


PLANTED = dict(
    dataset="planted",
    data_options=dict(effect="concept", strength=1.0, domains=4),
    scheme="domain",
    alpha=1000.0,
    model="vit-nano",
    clients=4,
    join_ratio=1.0,
    rounds=6,
    local_steps=10,
    device="cpu",
)


def test_a_local_head_wins_a_planted_concept_shift_however_it_is_kept(tmp_path):
    """Each domain names the classes by its own permutation: one shared head cannot fit them, a local one can,
    whether it is kept whole, as a rank-10 LoRA delta (10 classes: any permutation of the head is reachable)
    or as a zero-initialised adapter beside it."""
    accuracy = {
        spec: run(RunConfig(personalize=spec, out=str(tmp_path / runio.slug(spec)), **PLANTED), quiet=True).summary[
            "acc_last"
        ]
        for spec in ("none", "head", "head:lora:r=10", "head:adapter:mid=32")
    }
    for spec in ("head", "head:lora:r=10", "head:adapter:mid=32"):
        assert accuracy[spec] > accuracy["none"] + 0.08, accuracy


def test_sweep_with_mechanisms_ranks_part_mechanism_cells(tmp_path):
    args = ["sweep", "--dataset", "synthetic", "--model", "vit-nano", "--rounds", "2", "--clients", "4",
            "--local-steps", "1", "--seeds", "0,1", "--parts", "attn", "--parts", "embed", "--only-parts",
            "--mechanisms", "full,lora,bias", "--device", "cpu", "--quiet", "--jobs", "1", "--force",
            "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "skipped cell embed:lora: mechanism lora cannot keep embed local" in result.output
    assert "gain_per_10k" in result.output
    table = pd.read_csv(tmp_path / "sensitivity.csv")
    cells = set(zip(table["local_part"], table["mechanism"]))
    assert cells == {("none", "full"), ("attn", "full"), ("attn:lora", "lora"), ("attn:bias", "bias"),
                     ("embed", "full"), ("embed:bias", "bias")}  # fmt: skip
    assert (table["up_bytes"] > 0).all() and table["down_bytes"].equals(table["up_bytes"])
    lora = table[table["local_part"] == "attn:lora"]
    assert (lora["local_params"] == 2 * 4 * ((48 + 144) + (48 + 48))).all()  # r=4 on qkv and proj, two blocks
    ranking = pd.read_csv(tmp_path / "ranking.csv")
    gain = ranking[ranking["metric"] == "gain_vs_fedavg"].set_index("part")
    assert set(gain.index) == {"attn", "attn:lora", "attn:bias", "embed", "embed:bias"}
    assert gain.loc["attn:lora", "mechanism"] == "lora"
    expected = gain["score"] / gain["local_params"] * 1e4
    pd.testing.assert_series_equal(gain["gain_per_10k"], expected, check_names=False)
    assert gain["friedman_p"].notna().all()


def test_sweep_with_mechanisms_runs_on_swin(tmp_path):
    args = ["sweep", "--dataset", "synthetic", "--model", "swin_tiny_patch4_window7_224", "--model-arg", "img_size=32",
            "--model-arg", "window_size=4", "--model-arg", "embed_dim=16", "--model-arg", "depths=2,",
            "--model-arg", "num_heads=2,", "--rounds", "1", "--clients", "4", "--local-steps", "1", "--seeds", "0",
            "--parts", "attn", "--only-parts", "--mechanisms", "full,lora,bias,prompt-deep", "--device", "cpu",
            "--quiet", "--jobs", "1", "--force", "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "skipped cell attn:prompt-deep: prompt tokens fit ViT / DeiT models only" in result.output
    table = pd.read_csv(tmp_path / "sensitivity.csv")
    assert set(table["local_part"]) == {"none", "attn", "attn:lora", "attn:bias"}
    assert (table["status"] == "done").all()


def test_the_pareto_front_holds_the_cells_no_other_beats_on_gain_and_cost():
    from fedsens.reports import figures
    from fedsens.reports.tables import pareto_cells

    rows = pd.DataFrame(
        dict(
            part=["head:bias", "head", "attn:lora", "attn", "mlp:lora"],
            score=[0.02, 0.10, 0.08, 0.12, 0.10],
            local_params=[10, 500, 2000, 20000, 600],
            mechanism=["bias", "full", "lora", "full", "lora"],
            ci_low=[0.0, 0.05, 0.02, 0.0, 0.04],
            ci_high=[0.04, 0.15, 0.1, 0.2, 0.16],
            metric="gain_vs_fedavg",
        )
    )
    # attn:lora is beaten by head (more gain, fewer parameters), mlp:lora by head (same gain, fewer parameters)
    assert pareto_cells(rows) == ["head:bias", "head", "attn"]
    (ax,) = figures.plot_gain_cost(rows).axes
    assert ax.get_xscale() == "log" and {t.get_text() for t in ax.texts} == set(rows["part"])


def fake_sweep(folder) -> None:
    """A sweep folder whose ranking.csv holds cells with known gains, intervals and costs."""
    rows = [
        ("attn", 0.25, 0.10, 18816),
        ("head", 0.16, 0.08, 490),
        ("attn:lora", 0.13, 0.05, 2304),
        ("head:lora", 0.09, 0.02, 232),
        ("mlp", 0.30, -0.01, 500),  # the largest gain, but not resolved above zero
    ]
    table = pd.DataFrame(
        [
            dict(part=p, score=g, ci_low=low, ci_high=g + 0.1, boot_low=low, boot_high=g + 0.1, rank=i + 1,
                 metric="gain_vs_fedavg", local_params=n, dataset="synthetic", scheme="dirichlet", alpha=0.3)
            for i, (p, g, low, n) in enumerate(rows)
        ]
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "ranking.csv", index=False)


@pytest.mark.parametrize(
    ("budget", "spec", "gain"),
    [("3k", "head,attn:lora", 0.29), ("1000", "head", 0.16), ("20k", "attn,head", 0.41), ("2.4k", "head", 0.16)],
)
def test_the_budget_keeps_the_resolved_cells_of_highest_gain_that_fit(tmp_path, budget, spec, gain):
    from fedsens.sensitivity.placement import parse_budget, place_within_budget

    fake_sweep(tmp_path)
    placement = place_within_budget(tmp_path, parse_budget(budget))
    assert placement.spec == spec and placement.predicted_gain == pytest.approx(gain)
    assert placement.local_params <= parse_budget(budget) and "mlp" not in placement.why.split("cells resolved")[1]


def test_a_budget_nothing_fits_is_one_line(tmp_path):
    fake_sweep(tmp_path)
    result = CliRunner().invoke(app, ["train", "--personalize", "auto", "--from", str(tmp_path), "--budget", "100"])
    assert result.exit_code != 0 and "no resolved cell fits --budget 100" in result.output
    bad = CliRunner().invoke(app, ["train", "--personalize", "auto", "--from", str(tmp_path), "--budget", "lots"])
    assert "is not a parameter count" in bad.output


def test_train_and_compare_with_a_budget(tmp_path):
    fake_sweep(tmp_path / "sweep")
    tiny = ["--dataset", "synthetic", "--model", "vit-nano", "--rounds", "1", "--clients", "4", "--local-steps", "1",
            "--device", "cpu", "--quiet"]  # fmt: skip
    args = ["train", *tiny, "--personalize", "auto", "--from", str(tmp_path / "sweep"), "--budget", "3k"]
    trained = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    placed = runio.read_json(tmp_path / "run" / "placement.json")
    assert placed["spec"] == "head,attn:lora" and placed["predicted_gain"] == pytest.approx(0.29)
    assert runio.read_json(tmp_path / "run" / "config.json")["config"]["personalize"] == "head,attn:lora"
    args = ["compare", *tiny, "--from", str(tmp_path / "sweep"), "--budget", "3k", "--force", "--out"]
    compared = CliRunner().invoke(app, [*args, str(tmp_path / "compare")])
    assert compared.exit_code == 0, compared.output
    table = pd.read_csv(tmp_path / "compare" / "comparison.csv")
    assert list(table["method"]) == ["fedavg", "fedperfix", "budget-placed"]
    measured = (
        table.set_index("method").loc["budget-placed", "acc_mean"] - table.set_index("method").loc["fedavg", "acc_mean"]
    )
    assert f"predicted gain over FedAvg +0.2900 (the sweep's cells), measured {measured:+.4f}" in compared.output


@pytest.mark.parametrize(
    "spec", ["attn:lora,head", "mlp:lora-b", "head:bias", "head:lora", "attn@1:adapter", "attn:prompt-deep"]
)
def test_batched_evaluation_agrees_with_one_client_at_a_time(tmp_path, spec):
    """The vmapped functional path (each client's added tensors stacked) gives the per-client results; a head
    kept as a delta or as its bias alone must not take the shared-body path, which applies whole heads only."""
    from fedsens.personalize.engine.context import build_context
    from fedsens.personalize.engine.rounds import train_round
    from fedsens.personalize.engine.state import start_state
    from fedsens.personalize.evaluation import evaluate_clients
    from fedsens.personalize.methods import get_method

    config = RunConfig(personalize=spec, out=str(tmp_path), **{**TINY, "clients": 6})
    method = get_method(config)
    ctx = build_context(config, method, tmp_path)
    state = start_state(ctx, method, resume=False, overwrite=True)
    train_round(ctx, method, state, 1)
    args = (ctx, method, 1, [4, 0, 2, 5], state.shared, state.local, state.extra)
    batched, alone = evaluate_clients(*args), evaluate_clients(*args, batched=False)
    assert [r.accuracy for r in batched] == pytest.approx([r.accuracy for r in alone], abs=1e-9)
    assert [r.loss for r in batched] == pytest.approx([r.loss for r in alone], rel=1e-4, abs=1e-5)
