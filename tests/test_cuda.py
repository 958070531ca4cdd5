"""The CUDA path (bf16 autocast, data on the device): skipped on machines without a GPU."""

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
