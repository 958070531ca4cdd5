"""The per-client statistics on constructed tables with a known answer (sensitivity/stats.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsens.personalize import ranks
from fedsens.sensitivity import stats
from fedsens.sensitivity.ranking import rank, seed_half_agreement

PARTITION = dict(dataset="digits", scheme="dirichlet", alpha=0.3)


def _metrics(effects: dict[str, float], *, seeds: int = 3, clients: int = 20, rounds: int = 10, seed: int = 0):
    """A sweep's metrics.csv: per-client accuracies = a seed effect + a client effect + the part's planted effect
    + round-to-round noise; FedAvg (`none`) has effect 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(seeds):
        seed_level = rng.normal(0.6, 0.05)
        client_level = rng.normal(0, 0.08, clients)
        for part, effect in {"none": 0.0, **effects}.items():
            part_client = rng.normal(0, 0.03, clients)  # how a part helps each client differs
            for r in range(1, rounds + 1):
                accuracy = seed_level + client_level + effect + part_client + rng.normal(0, 0.02, clients)
                for c in range(clients):
                    rows.append(
                        dict(
                            cell=f"s{s}-{part}",
                            local_part=part,
                            seed=s,
                            **PARTITION,
                            round=r,
                            client=c,
                            split="test",
                            accuracy=accuracy[c],
                        )
                    )
    return pd.DataFrame(rows)


def test_tail_is_the_last_fifth_of_rounds_and_at_least_three():
    assert [stats.tail_count(n) for n in (1, 2, 3, 10, 15, 20, 40)] == [1, 2, 3, 3, 3, 4, 8]
    rounds = pd.DataFrame(dict(round=range(1, 11), acc_mean=[0.1] * 7 + [0.5, 0.6, 0.7]))
    rounds.loc[8, "acc_mean"] = np.nan  # round 9 not evaluated: the tail is rounds 7, 8, 10
    assert stats.tail_accuracy(rounds) == dict(acc_tail=pytest.approx((0.1 + 0.5 + 0.7) / 3), tail_rounds=3)


def test_paired_gains_cancel_the_shared_seed_and_client_effects():
    gains = stats.paired_gains(stats.client_outcomes(_metrics({"head": 0.1})))
    head = gains[gains["local_part"] == "head"]
    assert len(head) == 3 * 20
    # the seed (sd 0.05) and client (sd 0.08) effects cancel: what is left is the part's per-client spread
    assert head["gain"].mean() == pytest.approx(0.1, abs=0.02)
    assert head["gain"].std() < 0.06


def test_a_planted_effect_is_found_and_ordered():
    metrics = _metrics({"head": 0.12, "attn": 0.06, "mlp": 0.0, "norm": 0.0}, seeds=4)
    gains = stats.paired_gains(stats.client_outcomes(metrics))
    low, high = stats.hierarchical_bootstrap(stats.seed_client_matrix(gains, "head"))
    assert 0.05 < low < 0.12 < high < 0.19
    low, high = stats.hierarchical_bootstrap(stats.seed_client_matrix(gains, "mlp"))
    assert low < 0 < high
    wide = stats.blocks_by_parts(gains, ["head", "attn", "mlp", "norm"])
    p, mean_rank = stats.friedman(wide)
    assert p < 1e-6 and mean_rank["head"] < mean_rank["attn"] < min(mean_rank["mlp"], mean_rank["norm"])
    resolved = stats.adjacent_resolution(gains, ["head", "attn", "mlp", "norm"]).set_index("part")
    assert resolved.loc["head", "resolved_vs_next"] and resolved.loc["attn", "resolved_vs_next"]
    assert not resolved.loc["mlp", "resolved_vs_next"]  # mlp and norm have the same (zero) effect
    assert resolved.loc["head", "p_vs_next"] < 0.01 and resolved.loc["mlp", "p_vs_next"] > 0.01


def test_no_effect_gives_bootstrap_intervals_covering_zero_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    draws = 300
    seed_level = rng.normal(0, 0.05, (draws, 3, 1))  # 3 seeds, as the quick preset
    gains = seed_level + rng.normal(0, 0.1, (draws, 3, 20))
    intervals = np.array([stats.hierarchical_bootstrap(g, draws=500, seed=i) for i, g in enumerate(gains)])
    covered = np.mean((intervals[:, 0] <= 0) & (0 <= intervals[:, 1]))
    assert 0.9 <= covered <= 0.99, covered


def test_holm_matches_its_definition():
    adjusted = stats.holm(np.array([0.04, 0.01, 0.03, 0.2]))
    # sorted 0.01*4, 0.03*3, 0.04*2, 0.2*1, made monotone
    assert adjusted == pytest.approx([0.09, 0.04, 0.09, 0.2])


def test_kendall_tau_between_seed_halves():
    assert stats.seed_halves([4, 0, 2, 1, 3]) == ([0, 1, 2], [3, 4])
    a = pd.Series({"head": 3, "attn": 2, "mlp": 1})
    assert ranks.kendall_tau(a, a * 2) == pytest.approx(1.0)
    assert ranks.kendall_tau(a, -a) == pytest.approx(-1.0)
    assert np.isnan(ranks.kendall_tau(a, pd.Series({"head": 1.0})))


def test_ranking_carries_the_client_statistics():
    metrics = _metrics({"head": 0.12, "attn": 0.06, "mlp": 0.0}, seeds=3)
    outcomes = stats.client_outcomes(metrics)
    per_seed = outcomes.groupby(["seed", "local_part"])["acc_tail"].mean().rename("acc_tail").reset_index()
    fedavg = per_seed[per_seed["local_part"] == "none"].set_index("seed")["acc_tail"]
    sensitivity = per_seed.assign(
        **PARTITION,
        status="done",
        gain_vs_fedavg=0.0,  # the final round says nothing here: the ranking must use the tail gain
        gain_tail_vs_fedavg=per_seed["acc_tail"] - per_seed["seed"].map(fedavg),
        **{f"div_{m}": np.nan for m in ("update_cos", "rel_drift", "weight_div", "cka")},
    )
    ranking = rank(sensitivity, stats.paired_gains(outcomes))
    block = ranking[ranking["metric"] == "gain_vs_fedavg"].set_index("part")
    assert list(block.index[:3]) == ["head", "attn", "mlp"]
    assert block.loc["head", "boot_low"] > 0 and block.loc["mlp", "boot_low"] < 0 < block.loc["mlp", "boot_high"]
    assert block.loc["head", "resolved_vs_next"] and block.loc["head", "friedman_p"] < 0.01
    assert block.loc["head", "score_last"] == 0.0


def test_seed_halves_agree_when_the_order_is_stable_and_not_when_it_flips():
    def table(flip_second_half: bool) -> pd.DataFrame:
        rows = [dict(seed=s, local_part="none", gain_tail_vs_fedavg=0.0) for s in range(4)]
        for s in range(4):
            for part, gain in {"head": 0.3, "attn": 0.2, "mlp": 0.1, "norm": 0.0}.items():
                value = -gain if (flip_second_half and s >= 2) else gain
                rows.append(dict(seed=s, local_part=part, gain_tail_vs_fedavg=value + 0.01 * s))
        frame = pd.DataFrame(rows).assign(**PARTITION, status="done", gain_vs_fedavg=0.0)
        return frame.assign(**{f"div_{m}": np.nan for m in ("update_cos", "rel_drift", "weight_div", "cka")})

    stable = seed_half_agreement(table(False)).iloc[0]
    assert (stable["seeds_a"], stable["seeds_b"]) == ("0,1", "2,3")
    assert stable["kendall_tau"] == pytest.approx(1.0) and stable["order_a"] == "head > attn > mlp > norm"
    flipped = seed_half_agreement(table(True)).iloc[0]
    assert flipped["kendall_tau"] == pytest.approx(-1.0) and flipped["order_b"] == "norm > mlp > attn > head"
