"""Clients trained together (`--client-batch K`, personalize.engine.together) against one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedsens.personalize import federation, runio
from fedsens.personalize.client import NonFiniteLoss
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine import together
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import TRAIN_STREAM, client_context, sample_clients, train_round
from fedsens.personalize.engine.state import fresh_state
from fedsens.personalize.hooks import Hook
from fedsens.personalize.methods import METHODS, get_method

# Digits on vit-nano, every client every round, batches of 8: the clients hold 20 to 90 training samples
# (2 to 12 batches an epoch, most with a short last batch), augmentation on (the default).
TINY = dict(dataset="digits", model="vit-nano", clients=6, join_ratio=1.0, batch_size=8, local_epochs=1, device="cpu")
# One round of float noise (the matrix products run stacked, attention is written out on the CPU), which
# AdamW turns into up to a few 1e-5 where a gradient is near zero (its update is normalised); SGD keeps it
# at float precision.
TIGHT = dict(rtol=1e-3, atol=1e-4)
TIGHTER = dict(rtol=1e-5, atol=1e-6)


def without_key_biases(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with the parts whose gradient is zero in exact arithmetic set to 0: a bias added to every
    key shifts each query's scores by one constant, which the softmax cancels. AdamW normalises the float
    noise these get to steps of the learning rate, in the one-at-a-time path as much as here."""
    tensor = tensor.clone()
    if name.endswith("attn.qkv.bias"):  # queries, keys, values in thirds
        third = tensor.shape[-1] // 3
        tensor[..., third : 2 * third] = 0
    if name.endswith("attn.prefix.up.bias"):  # the plugin's key offsets, then its value offsets
        tensor[..., : tensor.shape[-1] // 2] = 0
    return tensor


CASES = {
    "fedavg": dict(method="fedavg"),
    "attn-head-local": dict(method="fedavg", personalize="attn,head"),
    "fedperfix": dict(method="fedperfix", method_options={"mid_dim": 8}),
    "sgd-momentum-decay": dict(method="fedavg", personalize="head", optimizer="sgd", lr=0.05, weight_decay=0.01),
    "adamw-decay": dict(method="fedavg", personalize="norm", weight_decay=0.05),
}


def built(tmp_path: Path, name: str, **settings):
    config = RunConfig(**{**TINY, **settings}, out=str(tmp_path / name))
    method = get_method(config)
    ctx = build_context(config, method, Path(config.out))
    return ctx, method, fresh_state(ctx, method)


@pytest.fixture
def groups_trained(monkeypatch):
    """The sizes of the groups `train_together` trained (empty: every client trained one at a time)."""
    sizes: list[int] = []
    original = together.train_together

    def counted(ctx, state, clients, trainable, hooks=()):
        sizes.append(len(clients))
        return original(ctx, state, clients, trainable, hooks)

    monkeypatch.setattr(together, "train_together", counted)
    return sizes


def test_the_tiny_setting_has_unequal_clients_and_short_last_batches(tmp_path):
    ctx, _, _ = built(tmp_path, "a")
    sizes = [len(ctx.partition.train[c]) for c in sample_clients(ctx.config, 1)]
    assert len(set(-(-n // 8) for n in sizes)) > 2  # several different numbers of steps
    assert sum(n % 8 != 0 for n in sizes) >= 3


@pytest.mark.parametrize("case", CASES)
def test_one_round_together_equals_one_at_a_time(tmp_path, case, groups_trained):
    alone_ctx, method, alone = built(tmp_path, "alone", **CASES[case])
    train_round(alone_ctx, method, alone, 1)
    assert groups_trained == []
    ctx, method, stacked = built(tmp_path, "together", **CASES[case], client_batch=4)
    train_round(ctx, method, stacked, 1)
    assert groups_trained == [4, 2]  # 6 participants, 4 at a time
    tolerance = TIGHTER if ctx.config.optimizer == "sgd" else TIGHT
    assert alone.shared.keys() == stacked.shared.keys()
    compared = [(name, stacked.shared[name], tensor) for name, tensor in alone.shared.items()]
    if ctx.local_names:  # every client's local tensors
        compared += [(name, stacked.local.tensors[name], tensor) for name, tensor in alone.local.tensors.items()]
    for name, got, wanted in compared:
        if ctx.config.optimizer != "sgd":
            got, wanted = without_key_biases(name, got), without_key_biases(name, wanted)
        torch.testing.assert_close(got, wanted, **tolerance, msg=name)


def test_a_client_with_fewer_batches_leaves_the_stack_unchanged_by_the_others(tmp_path):
    """Client 0 runs out of batches first; what the rest train afterwards must not move its tensors: they
    equal its training alone (SGD with momentum and weight decay: a zero gradient would still move them)."""
    ctx, method, state = built(tmp_path, "mask", personalize="all", optimizer="sgd", lr=0.05, weight_decay=0.1)
    clients = sorted(sample_clients(ctx.config, 1), key=lambda c: len(ctx.partition.train[c]))
    shortest, longest = clients[0], clients[-1]
    assert -(-len(ctx.partition.train[shortest]) // 8) < -(-len(ctx.partition.train[longest]) // 8)
    trainable = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
    contexts = [client_context(ctx, c, 1, {}, TRAIN_STREAM) for c in (shortest, longest)]
    short, _ = together.train_together(ctx, state, contexts, trainable)
    (alone,) = together.train_together(ctx, state, [client_context(ctx, shortest, 1, {}, TRAIN_STREAM)], trainable)
    for name, tensor in alone.tensors.items():
        torch.testing.assert_close(short.tensors[name], tensor, **TIGHTER, msg=name)


def test_a_few_rounds_together_give_the_same_tables(tmp_path):
    """SGD (momentum, weight decay): over rounds AdamW turns float noise into visible differences in this tiny
    setting, in the one-at-a-time path alone as well (written-out attention in place of the fused kernel
    moves its round-2 losses by ~0.2), so the tables are compared where float noise stays float noise."""
    settings = dict(TINY, personalize="attn,head", rounds=3, eval_protocol="paper", optimizer="sgd", lr=0.05)
    settings["weight_decay"] = 0.01
    alone = federation.run(RunConfig(**settings, out=str(tmp_path / "alone")), quiet=True)
    stacked = federation.run(RunConfig(**settings, out=str(tmp_path / "together"), client_batch=6), quiet=True)
    order = ["round", "protocol", "client"]
    a = alone.metrics.sort_values(order).reset_index(drop=True)
    b = stacked.metrics.sort_values(order).reset_index(drop=True)
    measured = ["loss", "accuracy"]
    pd.testing.assert_frame_equal(a.drop(columns=measured), b.drop(columns=measured))
    assert len(a) == 3 * 2 * 6
    assert (a["loss"] - b["loss"]).abs().max() < 1e-4
    assert (a["accuracy"] - b["accuracy"]).abs().max() == 0
    accuracy = [column for column in alone.rounds if column.startswith("acc_")]
    assert "acc_mean" in accuracy
    assert (alone.rounds[accuracy] - stacked.rounds[accuracy]).abs().max().max() == 0


def test_the_first_diverged_client_in_client_order_is_named(tmp_path):
    names = []
    for k in (1, 4):
        ctx, method, state = built(tmp_path, f"nan{k}", personalize="head", client_batch=k)
        weight = state.local.tensors["head.weight"]
        weight[3] = float("nan")  # clients 3 and 1 diverge; 1 comes first in client order
        weight[1] = float("nan")
        with pytest.raises(NonFiniteLoss) as raised:
            train_round(ctx, method, state, 1)
        names.append(raised.value.client)
    assert names == [1, 1]


def test_a_diverged_client_does_not_spill_into_the_others(tmp_path):
    ctx, method, state = built(tmp_path, "spill", personalize="head")
    state.local.tensors["head.weight"][2] = float("inf")
    trainable = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
    contexts = [client_context(ctx, c, 1, {}, TRAIN_STREAM) for c in (1, 2, 3)]
    results = together.train_together(ctx, state, contexts, trainable)
    assert [r.nonfinite_loss is None for r in results] == [True, False, True]
    assert all(bool(torch.isfinite(t).all()) for r in (results[0], results[2]) for t in r.tensors.values())


def test_methods_that_train_their_own_way_keep_the_one_at_a_time_path(tmp_path, groups_trained):
    own_way = {name for name, cls in METHODS.items() if not cls.trains_plainly}
    assert own_way == {"apfl", "perfedavg", "fedrep", "fedbabu"}
    ctx, method, state = built(tmp_path, "fedrep", method="fedrep", client_batch=4)
    assert "trains its clients its own way" in together.sequential_reason(ctx, method)
    alone_ctx, alone_method, alone = built(tmp_path, "fedrep-alone", method="fedrep")
    train_round(ctx, method, state, 1)
    train_round(alone_ctx, alone_method, alone, 1)
    assert groups_trained == []
    for name in alone.shared:  # the same path: bit for bit
        assert torch.equal(state.shared[name], alone.shared[name])


class Recorder(Hook):
    """Each client's head as it starts and ends; it also shrinks client 2's starting head (a hook may change
    the model it is given, and the client then trains from that)."""

    def __init__(self):
        self.starts: dict[int, torch.Tensor] = {}
        self.ends: dict[int, torch.Tensor] = {}

    def on_client_start(self, round, client, model):
        if client == 2:
            with torch.no_grad():
                model.head.weight.mul_(0.5)
        self.starts[client] = model.head.weight.detach().clone()

    def on_client_end(self, round, client, model):
        self.ends[client] = model.head.weight.detach().clone()


def test_hooks_see_each_client_start_and_end_as_one_at_a_time(tmp_path, groups_trained):
    sgd = dict(personalize="head", optimizer="sgd", lr=0.05, weight_decay=0.01)
    recorded = []
    for k in (1, 4):
        ctx, method, state = built(tmp_path, f"hooks{k}", **sgd, client_batch=k)
        assert together.sequential_reason(ctx, method) is None
        hook = Recorder()
        train_round(ctx, method, state, 1, [hook])
        recorded.append((hook, state.local.tensors["head.weight"].clone()))
    assert groups_trained == [4, 2]
    (alone, alone_heads), (stacked, stacked_heads) = recorded
    assert sorted(stacked.starts) == sorted(stacked.ends) == sample_clients(RunConfig(**TINY), 1)
    for c in alone.starts:
        assert torch.equal(stacked.starts[c], alone.starts[c])
        torch.testing.assert_close(stacked.ends[c], alone.ends[c], **TIGHTER)
    torch.testing.assert_close(stacked_heads, alone_heads, **TIGHTER)  # client 2 trained from the hook's head


def test_a_run_says_when_its_clients_train_one_at_a_time_despite_client_batch(tmp_path, capsys):
    federation.run(RunConfig(**TINY, method="perfedavg", rounds=1, client_batch=3, out=str(tmp_path / "p")))
    assert "--client-batch 3: method perfedavg trains its clients its own way" in capsys.readouterr().out


def test_a_model_that_drops_at_random_keeps_the_one_at_a_time_path(tmp_path):
    ctx, method, _ = built(tmp_path, "dropout", model_args={"drop_rate": 0.1})
    assert "drops at random" in together.sequential_reason(ctx, method)


def test_client_batch_is_checked_and_free_to_change_on_resume(tmp_path):
    from fedsens.personalize.errors import UserError

    with pytest.raises(UserError, match="--client-batch must be at least 1"):
        RunConfig(client_batch=0)
    out = tmp_path / "old"
    federation.run(RunConfig(**TINY, rounds=1, out=str(out)), quiet=True)
    # an older fedsens recorded no client_batch: its checkpoint and config.json resume all the same
    checkpoint = runio.load_checkpoint(out / "checkpoint.pt")
    settings = json.loads(checkpoint["settings"])
    del settings["client_batch"]
    runio.save_checkpoint(out / "checkpoint.pt", {**checkpoint, "settings": json.dumps(settings)})
    resumed = federation.run(RunConfig(**TINY, rounds=2, out=str(out), client_batch=3), resume=True, quiet=True)
    assert list(resumed.rounds["round"]) == [1, 2]
