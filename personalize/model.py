"""Model construction (timm) and the layer-type taxonomy: every parameter -> one part and a block index.

`--model` is one of the presets below or any timm model name of a supported family
(`personalize.families`: ViT/DeiT/DeiT III, distilled DeiT, Swin, Swin V2, EVA/EVA02, BEiT, CaiT);
`model_args` are timm constructor options laid over it. Parts are decided by module type and the
family's structure (the classifier module itself, the patch-embedding module itself, LayerNorm /
attention / MLP instances, the blocks' branches), never by loose substrings, so `head` cannot catch
`heads` and a plugin living inside an attention module stays a plugin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import timm
import torch
from timm.layers import Mlp
from torch import nn

from fedsens.personalize import families as family_lib
from fedsens.personalize import model_args as model_args_lib
from fedsens.personalize import weights as weights_lib
from fedsens.personalize.blocks import resolve_blocks
from fedsens.personalize.errors import UserError
from fedsens.personalize.schema import PART_TYPES

EMBED_PARAMS = ("cls_token", "pos_embed", "reg_token", "dist_token")


@dataclass(frozen=True)
class ModelShape:
    """A named ViT shape (`--model`), as against a protocol preset (`presets.Preset`, `--preset`).

    `img_size=None` adapts the input size to the data (small CPU shapes)."""

    timm_name: str
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    img_size: int | None = 224
    patch_size: int | None = None
    rgb: bool = True  # paper presets take 3 channels; grey images are repeated


MODEL_SHAPES: dict[str, ModelShape] = {
    "vit_small_patch16_224": ModelShape("vit_small_patch16_224"),
    "vit_tiny_patch16_224": ModelShape("vit_tiny_patch16_224"),
    "vit-mini": ModelShape("vit_small_patch16_224", 192, 6, 3, img_size=None, rgb=False),
    "vit-micro": ModelShape("vit_small_patch16_224", 96, 4, 3, img_size=None, rgb=False),
    # Smaller than anything useful: for tests and smoke runs only.
    "vit-nano": ModelShape("vit_small_patch16_224", 48, 2, 3, img_size=None, rgb=False),
}


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: the data is resized / channel-repeated / normalised to this batch by batch.
    `mean`/`std` None: 0.5 for every channel (the public FedPerfix code's); timm names take their data
    config's (`timm.data.resolve_data_config`)."""

    img_size: int
    patch_size: int
    in_chans: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"


def is_preset(name: str) -> bool:
    return name in MODEL_SHAPES


def _square(size: Any, key: str = "img_size") -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise UserError(f"--model-arg {key}={size} must be one side (square inputs), e.g. {key}=32")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise UserError(f"--model-arg {key}={size!r} must be a positive number of pixels")
    return size


def input_spec(
    preset: str, *, data_channels: int, data_size: int, model_args: Mapping[str, Any] | None = None
) -> InputSpec:
    """Input size for a model (preset or timm name) and a dataset.

    Small presets keep small images at their own size (resizing to 32 only what is larger or not a
    multiple of 4) with patch 4. On the 8x8 digits that is 4 tokens of 4x4 pixels: measured on this
    2-core CPU (10 epochs, centralised, AdamW 3e-3), patch 4 reached 0.87 test accuracy against 0.44
    for patch 2 (16 tokens of 2x2 pixels, too little signal per token), in half the time.
    A timm name takes its data config: input size (or --model-arg img_size), interpolation, mean/std.
    """
    args = dict(model_args or {})
    if not is_preset(preset):
        return timm_input_spec(preset, args)
    p = model_shape(preset)
    if "img_size" in args:
        channels = args.get("in_chans", 3 if p.rgb else data_channels)
        return InputSpec(_square(args["img_size"]), args.get("patch_size", p.patch_size or 16), channels)
    if p.img_size is not None:
        return InputSpec(p.img_size, p.patch_size or 16, 3 if p.rgb else data_channels)
    size = data_size if data_size <= 32 and data_size % 4 == 0 else 32
    return InputSpec(size, 4, data_channels)


def data_config(name: str, model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's data config for a model name (input size, interpolation, mean, std), with --model-arg
    img_size / in_chans applied."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    family_lib.for_name(name)
    args = dict(model_args or {})
    cfg = get_pretrained_cfg(name)
    pretrained = cfg.to_dict() if cfg is not None else {}
    chans = int(args.get("in_chans", (pretrained.get("input_size") or (3,))[0]))
    side = _square(args["img_size"]) if "img_size" in args else None
    given = {"input_size": (chans, side, side)} if side else {"in_chans": chans}
    resolved = resolve_data_config(args=given, pretrained_cfg=pretrained)
    if len(resolved["mean"]) != chans:  # e.g. a one-channel variant of an RGB model: the channels' average
        resolved["mean"] = (sum(resolved["mean"]) / len(resolved["mean"]),) * chans
        resolved["std"] = (sum(resolved["std"]) / len(resolved["std"]),) * chans
    return resolved


def timm_input_spec(name: str, model_args: Mapping[str, Any] | None = None) -> InputSpec:
    args = dict(model_args or {})
    config = data_config(name, args)
    chans, height, width = config["input_size"]
    if height != width:
        raise UserError(f"{name} takes {height}x{width} inputs; give a square one with --model-arg img_size=N")
    interpolation = config.get("interpolation", "bilinear")
    return InputSpec(
        int(height),
        int(args.get("patch_size", 0)),
        int(chans),
        tuple(float(m) for m in config["mean"]),
        tuple(float(s) for s in config["std"]),
        interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
    )


def model_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]


def build(
    preset: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    *,
    patch_size: int | None = None,
    seed: int = 0,
    model_args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """A timm model (a preset, or a timm name with `model_args`), from scratch or from `weights` / timm's
    cached `pretrained` weights; the init (a dropped classifier's included) is seeded without touching
    the global RNG. `patch_size` applies to presets (timm names take --model-arg patch_size)."""
    args = model_args_lib.as_timm_kwargs(model_args)
    if is_preset(preset):
        p = model_shape(preset)
        timm_name = p.timm_name
        shape = (("embed_dim", p.embed_dim), ("depth", p.depth), ("num_heads", p.num_heads))
        options: dict[str, Any] = {k: v for k, v in shape if v is not None}
        if patch_size is not None or p.patch_size is not None:
            options["patch_size"] = patch_size if patch_size is not None else p.patch_size
        options.update(args)
    else:
        family_lib.for_name(preset)
        timm_name, options = preset, dict(args)
    options.update(in_chans=in_chans, img_size=img_size)
    if weights is not None and pretrained:
        raise UserError("give --weights FILE or --pretrained, not both")
    source = Path(weights).expanduser() if weights is not None else None
    if pretrained:
        source = weights_lib.cached_file(timm_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(timm_name, num_classes, options, source)
    family_lib.of(model)  # a model no family describes cannot be split into parts: say so now
    return model


def block_count(name: str, model_args: Mapping[str, Any] | None = None) -> int:
    """How many blocks (the block column's span) a model has: a preset's depth, or the built model's count."""
    if is_preset(name) and not model_args and model_shape(name).depth is not None:
        return int(model_shape(name).depth)  # type: ignore[arg-type]
    spec = input_spec(name, data_channels=3, data_size=32, model_args=model_args)
    model = build(name, 2, spec.in_chans, spec.img_size, patch_size=spec.patch_size or None, model_args=model_args)
    return len(family_lib.of(model).blocks(model))


def _create(timm_name: str, num_classes: int, options: dict[str, Any], source: Path | None) -> nn.Module:
    try:
        if source is not None:
            return weights_lib.create_from_file(timm_name, source, num_classes=num_classes, **options)
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **options)
    except UserError:
        raise
    except TypeError as err:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if found:
            raise UserError(f"--model-arg {found.group(1)}: {timm_name} does not take it") from None
        raise UserError(f"{timm_name} cannot be built with {model_args_lib.text(options)} ({err})") from None
    except (AssertionError, ValueError, RuntimeError, ZeroDivisionError) as err:
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"{timm_name} cannot be built with {model_args_lib.text(options)} ({message})") from None


def source_options(config: Any) -> dict[str, Any]:
    """The keywords of `build` that a RunConfig sets beyond the shape: model args, weights, pretrained."""
    return {"model_args": config.model_args, "weights": config.weights, "pretrained": config.pretrained}


def source_record(
    name: str, model_args: Mapping[str, Any] | None, weights: str | None, pretrained: bool
) -> dict[str, Any]:
    """What the protocol block prints and protocol.json keeps about the model beyond its name: nothing for a
    plain preset; the model args, the data config (input size, interpolation, mean/std) and the weights
    (file and SHA-256) otherwise."""
    record: dict[str, Any] = {}
    if model_args:
        record["model_args"] = model_args_lib.text(model_args)
    if not is_preset(name):
        config = data_config(name, model_args)
        record.update(
            input_size="x".join(map(str, config["input_size"])),
            interpolation=config.get("interpolation"),
            mean=", ".join(f"{m:.4g}" for m in config["mean"]),
            std=", ".join(f"{s:.4g}" for s in config["std"]),
        )
    if pretrained:
        path = weights_lib.cached_file(model_shape(name).timm_name if is_preset(name) else name)
        record.update(weights=f"pretrained ({path})", weights_sha256=weights_lib.sha256(path))
    elif weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist; give the path of a .safetensors or torch state dict")
        record.update(weights=str(path), weights_sha256=weights_lib.sha256(path))
    return record


@dataclass(frozen=True)
class _Structure:
    """A built model's structure as its family reads it: what the one classification algorithm needs."""

    modules: dict[str, nn.Module]
    roles: dict[str, str]  # module path or parameter name -> part (the blocks' branches)
    whole: dict[str, str]  # module path -> part of its whole subtree
    block_index: dict[str, int]  # block module path -> block number in depth order
    stage_paths: list[str] | None  # stage module paths, for families with stages
    classifiers: tuple[nn.Module, ...]


def _structure(model: nn.Module) -> _Structure:
    family = family_lib.of(model)
    blocks = family.blocks(model)
    get_classifier = getattr(model, "get_classifier", None)
    found = get_classifier() if get_classifier is not None else ()
    classifiers = tuple(found) if isinstance(found, (tuple, list)) else (found,)
    return _Structure(
        dict(model.named_modules()),
        family.roles(model),
        family.whole(model),
        {path: index for index, (path, _) in enumerate(blocks)},
        family.stages(model) if family.stages is not None else None,
        tuple(c for c in classifiers if isinstance(c, nn.Module) and not isinstance(c, nn.Identity)),
    )


def _part_of_module(model: nn.Module, path: str, module: nn.Module, structure: _Structure) -> str | None:
    marked = getattr(type(module), "fedsens_part", None)
    if marked is not None:
        return marked
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or type(module).__name__ == "RmsNorm":
        return "norm"
    if path in structure.roles:  # a block's attention / MLP branch, LayerScale included
        return structure.roles[path]
    if type(module).__name__.startswith("Attention"):
        return "attn"
    if isinstance(module, Mlp):
        return "mlp"
    if module is getattr(model, "patch_embed", None):
        return "embed"
    if any(module is classifier for classifier in structure.classifiers):
        return "head"
    return None


def _classify(model: nn.Module, name: str, structure: _Structure) -> str:
    """The part of one parameter: the outermost plugin or whole-part module above it wins, else the
    parameter's own role, else its innermost typed module."""
    modules = structure.modules
    pieces = name.split(".")
    prefixes = [".".join(pieces[:i]) for i in range(1, len(pieces))]
    for prefix in prefixes:  # outermost first: anything under a plugin is plugin
        if getattr(type(modules[prefix]), "fedsens_part", None) == "plugin":
            return "plugin"
        if prefix in structure.whole:
            return structure.whole[prefix]
    if name in structure.roles:  # a parameter that is a branch's own (BEiT's gamma_1)
        return structure.roles[name]
    for prefix in reversed(prefixes):  # innermost first
        part = _part_of_module(model, prefix, modules[prefix], structure)
        if part is not None:
            return part
    if name in EMBED_PARAMS:
        return "embed"
    raise ValueError(f"parameter {name!r} belongs to no known part; teach personalize.families about it")


def _block_path(name: str, structure: _Structure) -> str | None:
    pieces = name.split(".")
    for i in range(len(pieces) - 1, 0, -1):
        prefix = ".".join(pieces[:i])
        if prefix in structure.block_index:
            return prefix
    return None


def _stage_of(name: str, structure: _Structure) -> int:
    for index, path in enumerate(structure.stage_paths or ()):
        if name.startswith(path + "."):
            return index
    return -1


def _table(model: nn.Module) -> pd.DataFrame:
    """parts(model) plus `alias`: the name with its block's path written `blocks.K` (K in depth order), so that
    a module-path spec such as blocks.3 or blocks.3.attn means the same block on every family."""
    structure = _structure(model)
    rows = []
    for name, p in model.named_parameters():
        path = _block_path(name, structure)
        block = structure.block_index[path] if path is not None else -1
        row = {
            "param": name,
            "part": _classify(model, name, structure),
            "block": block,
            "numel": p.numel(),
            "bytes": p.numel() * p.element_size(),
            "alias": f"blocks.{block}{name[len(path) :]}" if path is not None else name,
        }
        if structure.stage_paths is not None:
            row["stage"] = _stage_of(name, structure)
        rows.append(row)
    columns = ["param", "part", "block", *(["stage"] if structure.stage_paths is not None else [])]
    return pd.DataFrame(rows, columns=[*columns, "numel", "bytes", "alias"])


def parts(model: nn.Module) -> pd.DataFrame:
    """One row per parameter: `param, part, block, numel, bytes` (and `stage` for families with stages,
    after `block`), in the model's order."""
    return _table(model).drop(columns="alias")


def depth(model: nn.Module) -> int:
    """How many blocks the model has, counted in depth order over its family's blocks (all stages)."""
    return len(family_lib.of(model).blocks(model))


def _match_term(table: pd.DataFrame, term: str, depth: int) -> pd.Series:
    if term == "all":
        return pd.Series(True, index=table.index)
    part, _, blocks = term.partition("@")
    if part in PART_TYPES:
        selected = table["part"] == part
        if blocks:
            selected &= table["block"].isin(resolve_blocks(blocks, depth, what=f"part spec term {term!r}"))
        return selected
    if blocks:
        raise UserError(f"part spec {term!r}: '@blocks' needs a part type ({', '.join(PART_TYPES)})")
    # An explicit module path such as blocks.11 or blocks.3.attn: match on whole dotted components, of the
    # parameter's own name or of its depth-order alias (Swin's layers.1.blocks.0 is blocks.K too).
    selected = pd.Series(False, index=table.index)
    for column in ("param", "alias"):
        selected |= (table[column] == term) | table[column].str.startswith(term + ".")
    return selected


def resolve(model: nn.Module, spec: str) -> list[str]:
    """The parameter names a part spec keeps local. Every term must match something."""
    table = _table(model)
    terms = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not terms:
        raise UserError("empty part spec; write e.g. 'none', 'head', 'attn,head', 'attn@9-11' or 'blocks.11'")
    if terms == ["none"]:
        return []
    selected = pd.Series(False, index=table.index)
    for term in terms:
        if term == "none":
            raise UserError(f"part spec {spec!r} mixes 'none' with other terms; use 'none' alone")
        matched = _match_term(table, term, depth(model))
        if not matched.any():
            blocks = table.loc[table["block"] >= 0, "block"]
            span = f"blocks 0-{blocks.max()}" if len(blocks) else "no blocks"
            raise UserError(
                f"part spec term {term!r} matches no parameter of this model "
                f"(parts: {', '.join(sorted(set(table['part'])))}; {span})"
            )
        selected |= matched
    return table.loc[selected, "param"].tolist()


def manifest(model: nn.Module, spec: str) -> pd.DataFrame:
    """parts(model) plus a boolean `local` column for the spec."""
    return marked(model, resolve(model, spec))


def marked(model: nn.Module, local: Iterable[str]) -> pd.DataFrame:
    """parts(model) plus a boolean `local` column: the named parameters (a mechanism's placement) local."""
    table = parts(model)
    table["local"] = table["param"].isin(set(local))
    return table


def describe(table: pd.DataFrame) -> str:
    """A short on-screen summary of a manifest: local vs shared parameters and bytes per part."""

    def side(frame: pd.DataFrame) -> str:
        return f"{int(frame['numel'].sum()):,} params ({int(frame['bytes'].sum()) / 1e6:.2f} MB)"

    local, shared = table[table["local"]], table[~table["local"]]
    kept = ", ".join(f"{part}={int(n):,}" for part, n in local.groupby("part")["numel"].sum().items()) or "nothing"
    return f"local: {side(local)} [{kept}]; shared: {side(shared)}"
