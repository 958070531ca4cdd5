"""Swin and Swin V2 (timm's SwinTransformer, SwinTransformerV2): stages `layers.S.blocks.M`.

The block column counts blocks in depth order over all stages and a `stage` column says S. The
window attention's relative-position table (V1) and its continuous position-bias MLP, logit scale
and q/v biases (V2) are attn. The patch-merging `downsample` at the start of stages 1.. is embed:
it re-embeds each 2x2 group of tokens into one token of the next stage, as `patch_embed` embeds
pixels; it has no block (block -1) and the stage it opens.
"""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from fedsens.personalize.families import Block, Family


def _blocks(model: nn.Module) -> list[Block]:
    found: list[Block] = []
    for stage, layer in enumerate(getattr(model, "layers", ())):
        found += [(f"layers.{stage}.blocks.{index}", stage) for index in range(len(layer.blocks))]
    return found


def _stages(model: nn.Module) -> list[str]:
    return [f"layers.{stage}" for stage in range(len(getattr(model, "layers", ())))]


def _downsamples(model: nn.Module) -> dict[str, str]:
    modules = dict(model.named_modules())
    whole = {}
    for path in _stages(model):
        downsample = modules.get(f"{path}.downsample")
        if downsample is not None and not isinstance(downsample, nn.Identity):
            whole[f"{path}.downsample"] = "embed"
    return whole


TINY = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 2), num_heads=(1, 2))

FAMILIES = (
    Family(
        "swin",
        "Swin Transformer (stages of window-attention blocks)",
        ("swin_transformer",),
        (SwinTransformer,),
        ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"),
        tiny=TINY,
        blocks=_blocks,
        whole=_downsamples,
        stages=_stages,
        notes="relative_position_bias_table is attn; the patch-merging downsample is embed",
    ),
    Family(
        "swinv2",
        "Swin Transformer V2 (cosine window attention, continuous position bias)",
        ("swin_transformer_v2",),
        (SwinTransformerV2,),
        ("swinv2_tiny_window8_256", "swinv2_small_window16_256", "swinv2_base_window12to24_192to384"),
        tiny=TINY,
        blocks=_blocks,
        whole=_downsamples,
        stages=_stages,
        notes="cpb_mlp, logit_scale, q_bias and v_bias are attn; the patch-merging downsample is embed",
    ),
)
