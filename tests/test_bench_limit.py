"""`fedsens bench`'s arithmetic limit: FLOPs counted on the real model, the measured matmul peak, achieved / peak."""

import math

import pandas as pd
import pytest
import torch

from fedsens.personalize import benchmark
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import sample_clients
from fedsens.personalize.methods import get_method


def _vit_micro_on_digits_by_hand() -> tuple[int, int]:
    """vit-micro on the 8x8 digits (patch 4: 4 patches + the class token = 5 tokens, width 96, 4 blocks, MLP 384,
    10 classes): a product of (m x k) by (k x n) is 2mkn FLOPs. Returns (forward, forward + backward)."""
    tokens, width, hidden, depth = 5, 96, 384, 4
    patches = 2 * 4 * (4 * 4) * width  # the patch embedding: one grey 4x4 patch -> 96 channels, 4 times
    linear = 2 * tokens * width * (3 * width + width + 2 * hidden)  # qkv, projection, fc1, fc2
    attention = 2 * (2 * tokens * tokens * width)  # scores and their product with the values, all heads
    head = 2 * width * 10  # the class token only
    forward = patches + depth * (linear + attention) + head
    # Backward: twice the forward for every product (input and weight gradients) but the patch embedding, whose
    # input (the image) needs no gradient; torch's attention backward counts 5 products against 2 forward.
    backward = patches + depth * (2 * linear + 5 * attention // 2) + 2 * head
    return forward, forward + backward


def test_flops_are_counted_on_the_run_model_and_equal_a_hand_count(tmp_path):
    config = RunConfig(out=str(tmp_path))  # the embedded default: digits, vit-micro
    ctx = build_context(config, get_method(config), tmp_path)
    train, test = benchmark.count_flops(ctx)
    forward, forward_backward = _vit_micro_on_digits_by_hand()
    assert test == forward  # attention included on the CPU too
    assert train == forward_backward
    assert not any(p.grad is not None for p in ctx.model.parameters())  # counted on a copy


def test_peak_is_the_best_timed_product_after_a_warm_up(monkeypatch):
    durations = iter([5.0, 0.4, 0.25, 0.5])  # the warm-up (slowest), then three timed products
    clock = {"now": 0.0}

    def perf_counter() -> float:
        clock["now"] += clock.pop("next", 0.0)
        return clock["now"]

    real_mm = torch.mm

    def timed_mm(a, b):
        clock["next"] = next(durations)
        return real_mm(a, b)

    monkeypatch.setattr(benchmark.time, "perf_counter", perf_counter)
    monkeypatch.setattr(benchmark.torch, "mm", timed_mm)
    assert benchmark.measure_peak_flops("cpu", side=64, repeats=3) == pytest.approx(2 * 64**3 / 0.25)


def test_peak_of_this_cpu_is_a_plausible_rate():
    peak = benchmark.measure_peak_flops("cpu", side=256, repeats=2)
    assert 1e8 < peak < 1e14


def test_bench_of_a_preset_reports_its_round_against_the_limit(tmp_path):
    case = benchmark.BenchCase(clients=0, personalize="head", rounds=1, preset="embedded")
    row = benchmark.measure(case, tmp_path / "run")
    assert row["config"] == "embedded-head-fedsens" and row["dataset"] == "digits" and row["clients"] == 20
    config = case.run_config(tmp_path / "again")
    ctx = build_context(config, get_method(config), tmp_path / "again")
    participants = sample_clients(config, 1)
    trained = sum(len(ctx.partition.train[c]) for c in participants) * config.local_epochs
    assert row["train_samples"] == trained
    assert row["test_samples"] == sum(len(t) for t in ctx.partition.test)
    train, test = benchmark.count_flops(ctx)
    assert row["round_gflop"] == pytest.approx((trained * train + row["test_samples"] * test) / 1e9)
    assert row["achieved_over_peak"] == pytest.approx(row["round_gflop"] / row["s_per_round"] / row["peak_gflop_s"])
    assert row["limit_s"] == pytest.approx(row["round_gflop"] / row["peak_gflop_s"])
    assert 0 < row["achieved_over_peak"] < row["bare_over_peak"] * 3 and row["threads"] == torch.get_num_threads()


def test_bench_command_with_a_preset_writes_the_limit_columns(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app

    out = tmp_path / "bench"
    args = ["bench", "--preset", "embedded", "--local", "none", "--rounds", "1", "--reference-up-to", "0"]
    done = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert done.exit_code == 0, done.output
    (row,) = pd.read_csv(out / "bench.csv").to_dict("records")
    assert row["config"] == "embedded-none-fedsens" and row["model"] == "vit-micro"
    for column in ("train_mflop_per_sample", "round_gflop", "peak_gflop_s", "achieved_over_peak", "limit_s"):
        assert math.isfinite(row[column]) and row[column] > 0
    assert '"achieved_over_peak"' in done.output  # the per-configuration line gives it


def test_bench_rejects_an_unknown_preset(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app

    done = CliRunner().invoke(app, ["bench", "--preset", "nope", "--out", str(tmp_path)])
    assert done.exit_code != 0 and "unknown preset 'nope'" in done.output


def test_bare_loop_does_the_engines_steps_bit_for_bit(tmp_path):
    """The bare loop's optimizer is the engine's (`client.build_optimizer`): the same participant from the same
    start ends with the same tensors. (It once built AdamW with torch's default weight decay, 0.01, where the
    run's is 0.0: other steps than the ones it was timed against.)"""
    from fedsens.personalize.engine.rounds import train_round
    from fedsens.personalize.engine.state import start_state
    from fedsens.personalize.hooks import Hook

    config = RunConfig(model="vit-nano", clients=4, join_ratio=0.25, out=str(tmp_path))
    method = get_method(config)
    ctx = build_context(config, method, tmp_path)
    state = start_state(ctx, method, resume=False, overwrite=True)
    start = {n: t.detach().clone() for n, t in ctx.model.state_dict().items()}

    class Trained(Hook):
        tensors: dict[str, torch.Tensor] = {}

        def on_client_end(self, round: int, client: int, model: torch.nn.Module) -> None:
            self.tensors = {n: t.detach().clone() for n, t in model.state_dict().items()}

    trained = Trained()
    participants = sample_clients(config, 1)
    train_round(ctx, method, state, 1, [trained])
    ctx.model.load_state_dict(start)
    _, samples = benchmark.bare_train(ctx, participants, 1)
    assert samples > 0
    for name, tensor in ctx.model.state_dict().items():
        assert torch.equal(tensor, trained.tensors[name]), name
