"""ViT, DeiT and DeiT III (timm's VisionTransformer) and DeiT's distilled variants.

Top-level `cls_token`, `reg_token` (registers), `dist_token` and `pos_embed` (with or without
`no_embed_class`) are embed; `ls1`/`ls2` (LayerScale, DeiT III) belong to the branch they scale;
`fc_norm` and `norm` are norm; the attention-pool head (`global_pool='map'`: `attn_pool`, its own
attention, MLP and norm included) is head, as are `head` and the distilled `head_dist`.
"""

from __future__ import annotations

from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fedsens.personalize.families import Family


def _attention_pool(model: nn.Module) -> dict[str, str]:
    return {"attn_pool": "head"} if getattr(model, "attn_pool", None) is not None else {}


TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)

FAMILIES = (
    Family(
        "vit",
        "ViT, DeiT, DeiT III (timm VisionTransformer)",
        ("vision_transformer", "deit"),
        (VisionTransformer,),
        ("vit_small_patch16_224", "deit_small_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2"),
        tiny=TINY,
        whole=_attention_pool,
        notes="ls1/ls2 with their branch; registers and no_embed_class pos_embed are embed; attn_pool is head",
    ),
    Family(
        "deit-distilled",
        "DeiT, distilled (class + distillation token, two heads)",
        ("deit",),
        (VisionTransformerDistilled,),
        ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_384"),
        tiny=TINY,
        whole=_attention_pool,
        notes="dist_token is embed; head_dist is head",
    ),
)
