"""DiT models: the backbone, the four conditioning blocks and the size table."""

from ditlab.models.blocks import BLOCKS, DiTBlock, get_block, register_block
from ditlab.models.dit import DIT_SIZES, PATCH_SIZES, DiT, DiTSize, build_dit, parse_model_name, register_size

__all__ = [
    "BLOCKS",
    "DIT_SIZES",
    "PATCH_SIZES",
    "DiT",
    "DiTBlock",
    "DiTSize",
    "build_dit",
    "get_block",
    "parse_model_name",
    "register_block",
    "register_size",
]
