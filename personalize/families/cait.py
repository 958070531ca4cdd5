"""CaiT (timm's Cait): `blocks` of talking-heads self-attention, then `blocks_token_only`, the class-attention
blocks, whose block indices follow the self-attention blocks' (depth, depth + 1, ...). Talking-heads
projections (`proj_l`, `proj_w`) are attn; `gamma_1/gamma_2` belong to their branch."""

from __future__ import annotations

from timm.models.cait import Cait

from fedsens.personalize.families import Family, plain_blocks

FAMILIES = (
    Family(
        "cait",
        "CaiT (self-attention blocks, then class-attention blocks)",
        ("cait",),
        (Cait,),
        ("cait_xxs24_224", "cait_xs24_384", "cait_s24_224"),
        tiny=dict(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=2, depth_token_only=1),
        blocks=plain_blocks("blocks", "blocks_token_only"),
        notes="blocks_token_only.K is block depth+K; proj_l/proj_w are attn",
    ),
)
