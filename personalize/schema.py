"""The columns of every table fedsens writes, declared once: the writers, the readers, the reports and the
tests import them from here (DESIGN.md "Tables"). Torch-free, so readers of tables need no engine."""

from __future__ import annotations

# The parts of a ViT a spec can keep local, in the order figures and tables show them.
PART_TYPES = ("embed", "attn", "mlp", "norm", "head", "plugin")

# Divergence metrics between the participants' models (sensitivity.divergence), in report order.
DIVERGENCE_METRICS = ("update_cos", "rel_drift", "weight_div", "cka")

# The metric name of the sweep's accuracy ranking (ranking.csv) beside the divergence metrics.
GAIN = "gain_vs_fedavg"
# A cell's gain over FedAvg in its mean client accuracy over the last rounds (the sweep ranks by it; GAIN's
# block of ranking.csv then scores it).
TAIL_GAIN = "gain_tail_vs_fedavg"

# --- one run's folder (personalize.federation) -------------------------------------------------
# Evaluation protocols, both recorded in every evaluated round: metrics.csv's `protocol` says which one a
# row belongs to; rounds.csv's acc_* columns are the run's headline protocol (its `protocol` column) and
# acc_mean_<protocol> the mean under each. "paper" = the public FedPerfix code's timing.
EVAL_PROTOCOLS = ("after-aggregation", "paper")
# How clients get their samples (personalize.partition); config.json and partition.json name one.
SCHEMES = ("iid", "dirichlet", "pathological", "domain")
METRICS_COLUMNS = ["round", "client", "split", "loss", "accuracy", "n", "participated", "protocol"]
ROUNDS_COLUMNS = [
    "round",
    "acc_mean",
    "acc_std",
    "acc_p10",
    "acc_min",
    "jain",
    "protocol",
    "acc_mean_after_aggregation",
    "acc_mean_paper",
    "up_bytes",
    "down_bytes",
    "seconds",
]
DIVERGENCE_COLUMNS = ["round", "group", "part", "block", "metric", "value"]
PARTS_COLUMNS = ["param", "part", "block", "numel", "bytes", "local"]
# Models with stages (Swin, Swin V2: personalize.families) add the stage of each parameter after its block.
STAGED_PARTS_COLUMNS = ["param", "part", "block", "stage", "numel", "bytes", "local"]
# The run tables the round loop writes, by file stem (a hook's own table keeps the columns it emits).
RUN_TABLE_COLUMNS = {"metrics": METRICS_COLUMNS, "rounds": ROUNDS_COLUMNS, "divergence": DIVERGENCE_COLUMNS}
# The columns of those tables that hold numbers (empty = NaN is allowed) and booleans: what a reader checks.
NUMERIC_COLUMNS = {
    "metrics": ("round", "client", "loss", "accuracy", "n"),
    "rounds": tuple(c for c in ROUNDS_COLUMNS if c != "protocol"),
    "divergence": ("round", "value"),
    "ranking": ("score", "rank"),
}
BOOLEAN_COLUMNS = {"metrics": ("participated",)}
CHOICE_COLUMNS = {
    "metrics": {"protocol": EVAL_PROTOCOLS, "split": ("test", "train")},
    "rounds": {"protocol": EVAL_PROTOCOLS},
}

# --- a sweep's folder (sensitivity.sweep, sensitivity.ranking) ---------------------------------
# The columns that lead each cell's rows when the cells' run tables are concatenated.
CELL_COLUMNS = ["cell", "local_part", "seed", "dataset", "scheme", "alpha"]
# Each cell judged against chance and on the end of its curve (sensitivity.sanity).
SANITY_COLUMNS = ["chance", "acc_over_chance", "slope_end", "trustworthy"]
SENSITIVITY_COLUMNS = [
    "dataset",
    "scheme",
    "alpha",
    "seed",
    "local_part",
    "status",
    "acc_mean",
    "acc_std",
    "acc_p10",
    "acc_last",
    "acc_best",
    GAIN,
    "acc_tail",
    "tail_rounds",
    TAIL_GAIN,
    "local_params",
    "comm_bytes_per_round",
    "comm_saved",
    *(f"div_{m}" for m in DIVERGENCE_METRICS),
    "cell",
    "rounds",
    *SANITY_COLUMNS,
    "mechanism",  # how the cell keeps its part local (personalize.mechanisms; `full` before mechanisms)
    "up_bytes",  # mean bytes per round, clients to server and back
    "down_bytes",
]
RANKING_COLUMNS = [
    "part",
    "score",
    "ci_low",
    "ci_high",
    "rank",
    "metric",
    "spearman_vs_gain",
    "score_last",
    "boot_low",
    "boot_high",
    "mean_rank",
    "friedman_p",
    "diff_low",
    "diff_high",
    "resolved_vs_next",
    "p_vs_next",
    "dataset",
    "scheme",
    "alpha",
    "trustworthy",  # every cell behind the row learned and so did its FedAvg reference (sensitivity.sanity)
    "mechanism",  # of the cell `part` names (accuracy rows)
    "local_params",  # per client, mean over the cell's seeds (accuracy rows)
    "gain_per_10k",  # score per 10,000 local parameters (accuracy rows; NaN where nothing is local)
]

# --- a probe's folder (sensitivity.probe): one FedAvg run, then each part type fine-tuned alone per client ---
PROBE_METRIC = "probe_gain"  # the probe's rows beside the divergence metrics in a sweep's report
PROBE_COLUMNS = ["dataset", "scheme", "alpha", "seed", "client", "part", "before", "after", "gain", "steps"]
PROBE_RANKING_COLUMNS = [
    "part",
    "score",
    "ci_low",
    "ci_high",
    "rank",
    "metric",
    "spearman_vs_gain",
    "mean_rank",
    "friedman_p",
    "diff_low",
    "diff_high",
    "resolved_vs_next",
    "dataset",
    "scheme",
    "alpha",
]

# --- a comparison's folder (sensitivity.compare) -----------------------------------------------
# The columns that lead each run's rows when the runs' tables are concatenated.
RUN_KEY_COLUMNS = ["method", "seed"]
COMPARISON_COLUMNS = [
    "method",
    "seed",
    "acc_mean",
    "acc_std",
    "acc_p10",
    "local_params",
    "comm_bytes_per_round",
    "seconds",
    "seconds_per_round",
    "acc_best",
    "round_best",
    "rounds",
    "status",
    "protocol",
]
SUMMARY_COLUMNS = [
    "method",
    "dataset",
    "accuracy",
    "acc_mean",
    "acc_sd",
    "accuracy_best",  # the best round's mean client accuracy, mean over seeds: chosen on the test data
    "acc_best",
    "client_std",
    "local_params",
    "comm_mb_per_round",
    "seconds_per_round",
    "seeds",
    "failed",
    "protocol",  # the evaluation protocol of every accuracy in the row (the runs' headline)
    "paper_row",  # under a paper preset: the paper's table row this method reproduces
]

# --- a validation's folder (sensitivity.validate): the sweep's settings on planted datasets with known answers ---
# One row per planted (effect, strength): the sweep's top part, its interval and whether it is the planted one.
VALIDATION_COLUMNS = [
    "effect",
    "strength",
    "expected",  # the part(s) that must rank first, "|"-joined; empty for the no-effect dataset
    "top_part",
    "score",
    "boot_low",
    "boot_high",
    "resolved_vs_next",
    "above_zero",  # parts whose bootstrap interval lies above zero, "|"-joined (none: must stay empty)
    "correct",  # the top part is an expected one (none: nothing above zero)
    "found",  # correct, resolved from the next part and above zero (none: nothing above zero)
    "fedavg_acc_tail",
    "seconds",
    "sweep",
]
# One row per planted (effect, strength) and divergence metric: does the metric's top part point at the planted one?
VALIDATION_METRIC_COLUMNS = [
    "effect",
    "strength",
    "expected",
    "metric",
    "top_part",
    "points_at_planted",
    "spearman_vs_gain",
]
# One row per effect: the minimal detectable strength of the settings.
VALIDATION_SUMMARY_COLUMNS = [
    "effect",
    "expected",
    "strengths",
    "top_part",  # at the largest strength
    "resolved",  # at the largest strength (none: something resolved above zero, a false positive)
    "found",  # at the largest strength (none: nothing resolved above zero)
    "minimal_detectable",  # the smallest strength at which it was found (NaN: at none)
    "seconds",
]
