"""BEiT (timm's Beit): per-block relative position bias tables and q/v biases are attn; `gamma_1/gamma_2`
belong to their branch; the shared relative position bias (`use_shared_rel_pos_bias`) is attn, block -1."""

from __future__ import annotations

from timm.models.beit import Beit
from torch import nn

from fedsens.personalize.families import Family


def _shared_bias(model: nn.Module) -> dict[str, str]:
    return {"rel_pos_bias": "attn"} if getattr(model, "rel_pos_bias", None) is not None else {}


FAMILIES = (
    Family(
        "beit",
        "BEiT (relative position bias, LayerScale gamma_1/gamma_2)",
        ("beit",),
        (Beit,),
        ("beit_base_patch16_224", "beit_large_patch16_224", "beitv2_base_patch16_224"),
        tiny=dict(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=2),
        whole=_shared_bias,
        notes="relative_position_bias_table, q_bias, v_bias are attn",
    ),
)
