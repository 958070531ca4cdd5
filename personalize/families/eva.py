"""EVA and EVA02 (timm's Eva): `q_bias`/`v_bias` or separate `q_proj/k_proj/v_proj` in attention, SwiGLU
MLPs (`fc1_g/fc1_x`, packed `fc1`), `gamma_1/gamma_2` LayerScale with its branch, rotary position
embeddings (RoPE: buffers, no parameters). A norm inside a branch (`scale_mlp`, `scale_attn_inner`) is norm.
"""

from __future__ import annotations

from timm.models.eva import Eva

from fedsens.personalize.families import Family

FAMILIES = (
    Family(
        "eva",
        "EVA, EVA02 (q/v biases or separate q/k/v, SwiGLU, RoPE)",
        ("eva",),
        (Eva,),
        ("eva02_tiny_patch14_224", "eva02_small_patch14_224", "eva_giant_patch14_224"),
        tiny=dict(img_size=28, patch_size=14, embed_dim=24, depth=2, num_heads=2),
        notes="q_bias/v_bias with attn; SwiGLU fc1_g/fc1_x with mlp; gamma_1/gamma_2 with their branch",
    ),
)
