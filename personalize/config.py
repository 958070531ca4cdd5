"""The configuration of one federated run: a frozen dataclass, validated on construction, saved as config.json.

It lives apart from the round loop so that methods, clients and engines can depend on it without
depending on the loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsens.personalize.errors import UserError

# Settings a run may change when it is continued (resumed, or reused by a sweep or comparison):
# none of them changes what the finished run computes (rounds is checked on its own by the grids).
# client_batch trains the same clients on the same batches, equal to float tolerance: a run may change it too.
FREE_SETTINGS = ("device", "out", "rounds", "verify", "checkpoint_every", "client_batch")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one federated run.

    The defaults are the embedded-default preset (digits, vit-micro, 20 clients, Dirichlet 0.3),
    tuned so that plain FedAvg clearly learns on a 2-core CPU in about a minute: with the paper's
    SGD (lr 0.05, momentum 0.9) FedAvg reached 0.51 mean client accuracy after 30 rounds, with
    AdamW (lr 3e-3, fresh per client and round) 0.81. The paper presets (sweep/compare) set SGD.
    """

    dataset: str = "digits"
    data_root: str | None = None
    scheme: str = "dirichlet"  # iid | dirichlet | pathological | domain | path to a partition.json
    alpha: float = 0.3
    clients: int = 20
    classes_per_client: int = 2
    partition_rule: str = "plain"  # plain | capped (the public FedPerfix code's Dirichlet rule; personalize.partition)
    min_samples: int | None = None  # fewest samples per client; None: just enough for one test and one train sample
    test_fraction: float | None = None  # None: the dataset's default (0.25; Office-Home 0.15)
    join_ratio: float = 0.5
    rounds: int = 40
    local_epochs: int = 2
    local_steps: int | None = None  # overrides local_epochs when set
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd (the paper's)
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment_shift: float = 0.125  # random translation (fraction of the side) while training; 0 = off
    augment_scale: float = 0.1
    model: str = "vit-micro"  # a preset (personalize.model) or a timm name of a supported family (`fedsens models`)
    model_args: Mapping[str, Any] = field(default_factory=dict)  # timm constructor options (--model-arg KEY=VALUE)
    pretrained: bool = False  # timm's weights for the name, from the local Hugging Face cache only
    weights: str | None = None  # a local weights file (safetensors or torch state dict), through timm's loading
    # Parts kept local and how: TERM[:MECHANISM[:KEY=VALUE]...] (personalize.mechanisms), e.g. attn:lora,head.
    personalize: str = "none"
    backbone: str = "train"  # train | freeze (only the added, the local and the head's tensors train)
    method: str = "fedavg"
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    # Both protocols are recorded in metrics.csv; this one is the headline of rounds.csv and summary.json.
    eval_protocol: str = "after-aggregation"  # after-aggregation (ours) | paper (the public code's timing)
    out: str = "runs/train"
    # The method's own options (see `fedsens methods`): a plain mapping, completed with the method's
    # defaults and type-checked on construction, so config.json records every value the run used.
    method_options: Mapping[str, Any] = field(default_factory=dict)
    # Dataset loading: the dataset's own options (`fedsens data list`; e.g. synthetic's num_samples, the planted
    # dataset's effect and strength), a plain mapping checked against the dataset's Options on construction.
    data_options: Mapping[str, Any] = field(default_factory=dict)
    verify: bool = True  # check the dataset files' checksums (CIFAR-100's md5); off for files you wrote
    # Scale (personalize.federation / clientstore): where the clients' own tensors live, how often
    # the checkpoint is written (None: every round unless the in-memory client state is large).
    client_store: str = "memory"  # memory | disk (one file per local tensor under OUT/clients)
    checkpoint_every: int | None = None
    # Participants trained together (personalize.engine.together), K at a time; 1: one at a time.
    client_batch: int = 1

    def __post_init__(self):
        for setting in dataclasses.fields(self):  # nan passes every comparison below: refuse it first
            value = getattr(self, setting.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{setting.name.replace('_', '-')} must be a finite number (got {value})")
        checks = [
            (self.alpha > 0, f"alpha must be > 0 (got {self.alpha}); small alpha = strong label skew"),
            (self.clients >= 1, f"--clients must be at least 1 (got {self.clients})"),
            (0 < self.join_ratio <= 1, f"--join-ratio must be in (0, 1] (got {self.join_ratio})"),
            (self.rounds >= 1, f"--rounds must be at least 1 (got {self.rounds})"),
            (self.local_epochs >= 1, f"--local-epochs must be at least 1 (got {self.local_epochs})"),
            (self.local_steps is None or self.local_steps >= 1, f"--local-steps must be >= 1 (got {self.local_steps})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (self.optimizer in ("sgd", "adamw"), f"--optimizer must be sgd or adamw (got {self.optimizer!r})"),
            (
                self.partition_rule in ("plain", "capped"),
                f"--partition-rule must be plain or capped (got {self.partition_rule!r})",
            ),
            (self.min_samples is None or self.min_samples >= 1, f"--min-samples must be >= 1 (got {self.min_samples})"),
            (
                self.eval_protocol in ("after-aggregation", "paper"),
                f"--eval-protocol must be after-aggregation or paper (got {self.eval_protocol!r})",
            ),
            (self.momentum >= 0, f"--momentum must be >= 0 (got {self.momentum})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.eval_every >= 1, f"--eval-every must be at least 1 (got {self.eval_every})"),
            (self.backbone in ("train", "freeze"), f"--backbone must be train or freeze (got {self.backbone!r})"),
            (
                self.client_store in ("memory", "disk"),
                f"--client-store must be memory or disk (got {self.client_store!r})",
            ),
            (self.client_batch >= 1, f"--client-batch must be at least 1 (got {self.client_batch})"),
            (
                self.checkpoint_every is None or self.checkpoint_every >= 1,
                f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.pretrained and self.weights is not None:
            raise UserError("give --weights FILE or --pretrained, not both")
        from fedsens.personalize import model_args  # light: no torch

        object.__setattr__(self, "model_args", model_args.check(self.model_args))
        from fedsens.personalize.methods import registry  # the methods import torch: not at CLI start-up

        method = registry.method_class(self.method)
        if method.parts is not None and self.personalize != "none":
            raise UserError(
                f"--method {self.method} fixes which parts are local; drop --personalize "
                f"{self.personalize!r} or use a method that takes it (e.g. --method fedavg)"
            )
        from fedsens.personalize import mechanisms

        mechanisms.check(self.personalize)  # the grammar, mechanism names and options, before any model exists
        options = registry.resolve_options(method, dict(self.method_options))
        object.__setattr__(self, "method_options", registry.options_dict(options))
        if self.data_options:  # checked (and typed) by the dataset's Options; none given: the loader's defaults
            from fedsens.personalize import datasets

            given = datasets.get(self.dataset).resolve_options(dict(self.data_options))
            chosen = {k: v for k, v in dataclasses.asdict(given).items() if k in self.data_options}
            object.__setattr__(self, "data_options", chosen)

    @staticmethod
    def upgrade_saved(saved: Mapping[str, Any]) -> dict[str, Any]:
        """A config.json's settings as this version names them: an older file's synthetic_* fields (the
        synthetic population) become its data_options; one without model_args / pretrained / weights trained
        a preset from scratch."""
        upgraded = dict(saved)
        per_client = upgraded.pop("synthetic_per_client", None)
        size, classes = upgraded.pop("synthetic_size", None), upgraded.pop("synthetic_classes", None)
        if "data_options" not in upgraded and upgraded.get("dataset") == "synthetic":
            old: dict[str, Any] = {}
            if per_client:
                old["num_samples"] = per_client * upgraded.get("clients", 0)
            if size not in (None, 16):
                old["image_size"] = size
            if classes not in (None, 10):
                old["num_classes"] = classes
            upgraded["data_options"] = old
        upgraded.setdefault("data_options", {})
        # an older file has no model source fields: it trained a preset from scratch
        upgraded.setdefault("model_args", {})
        upgraded.setdefault("pretrained", False)
        upgraded.setdefault("weights", None)
        upgraded.setdefault("backbone", "train")  # an older file trained every parameter
        return upgraded

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
