"""The CUDA path (bf16 autocast, data on the device, batched evaluation, the disk store, repeatability):
skipped on machines without a GPU; benchmarks/gpu_check.sh runs them on one."""

import pandas as pd
import pytest
import torch

from fedsens.personalize.federation import RunConfig, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = dict(dataset="synthetic", model="vit-nano", clients=4, join_ratio=1.0, rounds=4, local_epochs=2, alpha=1.0)


@pytest.mark.parametrize("method", ["fedavg", "fedperfix", "apfl"])
def test_a_short_run_on_cuda_learns_and_matches_the_cpu_run(tmp_path, method):
    gpu = run(RunConfig(out=str(tmp_path / "gpu"), device="cuda", method=method, **TINY), quiet=True)
    cpu = run(RunConfig(out=str(tmp_path / "cpu"), device="cpu", method=method, **TINY), quiet=True)
    assert gpu.summary["acc_best"] > 0.3  # ten classes: chance is 0.1
    # bf16 autocast on the GPU, fp32 on the CPU: same partition and init, close but not equal accuracy
    assert abs(gpu.summary["acc_last"] - cpu.summary["acc_last"]) < 0.25
    assert gpu.summary["comm_bytes_per_round"] == cpu.summary["comm_bytes_per_round"]


SMALL = dict(dataset="synthetic", model="vit-nano", clients=6, join_ratio=0.5, rounds=2, local_steps=2, batch_size=16)


def _trained_round(tmp_path, **changes):
    from fedsens.personalize.engine.context import build_context
    from fedsens.personalize.engine.rounds import train_round
    from fedsens.personalize.engine.state import start_state
    from fedsens.personalize.methods import get_method

    config = RunConfig(out=str(tmp_path), device="cuda", **{**SMALL, **changes})
    method = get_method(config)
    ctx = build_context(config, method, tmp_path)
    state = start_state(ctx, method, resume=False, overwrite=True)
    train_round(ctx, method, state, 1)
    return ctx, method, state


def test_training_on_cuda_runs_in_bf16_and_keeps_fp32_weights(tmp_path):
    ctx, _, state = _trained_round(tmp_path)
    x = ctx.prepare(ctx.images[:4])
    assert x.device.type == "cuda"
    with ctx.autocast():
        assert ctx.model(x).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in ctx.model.parameters())
    assert all(t.dtype == torch.float32 for t in state.shared.values() if t.is_floating_point())


@pytest.mark.parametrize("personalize", ["none", "head", "attn,head"])
def test_batched_evaluation_on_cuda_equals_one_client_at_a_time(tmp_path, personalize):
    from fedsens.personalize.evaluation import evaluate_clients

    ctx, method, state = _trained_round(tmp_path, personalize=personalize)
    args = (ctx, method, 1, list(range(SMALL["clients"])), state.shared, state.local, state.extra)
    batched, alone = evaluate_clients(*args), evaluate_clients(*args, batched=False)
    assert [r.n for r in batched] == [r.n for r in alone]
    # bf16 on the GPU: batching changes the order of the sums, so losses agree to bf16's precision
    assert [r.loss for r in batched] == pytest.approx([r.loss for r in alone], rel=2e-2, abs=1e-2)


def test_disk_store_on_cuda_gives_the_memory_store_run(tmp_path):
    runs = [
        run(
            RunConfig(out=str(tmp_path / s), device="cuda", client_store=s, personalize="attn,head", **SMALL),
            quiet=True,
        )
        for s in ("memory", "disk")
    ]
    pd.testing.assert_frame_equal(runs[0].metrics, runs[1].metrics)
    assert any((tmp_path / "disk" / "clients").rglob("*.bin"))


def test_two_identical_cuda_runs_give_identical_tables(tmp_path):
    runs = [run(RunConfig(out=str(tmp_path / n), device="cuda", **SMALL), quiet=True) for n in ("first", "second")]
    pd.testing.assert_frame_equal(runs[0].metrics, runs[1].metrics)
    columns = ["round", "acc_mean", "acc_std", "up_bytes"]
    pd.testing.assert_frame_equal(runs[0].rounds[columns], runs[1].rounds[columns])
