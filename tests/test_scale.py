"""Costs that do not grow with rounds or clients: batched evaluation, compact client state, resume."""

import os
import statistics
import time

import pandas as pd
import pytest
import torch

from fedsens.personalize import federation, runio
from fedsens.personalize.aggregation import RunningMean
from fedsens.personalize.config import RunConfig
from fedsens.personalize.engine.context import build_context
from fedsens.personalize.engine.rounds import train_round
from fedsens.personalize.engine.state import start_state
from fedsens.personalize.evaluation import evaluate_clients
from fedsens.personalize.methods import METHODS, get_method, weighted_mean

TINY = dict(
    dataset="synthetic", model="vit-nano", clients=6, join_ratio=0.5, rounds=2, local_steps=2, batch_size=16, alpha=1.0
)


def test_running_mean_matches_weighted_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 3, generator=g), "n": torch.tensor(i)} for i in range(7)]
    weights = [3, 1, 4, 1, 5, 9, 2]
    running = RunningMean(weights)
    for state in states:
        running.add(state)
    # the textbook sum, in float64 with each state's share, is what both give bit for bit
    total = sum(weights)
    expected = sum(s["w"].to(torch.float64) * (w / total) for s, w in zip(states, weights)).to(torch.float32)
    assert torch.equal(running.result()["w"], expected) and running.result()["n"].item() == 0
    assert torch.equal(weighted_mean(states, weights)["w"], expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_evaluation_equals_one_client_at_a_time(tmp_path, method):
    extra = {"personalize": "attn,head"} if method == "fedavg" else {}
    config = RunConfig(out=str(tmp_path), method=method, **{**TINY, **extra})
    algorithm = get_method(config)
    ctx = build_context(config, algorithm, tmp_path)
    state = start_state(ctx, algorithm, resume=False, overwrite=True)
    train_round(ctx, algorithm, state, 1)
    clients = list(range(config.clients))
    args = (ctx, algorithm, 1, clients, state.shared, state.local, state.extra)
    batched = evaluate_clients(*args)
    alone = evaluate_clients(*args, batched=False)
    for a, b in zip(batched, alone):
        assert a.n == b.n
        assert a.accuracy == pytest.approx(b.accuracy, abs=1e-9)
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("personalize", ["none", "head"])
def test_fedavg_and_head_local_take_the_batched_paths_and_agree(tmp_path, personalize):
    config = RunConfig(out=str(tmp_path), personalize=personalize, **TINY)
    algorithm = get_method(config)
    ctx = build_context(config, algorithm, tmp_path)
    state = start_state(ctx, algorithm, resume=False, overwrite=True)
    train_round(ctx, algorithm, state, 1)
    args = (ctx, algorithm, 1, [4, 0, 2], state.shared, state.local, state.extra)
    batched, alone = evaluate_clients(*args), evaluate_clients(*args, batched=False)
    assert [r.loss for r in batched] == pytest.approx([r.loss for r in alone], rel=1e-4)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_round_50_bookkeeping_costs_what_round_2_does(tmp_path, monkeypatch):
    spent: dict[int, float] = {}
    rss: dict[int, float] = {}
    sizes: dict[int, int] = {}
    real_save, real_append = runio.save_checkpoint, runio.append_rows

    def timed_save(path, state):
        started = time.perf_counter()
        real_save(path, state)
        spent[state["round"]] = spent.get(state["round"], 0.0) + time.perf_counter() - started
        rss[state["round"]] = _rss_mb()
        sizes[state["round"]] = path.stat().st_size

    def timed_append(path, rows, columns):
        started = time.perf_counter()
        size = real_append(path, rows, columns)
        key = len(spent) + 1
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - started
        return size

    monkeypatch.setattr(runio, "save_checkpoint", timed_save)
    monkeypatch.setattr(runio, "append_rows", timed_append)
    config = dict(TINY, clients=4, rounds=50, local_steps=1, personalize="head")
    federation.run(RunConfig(out=str(tmp_path), **config), quiet=True)
    assert sizes[50] <= sizes[2] * 1.05  # the checkpoint holds state, not history
    early = statistics.median(spent[r] for r in range(2, 7))  # medians: single rounds are noisy on a busy machine
    late = statistics.median(spent[r] for r in range(46, 51))
    assert late < 3 * early + 0.02, (early, late)
    assert rss[50] < rss[2] * 1.1 + 10, (rss[2], rss[50])
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 50 * 4 * 2  # both evaluation protocols


class Killer:
    table = "killer"

    def on_run_start(self, ctx):
        pass

    def on_client_start(self, round_, client, model):
        pass

    def on_client_end(self, round_, client, model):
        pass

    def on_round_end(self, round_):
        if round_ == 3:
            raise KeyboardInterrupt("killed")
        return [{"round": round_, "value": float(round_)}]


@pytest.mark.parametrize(
    "store,every,method", [("memory", 1, "fedavg"), ("disk", 1, "fedavg"), ("memory", 2, "apfl"), ("disk", 2, "apfl")]
)
def test_a_killed_run_resumes_exactly_for_both_stores(tmp_path, store, every, method):
    extra = {"personalize": "head"} if method == "fedavg" else {}
    config = dict(TINY, rounds=4, client_store=store, checkpoint_every=every, method=method, **extra)
    whole = federation.run(RunConfig(out=str(tmp_path / "whole"), **config), hooks=[Quiet()], quiet=True)
    cut = RunConfig(out=str(tmp_path / "cut"), **config)
    with pytest.raises(KeyboardInterrupt):
        federation.run(cut, hooks=[Killer()], quiet=True)
    assert runio.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["round"] == (2 if every <= 2 else 0)
    resumed = federation.run(cut, hooks=[Quiet()], resume=True, quiet=True)
    pd.testing.assert_frame_equal(whole.metrics, resumed.metrics)
    pd.testing.assert_frame_equal(whole.tables["killer"], resumed.tables["killer"])
    cols = ["round", "acc_mean", "acc_std", "up_bytes"]
    pd.testing.assert_frame_equal(whole.rounds[cols], resumed.rounds[cols])
    if store == "disk":
        assert any((tmp_path / "cut" / "clients").rglob("*.bin"))  # one file per local tensor


class Quiet(Killer):
    def on_round_end(self, round_):
        return [{"round": round_, "value": float(round_)}]


def test_synthetic_population_of_any_size_from_the_config(tmp_path):
    config = RunConfig(
        out=str(tmp_path), **{**TINY, "clients": 300, "rounds": 1, "join_ratio": 0.01, "scheme": "iid"},
        data_options={"num_samples": 300 * 4, "image_size": 8, "num_classes": 3},
    )  # fmt: skip
    result = federation.run(config, quiet=True)
    assert len(result.metrics) == 2 * 300 and set(result.metrics["n"]) == {1}  # both protocols; 3 train, 1 test each
    assert (result.metrics["accuracy"] >= 0).all()


def test_bench_smoke_writes_the_table(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app

    out = tmp_path / "bench"
    args = ["bench", "--clients", "6", "--local", "head", "--rounds", "1", "--join-ratio", "0.5"]
    done = CliRunner().invoke(app, [*args, "--model", "vit-nano", "--per-client", "4", "--out", str(out), "--quiet"])
    assert done.exit_code == 0, done.output
    table = pd.read_csv(out / "bench.csv")
    for column in ("config", "clients", "personalize", "s_per_round", "train_ratio", "eval_ratio", "peak_rss_mb"):
        assert column in table
    assert set(table["loop"]) == {"fedsens", "pfllib"} and (table["local_bytes"] > 0).all()
    assert (table["train_ratio"] > 0).all() and (table["peak_rss_mb"] > 0).all()
    assert (table["achieved_over_peak"] > 0).all() and (table["round_gflop"] > 0).all()


def test_batched_evaluation_keeps_no_autograd_graph(tmp_path):
    config = RunConfig(out=str(tmp_path), personalize="head", **TINY)
    algorithm = get_method(config)
    ctx = build_context(config, algorithm, tmp_path)
    state = start_state(ctx, algorithm, resume=False, overwrite=True)
    seen = []
    handle = ctx.model.blocks[0].register_forward_hook(lambda module, args, output: seen.append(output.requires_grad))
    evaluate_clients(ctx, algorithm, 1, [0, 1], state.shared, state.local, state.extra)
    handle.remove()
    assert seen and not any(seen)  # activations of earlier batches are not kept alive


def _rss_file_mb() -> float:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["RssFile"].split()[0]) / 1024


def test_disk_store_reads_and_writes_rows_like_the_memory_store(tmp_path):
    from fedsens.personalize.clientstore import ClientStore

    g = torch.Generator().manual_seed(0)
    first = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16)}
    stores = [ClientStore.build(50, first), ClientStore.build(50, first, folder=tmp_path / "disk")]
    for c in (7, 8, 9, 31, 0):
        new = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16)}
        for store in stores:
            store.put(c, new)
    stores[1].commit()
    stores[1].put(12, {"w": torch.ones(3, 4), "b": torch.ones(4, dtype=torch.bfloat16)})  # pending, not committed
    stores[0].put(12, {"w": torch.ones(3, 4), "b": torch.ones(4, dtype=torch.bfloat16)})
    for clients in ([8, 9, 10, 11, 12], [31, 0, 31, 7], list(range(50))):
        memory, disk = stores[0].rows(clients), stores[1].rows(clients)
        assert all(torch.equal(memory[n], disk[n]) for n in first)
    assert all(torch.equal(stores[0].client(12)[n], stores[1].client(12)[n]) for n in first)
    stores[1].close()
    reopened = ClientStore.open(50, stores[1].layout, tmp_path / "disk")
    assert torch.equal(reopened.rows([9])["w"], stores[0].rows([9])["w"])
    assert not torch.equal(reopened.rows([12])["w"], torch.ones(1, 3, 4))  # the pending row never reached the file


def test_reading_the_whole_disk_store_does_not_stay_in_resident_memory(tmp_path):
    from fedsens.personalize.clientstore import ClientStore

    store = ClientStore.build(2048, {"w": torch.zeros(64, 256)}, folder=tmp_path / "disk")  # 128 MB of rows
    before = _rss_file_mb()
    for start in range(0, 2048, 128):
        assert store.rows(list(range(start, start + 128)))["w"].shape == (128, 64, 256)
    assert _rss_file_mb() - before < 32  # a memory mapping would keep all 128 MB resident


def test_a_truncated_disk_store_file_is_one_clear_error(tmp_path):
    from fedsens.personalize.clientstore import ClientStore
    from fedsens.personalize.errors import CorruptFileError

    store = ClientStore.build(10, {"w": torch.zeros(4)}, folder=tmp_path / "disk")
    store.close()
    path = next((tmp_path / "disk").glob("*.bin"))
    with open(path, "r+b") as handle:
        handle.truncate(20)
    with pytest.raises(CorruptFileError, match="expected 160 bytes"):
        ClientStore.open(10, {"w": ((4,), torch.float32)}, tmp_path / "disk")


@pytest.mark.parametrize("domains", [0, 3])
def test_synthetic_images_drawn_block_by_block_equal_one_draw(monkeypatch, domains):
    from fedsens.personalize.datasets import synthetic

    whole = synthetic.load(None, num_samples=1000, image_size=8, num_domains=domains)
    monkeypatch.setattr(synthetic, "SAMPLES_PER_DRAW", 64)
    blocks = synthetic.load(None, num_samples=1000, image_size=8, num_domains=domains)
    assert torch.equal(whole.images, blocks.images) and torch.equal(whole.labels, blocks.labels)
    if domains:
        assert torch.equal(whole.domains, blocks.domains)


@pytest.mark.parametrize("method", ["fedavg", "fedperfix", "apfl"])
def test_disk_and_memory_stores_give_the_same_run(tmp_path, method):
    extra = {"personalize": "attn,head"} if method == "fedavg" else {}
    runs = [
        federation.run(RunConfig(out=str(tmp_path / store), client_store=store, method=method, **{**TINY, **extra}))
        for store in ("memory", "disk")
    ]
    pd.testing.assert_frame_equal(runs[0].metrics, runs[1].metrics)


def test_bench_throughput_writes_images_per_second_for_both_loops(tmp_path):
    from typer.testing import CliRunner

    from fedsens.cli import app

    out = tmp_path / "thr"
    args = ["bench", "--throughput", "--model", "vit-nano", "--batch-size", "8", "--steps", "2", "--local", "head"]
    done = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(out)])
    assert done.exit_code == 0, done.output
    table = pd.read_csv(out / "throughput.csv")
    assert list(table["personalize"]) == ["none", "head"] and (table["device"] == "cpu").all()
    assert (table["fedsens_images_s"] > 0).all() and (table["plain_images_s"] > 0).all()
    assert table["ratio"].to_numpy() == pytest.approx((table["fedsens_images_s"] / table["plain_images_s"]).to_numpy())
    assert "images/s" in done.output
    assert (table["train_gflop_per_image"] > 0).all() and (table["peak_tflop_s"] > 0).all()
    assert table["fedsens_mfu"].to_numpy() == pytest.approx(
        (table["fedsens_images_s"] * table["train_gflop_per_image"] / 1e3 / table["peak_tflop_s"]).to_numpy()
    )
    assert "model FLOPs utilisation" in done.output


def test_running_mean_of_nothing_shared_and_a_run_with_every_part_local(tmp_path):
    running = RunningMean([1, 2])
    running.add({})
    running.add({})
    assert running.result() == {}
    result = federation.run(RunConfig(out=str(tmp_path), personalize="all", **TINY), quiet=True)
    assert result.summary["status"] == "done" and result.summary["shared_params"] == 0
