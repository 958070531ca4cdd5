"""Each method's defining behaviour, checked through the round loop's hooks on tiny runs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedsens.personalize import runio
from fedsens.personalize.errors import UserError
from fedsens.personalize.federation import ClientContext, RunConfig, run
from fedsens.personalize.hooks import Hook
from fedsens.personalize.methods import APFL, METHODS, FedRep, PerFedAvg, alpha_step, get_method

SMALL_OPTIONS = {"fedperfix": {"mid_dim": 8}, "fedbabu": {"finetune_steps": 2}}


def tiny(tmp_path, method: str, **changes) -> RunConfig:
    options = dict(
        dataset="synthetic",
        model="vit-nano",
        clients=3,
        join_ratio=1.0,
        rounds=1,
        local_steps=2,
        batch_size=16,
        device="cpu",
        method=method,
        method_options=SMALL_OPTIONS.get(method, {}),
        out=str(tmp_path / method),
    )
    return RunConfig(**{**options, **changes})


class Recorder(Hook):
    """A run hook that keeps copies of chosen parameters at every hook call, and the run context."""

    table = "recorder"

    def __init__(self, select=lambda name: True):
        self.select = select
        self.events: list[tuple[str, int, int, dict[str, torch.Tensor]]] = []
        self.ctx = None

    def _copy(self, model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if self.select(n)}

    def on_run_start(self, ctx):
        self.ctx = ctx
        self.events.append(("start", 0, -1, self._copy(ctx.model)))

    def on_client_start(self, round_, client, model):
        self.events.append(("client_start", round_, client, self._copy(model)))

    def on_client_end(self, round_, client, model):
        self.events.append(("client_end", round_, client, self._copy(model)))

    def on_round_end(self, round_):
        return []

    def at(self, kind, round_, client):
        return next(e[3] for e in self.events if e[:3] == (kind, round_, client))


class _Built(Exception):
    pass


class _StopAtStart(Recorder):
    def on_run_start(self, ctx):
        super().on_run_start(ctx)
        raise _Built


def client_context(config: RunConfig, client: int = 0):
    """The method and one client's view of a freshly built run (model, data, initial state), untrained."""
    recorder = _StopAtStart()
    with pytest.raises(_Built):
        run(config, hooks=[recorder], quiet=True)
    method = get_method(config)
    state = method.init_client(client, recorder.ctx.model)
    return method, ClientContext(recorder.ctx, client, 1, state, torch.Generator().manual_seed(5))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def parts_kept_local(out) -> set[str]:
    table = pd.read_csv(out / "parts.csv")
    return set(table.loc[table["local"], "part"])


# --- which parts are local ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "local_parts"),
    [
        ("fedavg", set()),
        ("fedbn", {"norm"}),
        ("fedper", {"head"}),
        ("fedrep", {"head"}),
        ("fedbabu", {"head"}),
        ("vanilla-attention", {"attn", "head"}),
        ("vanilla-prefix", {"plugin", "head"}),
        ("fedperfix", {"plugin", "head"}),
        ("apfl", set()),
        ("perfedavg", set()),
    ],
)
def test_methods_keep_their_parts_local(tmp_path, method, local_parts):
    _, ctx = client_context(tiny(tmp_path, method))
    table = ctx.run.parts
    assert set(table.loc[table["local"], "part"]) == local_parts
    assert parts_kept_local(ctx.run.out) == local_parts


def test_local_sends_zero_bytes_and_keeps_everything(tmp_path):
    result = run(tiny(tmp_path, "local", rounds=2), quiet=True)
    assert (result.rounds["up_bytes"] == 0).all() and (result.rounds["down_bytes"] == 0).all()
    assert result.summary["comm_bytes_per_round"] == 0
    assert result.summary["shared_params"] == 0


def test_fedperfix_local_adds_parts_and_plugin_options_reach_the_model(tmp_path):
    options = {"local": "blocks.1", "blocks": "1", "mid_dim": 8, "scale": 0.5}
    config = tiny(tmp_path, "fedperfix", method_options=options)
    _, ctx = client_context(config)
    table = ctx.run.parts
    local = table[table["local"]]
    assert set(local.loc[local["part"] == "attn", "block"]) == {1}  # blocks.1 whole, block 0's attention not
    plugin = table[table["part"] == "plugin"]
    assert set(plugin["block"]) == {1}
    adapter = ctx.model.blocks[1].attn.prefix
    assert adapter.down.out_features == 8 and adapter.scale == 0.5


def test_a_method_with_personalize_or_an_unknown_name_is_refused(tmp_path):
    with pytest.raises(UserError, match="fixes which parts are local"):
        tiny(tmp_path, "fedper", personalize="attn")
    with pytest.raises(UserError, match="unknown method 'fedprox'"):
        tiny(tmp_path, "fedprox")
    assert set(METHODS) >= {
        "fedavg",
        "local",
        "fedbn",
        "fedper",
        "fedrep",
        "fedbabu",
        "apfl",
        "perfedavg",
        "vanilla-attention",
        "vanilla-prefix",
        "fedperfix",
    }


# --- plugins survive aggregation ----------------------------------------------------------------


def test_local_plugin_parameters_survive_aggregation_untouched(tmp_path):
    recorder = Recorder()
    run(tiny(tmp_path, "fedperfix", rounds=2), hooks=[recorder], quiet=True)
    plugin = [n for n in recorder.events[0][3] if ".prefix." in n]
    shared = "blocks.0.attn.qkv.weight"
    for client in range(3):
        trained, reloaded = recorder.at("client_end", 1, client), recorder.at("client_start", 2, client)
        assert same({n: trained[n] for n in plugin}, {n: reloaded[n] for n in plugin})
        assert not torch.equal(trained[shared], reloaded[shared])  # the attention weights were averaged
    first, second = recorder.at("client_end", 1, 0), recorder.at("client_end", 1, 1)
    assert not torch.equal(first[plugin[0]], second[plugin[0]])  # each client has its own adapter


# --- FedBABU ------------------------------------------------------------------------------------


def test_fedbabu_never_updates_the_head_during_federated_rounds(tmp_path):
    recorder = Recorder()
    run(tiny(tmp_path, "fedbabu", rounds=2), hooks=[recorder], quiet=True)
    initial = recorder.events[0][3]
    head = {n for n in initial if n.startswith("head.")}
    for kind, round_, client, params in recorder.events[1:]:
        assert same({n: params[n] for n in head}, {n: initial[n] for n in head}), (kind, round_, client)
    body = "blocks.0.mlp.fc1.weight"
    assert not torch.equal(recorder.at("client_end", 2, 0)[body], initial[body])


def test_fedbabu_fine_tunes_the_head_before_evaluation_and_restores_the_model(tmp_path, monkeypatch):
    method, ctx = client_context(tiny(tmp_path, "fedbabu"))
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    seen = {}
    evaluate = ctx.evaluate
    monkeypatch.setattr(ctx, "evaluate", lambda: seen.update(head=ctx.model.head.weight.detach().clone()) or evaluate())
    method.evaluate_client(ctx)
    assert not torch.equal(seen["head"], before["head.weight"])
    assert same({n: p.detach() for n, p in ctx.model.named_parameters()}, before)
    assert all(p.requires_grad for p in ctx.model.parameters())


# --- FedRep -------------------------------------------------------------------------------------


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(tmp_path, monkeypatch):
    config = tiny(
        tmp_path, "fedrep", local_steps=None, local_epochs=1, method_options={"head_epochs": 2}, batch_size=64
    )
    method, ctx = client_context(config)
    phases = []
    step = ctx.step
    monkeypatch.setattr(
        ctx,
        "step",
        lambda *a: (
            phases.append({n.split(".")[0] == "head" for n, p in ctx.model.named_parameters() if p.requires_grad})
            or step(*a)
        ),
    )
    method.train_client(ctx)
    per_epoch = -(-ctx.train_size // config.batch_size)
    assert phases == [{True}] * (2 * per_epoch) + [{False}] * per_epoch
    assert all(p.requires_grad for p in ctx.model.parameters())


def test_fedrep_phases_change_only_their_part(tmp_path):
    _, ctx = client_context(tiny(tmp_path, "fedrep"))
    head = {n for n, _ in ctx.model.named_parameters() if n.startswith("head.")}
    body = {n for n, _ in ctx.model.named_parameters()} - head
    for trained, frozen in ((head, body), (body, head)):
        before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        FedRep.train_phase(ctx, trained, steps=2)
        after = dict(ctx.model.named_parameters())
        assert all(torch.equal(after[n], before[n]) for n in frozen)
        assert any(not torch.equal(after[n], before[n]) for n in trained)


# --- APFL ---------------------------------------------------------------------------------------


def test_apfl_alpha_is_learned_and_stays_in_the_unit_interval(tmp_path):
    result = run(tiny(tmp_path, "apfl", rounds=2, method_options={"alpha": 0.25}), quiet=True)
    extra = runio.load_checkpoint(result.out / "checkpoint.pt")["extra"]["tensors"]  # clients x shape per name
    alphas = extra["alpha"].tolist()
    assert all(0.0 <= a <= 1.0 for a in alphas)
    assert all(a != 0.25 for a in alphas)
    assert len(set(alphas)) == 3  # per client


def test_apfl_alpha_step_follows_the_gradient_and_is_clamped():
    w = {"p": torch.zeros(3, requires_grad=True)}
    v = {"p": torch.ones(3, requires_grad=True)}
    w["p"].grad, v["p"].grad = torch.ones(3), torch.ones(3)  # <v - w, grad> = 3 > 0: alpha falls
    assert alpha_step(0.5, 0.01, w, v) == pytest.approx(0.5 - 0.01 * (3 + 0.02 * 0.5))
    assert alpha_step(0.5, 10.0, w, v) == 0.0
    w["p"].grad, v["p"].grad = -torch.ones(3), -torch.ones(3)
    assert alpha_step(0.5, 10.0, w, v) == 1.0


def test_apfl_evaluates_the_personal_mixture_not_the_global_model(tmp_path, monkeypatch):
    method, ctx = client_context(tiny(tmp_path, "apfl"))
    global_before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    method.train_client(ctx)
    alpha = float(ctx.state["alpha"])
    global_after = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    personal = method.personal(ctx)
    assert not same(personal, global_after) and 0 <= alpha <= 1
    assert not same(global_before, global_after)
    seen = {}
    evaluate = ctx.evaluate
    monkeypatch.setattr(
        ctx,
        "evaluate",
        lambda: seen.update({n: p.detach().clone() for n, p in ctx.model.named_parameters()}) or evaluate(),
    )
    method.evaluate_client(ctx)
    assert same(seen, personal)
    assert same({n: p.detach() for n, p in ctx.model.named_parameters()}, global_after)


def test_apfl_state_holds_a_personal_model_and_alpha():
    config = RunConfig(method="apfl", method_options={"alpha": 0.4})
    model = torch.nn.Linear(2, 3)
    state = APFL(config).init_client(0, model)
    assert float(state["alpha"]) == pytest.approx(0.4)
    assert torch.equal(state["personal.weight"], model.weight)
    assert APFL(config).personal_params(pd.DataFrame({"numel": [6, 3]})) == 9


# --- Per-FedAvg ---------------------------------------------------------------------------------


def test_perfedavg_outer_step_starts_from_the_weights_before_the_inner_step(tmp_path):
    config = tiny(tmp_path, "perfedavg")
    _, ctx = client_context(config)
    for beta, moves in ((0.0, False), (0.01, True)):
        before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        PerFedAvg(config.replace(method_options={"beta": beta})).train_client(ctx)
        assert same(before, {n: p.detach() for n, p in ctx.model.named_parameters()}) is not moves


def test_perfedavg_adapts_before_evaluation(tmp_path, monkeypatch):
    method, ctx = client_context(tiny(tmp_path, "perfedavg"))
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    seen = {}
    evaluate = ctx.evaluate
    monkeypatch.setattr(
        ctx,
        "evaluate",
        lambda: seen.update({n: p.detach().clone() for n, p in ctx.model.named_parameters()}) or evaluate(),
    )
    method.evaluate_client(ctx)
    assert seen and not same(seen, before)
    assert same({n: p.detach() for n, p in ctx.model.named_parameters()}, before)
