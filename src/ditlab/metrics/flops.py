"""Forward Gflops and parameter counts in the convention of the DiT paper (Table 4)."""

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (the fixed position embedding, a buffer, is not one)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, batch_size: int = 1, visible_tokens: int | None = None) -> int:
    """FLOPs of one forward pass of a DiT on `batch_size` inputs, multiply-adds counted as 2.
    `visible_tokens`: of a masked training pass (MaskDiT, `DiT(..., keep=...)`), the DiT's blocks on this
    many tokens of each image and its decoder on all of them; None: the unmasked pass (sampling's).

    Runs on the meta device with meta copies of the weights: no memory, no arithmetic, well under a
    second even for XL/2, and (unlike on CPU) the counter sees scaled-dot-product attention.
    """
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in (*model.named_parameters(), *model.named_buffers())
    }
    shape = (batch_size, model.in_channels, model.input_size, model.input_size)
    x = torch.empty(shape, device="meta")
    t = torch.zeros(batch_size, dtype=torch.long, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    masked = {} if visible_tokens is None else {"keep": y.new_zeros(batch_size, visible_tokens)}
    was_training = model.training
    model.eval()  # no label dropout, no activation checkpointing
    try:
        with FlopCounterMode(display=False) as counter:
            functional_call(model, meta_state, (x, t, y), masked)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def gflops(model: nn.Module) -> float:
    """Forward Gflops of one sample (the unmasked pass: sampling's, also of a MaskDiT decoder's model), the
    paper's convention: multiply-adds counted once, attention
    included. DiT-XL/2 at 32×32×4: 118.6. Only matrix products (linears, the patch conv) and attention
    count; elementwise work (norms, activations, gates, RoPE, QK-norm) is free in this convention, so
    pos_embed=rope, norm=rmsnorm and qk_norm change nothing and mlp=swiglu changes only the MLP's
    matrices (3·d·h against 8·d² per token and block)."""
    return forward_flops(model) / 2 / 1e9
