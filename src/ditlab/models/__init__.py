"""DiT models: the backbone, the four conditioning blocks, the size table and LightningDiT's layer axes."""

from ditlab.models.blocks import (
    BLOCKS,
    MLPS,
    NORMS,
    BlockOptions,
    DiTBlock,
    register_block,
    register_mlp,
    register_norm,
)
from ditlab.models.dit import (
    DIT_SIZES,
    PATCH_SIZES,
    DiT,
    DiTSize,
    build_dit,
    complete_config,
    parse_model_name,
    register_size,
)
from ditlab.models.embeddings import POS_EMBEDS, PositionEmbedding, register_pos_embed

__all__ = [
    "BLOCKS",
    "DIT_SIZES",
    "MLPS",
    "NORMS",
    "PATCH_SIZES",
    "POS_EMBEDS",
    "BlockOptions",
    "DiT",
    "DiTBlock",
    "DiTSize",
    "PositionEmbedding",
    "build_dit",
    "complete_config",
    "parse_model_name",
    "register_block",
    "register_mlp",
    "register_norm",
    "register_pos_embed",
    "register_size",
]
