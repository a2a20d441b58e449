"""Learning-rate schedules, built by Hydra as `_partial_` configs (`conf/optim/*.yaml`: `scheduler`)."""

import torch


def linear_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rises linearly over the first `warmup_steps` steps, then stays constant (0: the
    paper's constant rate from the first step)."""
    warmup = max(warmup_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
