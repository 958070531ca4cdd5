"""How far apart the clients' models are, per parameter group, in one round.

The metrics compare the models of a round's participants at the end of their local training:

- `update_cos`  mean pairwise cosine similarity of the updates (client minus its start of round);
- `rel_drift`   mean ||client - start|| / ||start||;
- `weight_div`  mean ||client - mean of clients|| / ||mean of clients|| (Zhao et al. 2018);
- `cka`         mean pairwise linear CKA (Kornblith et al. 2019) of the group's outputs on a fixed
                probe batch.

A group is one module's parameters: `blocks.K.attn`, `blocks.K.mlp`, `blocks.K.norm1`, `blocks.K.norm2`,
`blocks.K.attn.<plugin>`, `embed`, `head`, and `final_norm` (timm's final LayerNorm, module `norm`,
renamed so that it cannot be confused with the summary of the part `norm`). Each part type is also
summarised by the mean over its groups, in rows with `group` = the part name and `block` = -1.

`DivergenceRecorder` is a federation hook that collects what the metrics need and returns tidy rows
`round, group, part, block, metric, value`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from fedsens.personalize.hooks import Hook
from fedsens.personalize.schema import DIVERGENCE_METRICS

Params = Mapping[str, Tensor]
METRICS = DIVERGENCE_METRICS


# ---- the metrics: pure functions of stacked tensors --------------------------------------------
#
# Every parameter metric is a function of four additive moments, so a group's metrics are summed
# parameter by parameter (no concatenated copy of the group); the moments are float64 m x m / m
# tensors, the per-parameter products run in the parameters' own precision.


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where den is zero (an undefined ratio must not pass for a perfect score)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.nan)


def _mean_off_diagonal(matrix: Tensor) -> float:
    m = matrix.shape[0]
    if m < 2:
        return float("nan")
    upper = torch.triu_indices(m, m, offset=1, device=matrix.device)
    return float(matrix[upper[0], upper[1]].mean())


def _as_float(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def moments(starts: Tensor, ends: Tensor) -> dict[str, Tensor]:
    """Additive statistics of clients x values tensors: the updates' Gram matrix, ||start||^2,
    ||end - mean end||^2 per client and ||mean end||^2 (all float64)."""
    starts, ends = _as_float(starts), _as_float(ends)
    updates = ends - starts
    centre = ends.mean(dim=0)
    return {
        "update_gram": (updates @ updates.T).double(),
        "start_sq": starts.pow(2).sum(dim=1).double(),
        "residual_sq": (ends - centre).pow(2).sum(dim=1).double(),
        "centre_sq": centre.pow(2).sum().double(),
    }


def metrics_from_moments(stats: Mapping[str, Tensor]) -> dict[str, float]:
    """update_cos, rel_drift and weight_div from (summed) moments."""
    update_sq = stats["update_gram"].diagonal()
    norms = update_sq.sqrt()
    return {
        "update_cos": _mean_off_diagonal(_ratio(stats["update_gram"], norms[:, None] * norms[None, :])),
        "rel_drift": float(_ratio(norms, stats["start_sq"].sqrt()).mean()),
        "weight_div": float(_ratio(stats["residual_sq"].sqrt(), stats["centre_sq"].sqrt()).mean()),
    }


def update_cosine(starts: Tensor, ends: Tensor) -> float:
    """Mean pairwise cosine similarity of the rows of ends - starts (clients x values)."""
    return metrics_from_moments(moments(starts, ends))["update_cos"]


def relative_drift(starts: Tensor, ends: Tensor) -> float:
    """Mean over clients of ||end - start|| / ||start||."""
    return metrics_from_moments(moments(starts, ends))["rel_drift"]


def weight_divergence(ends: Tensor) -> float:
    """Mean over clients of ||end - mean end|| / ||mean end||."""
    return metrics_from_moments(moments(ends, ends))["weight_div"]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same n samples (n x d1, n x d2).

    Feature-space form on centred features: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), which costs
    O(n d^2) instead of the n x n Gram matrices' O(n^2 d); NaN when either representation is constant.
    """
    return mean_pairwise_cka([x, y])


def pairwise_cka(features: Sequence[Tensor]) -> Tensor:
    """m x m linear CKA between clients' representations (each n x d_i) of the same n samples.

    Client i's cross-covariances with clients i..m come from one product X_i^T [X_i .. X_m] of the
    side-by-side centred features: m larger products, half of the full Z^T Z, instead of m^2 small ones.
    """
    centred = [_as_float(f) - _as_float(f).mean(dim=0, keepdim=True) for f in features]
    m = len(centred)
    hsic = torch.zeros(m, m, dtype=torch.float64, device=centred[0].device)
    for i in range(m):
        products = centred[i].T @ torch.cat(centred[i:], dim=1)
        widths = [c.shape[1] for c in centred[i:]]
        hsic[i, i:] = torch.stack([block.double().pow(2).sum() for block in products.split(widths, dim=1)])
    hsic = torch.triu(hsic) + torch.triu(hsic, diagonal=1).T
    scale = hsic.diagonal().sqrt()
    return _ratio(hsic, scale[:, None] * scale[None, :])


def mean_pairwise_cka(features: Sequence[Tensor]) -> float:
    """Mean linear CKA over all pairs of clients' representations of the same samples."""
    if len(features) < 2:
        return float("nan")
    return _mean_off_diagonal(pairwise_cka(features))


def token_rows(output: Tensor) -> Tensor:
    """A module's output as a (samples * tokens) x dim matrix.

    Tokens are rows because a block maps tokens to tokens and the arbitrary basis lives in the channel
    dimension, where CKA is invariant; with 64 probe images x N tokens there are many more rows than
    channels, which keeps CKA's small-sample bias low. Outputs without tokens (B x dim) stay as they are.
    """
    return output.detach().reshape(-1, output.shape[-1])


# ---- parameter groups ---------------------------------------------------------------------------


def _plugin_roots(model: nn.Module) -> list[str]:
    """Paths of the outermost modules marked `fedsens_part = "plugin"`."""
    marked = [name for name, module in model.named_modules() if getattr(type(module), "fedsens_part", None) == "plugin"]
    return [name for name in marked if not any(name.startswith(other + ".") for other in marked)]


def block_paths(parts: pd.DataFrame) -> dict[int, str]:
    """Each block's module path, read from a whole parts table: the dotted prefix its parameters share (a
    block holds several branches, so the prefix ends at the block: ViT's blocks.3, Swin's layers.1.blocks.0,
    CaiT's blocks_token_only.0)."""
    paths: dict[int, str] = {}
    for block, names in parts.groupby(parts["block"].astype(int))["param"]:
        if block >= 0:  # commonprefix compares lists element by element: the shared module path pieces
            paths[int(block)] = ".".join(os.path.commonprefix([name.split(".")[:-1] for name in names]))
    return paths


def _group_of(
    param: str, part: str, block: int, plugin_roots: Sequence[str], part_names: set[str], blocks: Mapping[int, str]
) -> str:
    if part == "plugin":
        root = next((r for r in plugin_roots if param.startswith(r + ".")), None)
        return root if root is not None else param.rsplit(".", 1)[0]
    if part in ("embed", "head"):
        return part
    module = param.rsplit(".", 1)[0] if "." in param else ""
    if block >= 0:
        # The group is the block's child that holds the parameter (the block itself for its own parameters).
        path = blocks[block]
        if module == path:
            return path
        return f"{path}.{module[len(path) + 1 :].split('.')[0]}"
    top = param.split(".")[0] if module else param
    return f"final_{top}" if top in part_names else top


def _group_module(names: Sequence[str], group: str, part: str, block: int, modules: Mapping[str, nn.Module]) -> str:
    """The module whose output stands for the group on the probe batch ('' when there is none)."""
    if group in modules and (block >= 0 or part == "plugin"):
        return group
    tops = {name.split(".")[0] for name in names if "." in name}
    if len(tops) == 1:
        return tops.pop()
    return ""


def group_names(
    parts: pd.DataFrame,
    *,
    part_names: set[str] | None = None,
    plugin_roots: Sequence[str] = (),
    blocks: Mapping[int, str] | None = None,
) -> list[str]:
    """The group of each row of a parts table (columns param, part, block).

    Without `plugin_roots` (the plugin modules' paths, which only the model knows) a plugin
    parameter's group is its parent module. `blocks`: each block's module path (`block_paths` of the whole
    table; by default of `parts` itself, which must then hold every parameter of its blocks).
    """
    part_names = set(parts["part"]) if part_names is None else part_names
    blocks = block_paths(parts) if blocks is None else blocks
    return [
        _group_of(p, part, int(block), plugin_roots, part_names, blocks)
        for p, part, block in zip(parts["param"], parts["part"], parts["block"])
    ]


def parameter_groups(model: nn.Module, parts: pd.DataFrame) -> pd.DataFrame:
    """Every trainable parameter's group, from the parts table (columns param, part, block).

    Returns columns `param, group, part, block, module` (module: whose output the CKA compares).
    """
    present = {name for name, _ in model.named_parameters()}
    table = parts.loc[parts["param"].isin(present), ["param", "part", "block"]].copy()
    table["block"] = table["block"].astype(int)
    table["group"] = group_names(table, plugin_roots=_plugin_roots(model))
    modules = dict(model.named_modules())
    module_of = {
        group: _group_module(list(rows["param"]), group, rows["part"].iloc[0], int(rows["block"].iloc[0]), modules)
        for group, rows in table.groupby("group", sort=False)
    }
    table["module"] = table["group"].map(module_of)
    return table[["param", "group", "part", "block", "module"]].reset_index(drop=True)


# ---- rows ----------------------------------------------------------------------------------------


def group_moments(starts: Sequence[Params], ends: Sequence[Params], names: Sequence[str]) -> dict[str, Tensor]:
    """The moments of a group of parameters, summed parameter by parameter."""
    total: dict[str, Tensor] = {}
    for name in names:
        stats = moments(
            torch.stack([s[name].detach().reshape(-1) for s in starts]),
            torch.stack([e[name].detach().reshape(-1) for e in ends]),
        )
        total = {k: total[k] + v if k in total else v for k, v in stats.items()}
    return total


def divergence_rows(
    round: int,
    starts: Sequence[Params],
    ends: Sequence[Params],
    groups: pd.DataFrame,
    features: Sequence[Mapping[str, Tensor]] = (),
) -> list[dict]:
    """Tidy rows for one round: every group's four metrics, then each part's mean over its groups.

    starts/ends: one parameter dict per participating client; features: per client, group -> the
    group's output rows on the probe batch (groups missing from it get CKA NaN).
    """
    rows = []
    for group, members in groups.groupby("group", sort=False):
        outputs = [f[group] for f in features if group in f]
        values = metrics_from_moments(group_moments(starts, ends, list(members["param"])))
        values["cka"] = mean_pairwise_cka(outputs) if len(outputs) == len(ends) else float("nan")
        part, block = members["part"].iloc[0], int(members["block"].iloc[0])
        rows += [dict(round=round, group=group, part=part, block=block, metric=k, value=v) for k, v in values.items()]
    return rows + part_summary(rows)


def part_summary(rows: Sequence[Mapping]) -> list[dict]:
    """Per part and metric, the mean over the part's groups (NaN-aware), as rows with group = part.

    A part whose only group already carries the part's name (embed, head) is its own summary.
    """
    frame = pd.DataFrame(rows)
    if frame.empty:
        return []
    frame = frame[frame["group"] != frame["part"]]
    summary = frame.groupby(["round", "part", "metric"], sort=False)["value"].mean()  # skips NaN; all NaN -> NaN
    return [
        dict(round=int(r), group=part, part=part, block=-1, metric=metric, value=float(value))
        for (r, part, metric), value in summary.items()
    ]


# ---- the federation hook -------------------------------------------------------------------------


@contextlib.contextmanager
def _capturing(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Collect each module's (tensor) output under its group name while the block runs."""
    captured: dict[str, Tensor] = {}

    def keeper(group: str):
        def keep(_module, _inputs, output):
            if isinstance(output, Tensor):
                captured[group] = token_rows(output)

        return keep

    handles = [module.register_forward_hook(keeper(group)) for group, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class DivergenceRecorder(Hook):
    """Federation hook: divergence metrics between the participants' models every `every` rounds.

    Keeps, for a recorded round only, each participant's parameters at the start and end of its
    local training (detached clones on the model's device) and its groups' outputs on a probe batch
    of `probe_size` images drawn once per run from the pooled test data; at most `max_rows` token rows
    per group are kept (a fixed seeded subset) so that large ViTs stay cheap. Recorded rounds are those
    with round % every == 0 (rounds count from 1, like the engine's eval_every). A group whose module
    is not called through forward() (FedPerfix's prefix: the attention calls its methods) has no CKA.

    Cost (measured, digits + vit-micro, 10 clients a round, one CPU thread): about a third of the
    round time when every round is recorded, 7% with every=5; on a GPU ViT-Small it is negligible.
    """

    table = "divergence"

    def __init__(self, every: int = 1, probe_size: int = 64, max_rows: int = 512):
        if every < 1 or probe_size < 2 or max_rows < 2:
            raise ValueError(
                f"every={every}, probe_size={probe_size}, max_rows={max_rows}: need every >= 1 and sizes >= 2"
            )
        self.every, self.probe_size, self.max_rows = every, probe_size, max_rows

    def on_run_start(self, ctx) -> None:
        self._groups = parameter_groups(ctx.model, ctx.parts)
        self._names = set(self._groups["param"])
        modules = dict(ctx.model.named_modules())
        with_module = self._groups.drop_duplicates("group").query("module != ''")
        self._modules = {g: modules[m] for g, m in zip(with_module["group"], with_module["module"])}
        self._generator = torch.Generator().manual_seed(int(ctx.config.seed))
        pooled = np.concatenate([np.asarray(t, dtype=np.int64) for t in ctx.partition.test])
        chosen = torch.randperm(len(pooled), generator=self._generator)[: self.probe_size]
        images = ctx.dataset.images[torch.as_tensor(pooled)[chosen]]
        self._probe = ctx.prepare(images).to(ctx.device)
        self._row_index: dict[str, Tensor] = {}
        self._starts: dict[int, dict[str, Tensor]] = {}
        self._ends: dict[int, dict[str, Tensor]] = {}
        self._features: dict[int, dict[str, Tensor]] = {}

    def records(self, round: int) -> bool:
        return round % self.every == 0

    def _snapshot(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if n in self._names}

    def _probe_outputs(self, model: nn.Module) -> dict[str, Tensor]:
        was_training = model.training
        model.eval()
        try:
            full_precision = torch.autocast(self._probe.device.type, enabled=False)
            with torch.no_grad(), full_precision, _capturing(self._modules) as out:
                model(self._probe)
        finally:
            model.train(was_training)
        return {group: self._subsample(group, rows) for group, rows in out.items()}

    def _subsample(self, group: str, rows: Tensor) -> Tensor:
        if rows.shape[0] <= self.max_rows:
            return rows
        if group not in self._row_index:
            picked = torch.randperm(rows.shape[0], generator=self._generator)[: self.max_rows]
            self._row_index[group] = picked.sort().values.to(rows.device)
        return rows[self._row_index[group]]

    def on_client_start(self, round: int, client: int, model: nn.Module) -> None:
        if self.records(round):
            self._starts[client] = self._snapshot(model)

    def on_client_end(self, round: int, client: int, model: nn.Module) -> None:
        if self.records(round):
            self._ends[client] = self._snapshot(model)
            self._features[client] = self._probe_outputs(model)

    def on_round_end(self, round: int) -> list[dict]:
        if not self.records(round):
            return []
        clients = sorted(self._ends)
        rows = divergence_rows(
            round,
            [self._starts[c] for c in clients],
            [self._ends[c] for c in clients],
            self._groups,
            [self._features[c] for c in clients],
        )
        self._starts, self._ends, self._features = {}, {}, {}
        return rows
