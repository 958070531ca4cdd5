"""The configuration of one federated run: a frozen dataclass, validated on construction, saved as config.json.

It lives apart from the round loop so that methods, clients and engines can depend on it without
depending on the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fedsens.personalize.errors import UserError


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
    model: str = "vit-micro"
    personalize: str = "none"
    method: str = "fedavg"
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    out: str = "runs/train"
    # Method options (read by personalize.methods; ignored by methods that do not use them).
    finetune_steps: int = 5
    apfl_alpha: float = 0.25
    perfedavg_beta: float | None = None  # Per-FedAvg outer step; None = lr, as the public code does
    fedrep_head_epochs: int = 1
    plugin_mid_dim: int = 256
    plugin_scale: float = 1.5
    plugin_depth: int | None = None
    plugin_init: str = "zero"
    fedperfix_local: str = ""
    # Scale (personalize.federation / clientstore): where the clients' own tensors live, how often
    # the checkpoint is written (None: every round unless the in-memory client state is large).
    client_store: str = "memory"  # memory | disk (memory-mapped files under OUT/clients)
    checkpoint_every: int | None = None
    # The synthetic population from the command line (personalize.data.synthetic_population):
    # 0 samples per client = the fixed 512-sample set; otherwise clients x per-client samples.
    synthetic_per_client: int = 0
    synthetic_size: int = 16
    synthetic_classes: int = 10

    def __post_init__(self):
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
            (self.eval_every >= 1, f"--eval-every must be at least 1 (got {self.eval_every})"),
            (
                self.client_store in ("memory", "disk"),
                f"--client-store must be memory or disk (got {self.client_store!r})",
            ),
            (
                self.checkpoint_every is None or self.checkpoint_every >= 1,
                f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
