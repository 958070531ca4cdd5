"""Named protocols: each preset is data holding the whole training protocol in one place.

A preset fixes the RunConfig fields of a run (optimizer, lr, momentum, weight decay, batch size, local
epochs, augmentation, join ratio, rounds, model, partition rule, alpha, minimum client size, headline
evaluation protocol ...), the per-method changes a comparison applies (Per-FedAvg's lr in the paper
presets), the grid settings of the sweep and the comparison, and, for the paper presets, which of our
methods produced each row of the paper's table. `train`, `sweep` and `compare` all start from one of
these; every option given on the command line overrides the preset's value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsens.personalize.config import RunConfig
from fedsens.personalize.errors import UserError


@dataclass(frozen=True)
class Preset:
    """One protocol. `run`: RunConfig fields; `method_options`: method options (`fedsens methods`) given to
    every method that has them; `method_overrides`: RunConfig fields per method (a "method_options" entry
    there adds that method's own options); `sweep` / `compare`: the grid's own settings (SweepConfig /
    CompareConfig fields other than `run`)."""

    name: str
    summary: str
    run: Mapping[str, Any] = field(default_factory=dict)
    method_options: Mapping[str, Any] = field(default_factory=dict)
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sweep: Mapping[str, Any] = field(default_factory=dict)
    compare: Mapping[str, Any] = field(default_factory=dict)

    def run_config(self, **changes: Any) -> RunConfig:
        return RunConfig(**{**self.run, **changes})

    def defaults(self) -> dict[str, Any]:
        """RunConfig's field values under this preset, without building (and validating) a RunConfig:
        cheap enough for `--help`."""
        values = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            for f in dataclasses.fields(RunConfig)
        }
        return {**values, **self.run}

    def method_settings(self, method: str) -> dict[str, Any]:
        """The RunConfig changes this preset makes for one method: `method` itself, its overrides, and the
        preset's method options that this method has."""
        from fedsens.personalize.methods import method_class, registry

        changes = {k: v for k, v in self.method_overrides.get(method, {}).items() if k != "method_options"}
        fields = registry.option_fields(method_class(method))
        options = {k: v for k, v in self.method_options.items() if k in fields}
        options.update(self.method_overrides.get(method, {}).get("method_options", {}))
        return {**changes, "method": method, **({"method_options": options} if options else {})}


def _paper(dataset: str, **changes: Any) -> dict[str, Any]:
    """The public FedPerfix code's protocol (FEDPERFIX.md): ViT-S/16 from scratch at 224 px, 64 clients,
    8 a round, 50 rounds, 10 local epochs, batch 64, plain SGD at lr 0.01 without momentum or weight
    decay, no augmentation, its capped Dirichlet rule (alpha 0.5, >= 256 = 64 / 0.25 samples a client),
    its evaluation timing as the headline; FedBABU fine-tuned for 1 step and FedPerfix's adapter
    mid_dim 256, scale 1.5 (the code's defaults)."""
    protocol = dict(
        dataset=dataset,
        model="vit_small_patch16_224",
        scheme="dirichlet",
        partition_rule="capped",
        alpha=0.5,
        min_samples=256,
        clients=64,
        join_ratio=0.125,
        rounds=50,
        local_epochs=10,
        batch_size=64,
        optimizer="sgd",
        lr=0.01,
        momentum=0.0,
        weight_decay=0.0,
        augment_shift=0.0,
        augment_scale=0.0,
        eval_protocol="paper",
    )
    return {**protocol, **changes}


def _paper_preset(name: str, dataset: str, summary: str, *, fedperfix_local: str = "", **changes: Any) -> Preset:
    overrides: dict[str, dict[str, Any]] = {"perfedavg": {"lr": 0.001}}
    if fedperfix_local:  # the public code's vanilla prefix is a switch on its FedPerfix preset: same local parts
        local = {"method_options": {"local": fedperfix_local}}
        overrides.update({"fedperfix": local, "vanilla-prefix": local})
    return Preset(
        name=name,
        summary=summary,
        run=_paper(dataset, **changes),
        # FedBABU fine-tuned for 1 step, the adapter's mid_dim 256 and scale 1.5: the public code's defaults.
        method_options={"finetune_steps": 1, "mid_dim": 256, "scale": 1.5},
        # Per-FedAvg: the public code's lr 0.001 (its beta defaults to the lr, as the code sets it).
        method_overrides=overrides,
        compare=dict(seeds=(1,), out=f"runs/compare-{dataset}"),
    )


PRESETS: dict[str, Preset] = {
    "embedded": Preset(
        "embedded",
        "the embedded default: digits, vit-micro, 20 clients, RunConfig's tuned CPU settings (train's default)",
    ),
    "quick": Preset(
        "quick",
        "the embedded default with 30 rounds and divergence every 5 rounds (sweep's default): FedAvg's curve on "
        "the digits climbs to round ~40 (0.42 at 15, 0.72 at 30, 0.83 at 40); 30 rounds of 21 cells take "
        "about 5 minutes on a 2-core CPU with --jobs 2 (279 s measured; the quick preset's default: one job "
        "per core)",
        run=dict(rounds=30),
        sweep=dict(div_every=5),
    ),
    "default": Preset(
        "default",
        "the embedded default with 20 rounds, evaluation every 5, the FedPerfix adapter at the public code's "
        "width ratio (256 of 384 -> 64 of vit-micro's 96), all eleven methods, one seed (compare's default)",
        run=dict(rounds=20, eval_every=5),
        method_options={"mid_dim": 64},
    ),
    "paper-cifar100": _paper_preset(
        "paper-cifar100",
        "cifar100",
        "the paper's CIFAR-100 setting (FedPerfix also keeps blocks.11 local, as the public preset does)",
        fedperfix_local="blocks.11",
    ),
    "paper-organamnist": _paper_preset("paper-organamnist", "organamnist", "the paper's OrganAMNIST setting"),
    "paper-officehome": _paper_preset(
        "paper-officehome",
        "officehome",
        "the paper's Office-Home setting: 16 clients, 4 per domain, Dirichlet 1.0 inside each, >= 20 images, 85/15",
        scheme="domain",
        alpha=1.0,
        clients=16,
        min_samples=20,
        test_fraction=0.15,
    ),
}


def names_help(default: str) -> str:
    """Every preset's name for a `--preset` help text, the command's default first."""
    return " | ".join([f"{default} (the default)", *(name for name in PRESETS if name != default)])


def get(name: str, allowed: tuple[str, ...] | None = None) -> Preset:
    names = allowed or tuple(PRESETS)
    if name not in names:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
    return PRESETS[name]


def protocol(config: RunConfig, *, preset: str | None = None, method_overrides: Mapping | None = None) -> dict:
    """The protocol a run (or every run of a grid) follows, as one flat, JSON-ready record."""
    from fedsens.personalize import model as model_lib  # torch: only when a protocol is written

    source = model_lib.source_record(config.model, config.model_args, config.weights, config.pretrained)
    if model_lib.is_preset(config.model) and "img_size" not in config.model_args:
        image_size: Any = model_lib.model_shape(config.model).img_size or "the data's own (<= 32)"
    else:
        image_size = model_lib.input_spec(
            config.model, data_channels=3, data_size=32, model_args=config.model_args
        ).img_size
    augment = (
        "off"
        if config.augment_shift == 0 and config.augment_scale == 0
        else (f"shift {config.augment_shift:g}, scale {config.augment_scale:g}")
    )
    record: dict[str, Any] = {
        "preset": preset,
        "dataset": config.dataset,
        "model": config.model,
        **{key: value for key, value in source.items() if key == "model_args"},
        "image_size": image_size,
        **{key: value for key, value in source.items() if key != "model_args"},
        "clients": config.clients,
        "join_ratio": config.join_ratio,
        "rounds": config.rounds,
        "local_epochs": config.local_epochs if config.local_steps is None else f"{config.local_steps} steps",
        "optimizer": config.optimizer,
        "lr": config.lr,
        "momentum": config.momentum if config.optimizer == "sgd" else "n/a (adamw)",
        "weight_decay": config.weight_decay,
        "batch_size": config.batch_size,
        "augmentation": augment,
        "partition": config.scheme,
        "partition_rule": config.partition_rule,
        "alpha": config.alpha,
        "min_samples": config.min_samples if config.min_samples is not None else "default (one test, one train)",
        "evaluation_protocol": config.eval_protocol,
        "eval_every": config.eval_every,
    }
    if method_overrides:
        record["method_overrides"] = {m: dict(v) for m, v in method_overrides.items()}
    return record


def protocol_text(record: Mapping[str, Any]) -> str:
    """The one block each command prints before it trains."""
    width = max(len(k) for k in record)
    lines = [f"protocol ({record.get('preset') or 'custom'}):"]
    lines += [f"  {k.replace('_', ' '):<{width}}  {v}" for k, v in record.items() if k != "preset" and v is not None]
    return "\n".join(lines)


def write_protocol(folder: Path | str, record: Mapping[str, Any]) -> Path:
    from fedsens.personalize import runio  # pandas: not at CLI start-up (the options' help reads the presets)

    path = Path(folder) / "protocol.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    runio.write_json(path, dict(record))
    return path


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values a user gave (None = the option was left out)."""
    return {k: v for k, v in values.items() if v is not None}


def overlay(config: Any, **values: Any) -> Any:
    """`config` (a RunConfig, or a grid's config) with every given value (not None) laid over it: the one
    rule by which an option the user gives beats the preset's value, in train, sweep and compare."""
    return dataclasses.replace(config, **given(values))


def yield_to(
    method_overrides: Mapping[str, Mapping[str, Any]], fields: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """A preset's per-method changes without those the user set: the user's RunConfig `fields` (None = not
    given) and method `options` (-o) win over what the preset sets for one method (Per-FedAvg's lr, FedPerfix's
    local parts), as they win over the preset's shared values (`overlay`)."""
    set_by_user = set(given(fields))
    changed: dict[str, dict[str, Any]] = {}
    for method, changes in method_overrides.items():
        kept = {k: v for k, v in changes.items() if k != "method_options" and k not in set_by_user}
        own = {k: v for k, v in changes.get("method_options", {}).items() if k not in options}
        if own:
            kept["method_options"] = own
        if kept:
            changed[method] = kept
    return changed
