"""Model families: how each timm vision transformer's modules map to parts, blocks and stages.

One module per family (`vit`, `swin`, `eva`, `beit`, `cait`) defines `Family` objects: the timm model
modules whose names it accepts, the model classes it describes, and three structural rules that
`personalize.model` applies with its one algorithm (the outermost whole module wins, else the
parameter's own role, else its innermost typed module):

- `blocks(model)`: the transformer blocks in depth order (`(path, stage)`); the block column counts them,
  so `attn@9-11` and `blocks.3` mean the same thing on every family (Swin's `layers.1.blocks.0` is the
  block after the stage-0 blocks; CaiT's class-attention blocks follow its self-attention blocks);
- `roles(model)`: module paths and parameter names with a fixed part (`blocks.K.ls1` -> attn, BEiT's
  `gamma_1` -> attn, ...), read from timm's structure, never from loose substrings;
- `whole(model)`: modules whose whole subtree is one part (ViT's attention-pool head, Swin's
  patch-merging `downsample` -> embed, BEiT's shared relative position bias -> attn).

The attention modules that take a FedPerfix plugin are every block's `attn`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from fedsens.personalize.errors import UserError

# A block of a transformer: (its module path, its stage; None where the model has no stages).
Block = tuple[str, int | None]


def plain_blocks(*containers: str) -> Callable[[nn.Module], list[Block]]:
    """Blocks kept in ModuleLists named `containers` at the model's top level, in that order."""

    def blocks(model: nn.Module) -> list[Block]:
        found: list[Block] = []
        for container in containers:
            modules = getattr(model, container, None)
            found += [(f"{container}.{index}", None) for index in range(len(modules or ()))]
        return found

    return blocks


def branch_roles(model: nn.Module, blocks: list[Block], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Each block's attention and MLP branches (with the LayerScale of each: ls1/ls2 modules, gamma_1/gamma_2
    parameters) -> attn / mlp; `extra` maps further block-relative names to parts."""
    table = {"attn": "attn", "mlp": "mlp", "ls1": "attn", "ls2": "mlp", "gamma_1": "attn", "gamma_2": "mlp"}
    table.update(extra or {})
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    roles: dict[str, str] = {}
    for path, _ in blocks:
        for child, part in table.items():
            name = f"{path}.{child}"
            if name in modules or name in params:
                roles[name] = part
    return roles


def no_whole(_model: nn.Module) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Family:
    """One family of timm models and the rules that place its parameters."""

    name: str
    title: str
    timm_modules: tuple[str, ...]  # timm.models modules whose model names belong here
    model_types: tuple[type, ...]  # the built model is an instance of one of these (exactly: see `of`)
    examples: tuple[str, ...]
    tiny: dict = field(default_factory=dict)  # constructor options of a CPU-sized variant of examples[0]
    blocks: Callable[[nn.Module], list[Block]] = plain_blocks("blocks")
    whole: Callable[[nn.Module], dict[str, str]] = no_whole
    extra_roles: dict[str, str] = field(default_factory=dict)  # block-relative names beyond branch_roles'
    stages: Callable[[nn.Module], list[str]] | None = None  # stage module paths, for families with stages
    notes: str = ""

    def roles(self, model: nn.Module) -> dict[str, str]:
        return branch_roles(model, self.blocks(model), self.extra_roles)

    def attentions(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block's attention module in depth order: where plugins go."""
        modules = dict(model.named_modules())
        paths = [f"{path}.attn" for path, _ in self.blocks(model)]
        return [(path, modules[path]) for path in paths if path in modules]


def all_families() -> tuple[Family, ...]:
    from fedsens.personalize.families import beit, cait, eva, swin, vit

    return (*vit.FAMILIES, *swin.FAMILIES, *eva.FAMILIES, *beit.FAMILIES, *cait.FAMILIES)


def of(model: nn.Module) -> Family:
    """The family of a built model: the one whose model classes include its exact class (a subclass such
    as DeiT's distilled ViT has its own family, listed before its parent)."""
    for family in all_families():
        if type(model) in family.model_types:
            return family
    for family in all_families():
        if isinstance(model, family.model_types):
            return family
    names = ", ".join(f.name for f in all_families())
    raise UserError(f"{type(model).__name__} belongs to no supported model family ({names}); see `fedsens models`")


def for_name(name: str) -> Family:
    """The family whose timm modules register the model `name` (with or without a pretrained tag)."""
    from timm.models import is_model_in_modules

    for family in all_families():
        if is_model_in_modules(name, family.timm_modules):
            return family
    examples = "; ".join(f"{f.name}: {f.examples[0]}" for f in all_families())
    raise UserError(
        f"model {name!r} is neither a fedsens preset nor a timm model of a supported family ({examples}); "
        "`fedsens models` lists them"
    )
