"""FedPerfix and the vanilla prefix: attention plugins (`personalize.plugins`) kept local with the head."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fedsens.personalize import plugins
from fedsens.personalize.blocks import parse_blocks
from fedsens.personalize.errors import UserError
from fedsens.personalize.methods.base import Method
from fedsens.personalize.methods.registry import register_method


@dataclass(frozen=True)
class PluginOptions:
    local: str = field(default="", metadata={"help": "extra part-spec terms kept local, e.g. blocks.11"})
    blocks: str = field(default="all", metadata={"help": "attention layers that get a plugin: all, 2,3 or 9-11"})
    scale: float = field(default=1.5, metadata={"help": "scale of the key/value offsets"})

    def __post_init__(self):
        parse_blocks(self.blocks, what=f"option blocks {self.blocks!r}")  # the grammar; the depth at install


@register_method
class FedPerfix(Method):
    """FedPerfix (Sun et al. ICCV 2023): a local adapter per attention layer generates key/value
    offsets ("prefixes"); the adapters and the head stay local, the rest (attention included) is
    averaged. `local` adds part-spec terms, e.g. "blocks.11" as the public CIFAR-100 preset does.
    Plugin options: mid_dim (256), scale (1.5; the public argparse default 0.8 is overridden by its
    preset), blocks (all).
    """

    @dataclass(frozen=True)
    class Options(PluginOptions):
        mid_dim: int = field(default=256, metadata={"help": "adapter width"})

        def __post_init__(self):
            super().__post_init__()
            if self.mid_dim < 1:
                raise UserError(f"fedperfix option mid_dim must be at least 1 (got {self.mid_dim})")

    name, paper_row, parts = "fedperfix", 11, "plugin,head"
    paper_label = "FedPerfix"
    summary = "a local adapter per attention layer adds key/value offsets; plugin and head local"
    paper = "Sun et al., FedPerfix: Towards Partial Model Personalization of Vision Transformers in FL, ICCV 2023"
    plugin = "fedperfix"

    def prepare_model(self, model: nn.Module) -> None:
        options = self.options
        plugins.install(
            model,
            self.plugin,
            mid_dim=getattr(options, "mid_dim", 256),
            scale=options.scale,
            blocks=options.blocks,
            init=getattr(options, "init", "zero"),
            seed=self.config.seed + 1,
        )

    def local_spec(self) -> str:
        return ",".join(term for term in (self.parts, self.options.local) if term)


@register_method
class VanillaPrefix(FedPerfix):
    """The code's "vanilla prefix" variant: offsets from one Linear(dim, 2*dim) (`init` zero or
    random) in place of the adapter; plugin and head (and the `local` parts) local."""

    @dataclass(frozen=True)
    class Options(PluginOptions):
        init: str = field(
            default="zero", metadata={"help": "initial offsets: zero (starts as the plain ViT) or random"}
        )

        def __post_init__(self):
            super().__post_init__()
            if self.init not in plugins.INITS:
                raise UserError(f"vanilla-prefix option init must be zero or random (got {self.init!r})")

    name, paper_row = "vanilla-prefix", 10
    paper_label = "Vanilla prefix"
    summary = "one linear map per attention layer adds key/value offsets; plugin and head local"
    paper = "Sun et al., FedPerfix, ICCV 2023 (its vanilla-prefix baseline)"
    plugin = "vanilla-prefix"
