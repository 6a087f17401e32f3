"""Learning-rate schedules completed in ``configure_optimizers`` once the number of steps is known."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_ratio: float = 0.1, warmup_steps: int | None = None) -> LambdaLR:
    """Linear warmup to the base LR over ``warmup_steps`` (default ``warmup_ratio`` of all steps), then
    linear decay to 0 at ``num_training_steps`` (sentence-transformers' / BERT's default schedule)."""
    total = max(1, int(num_training_steps))
    warm = int(warmup_steps) if warmup_steps is not None else int(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        return max(0.0, (total - step) / max(1, total - warm))

    return LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, num_training_steps: int) -> LambdaLR:
    """No schedule: the base LR throughout."""
    return LambdaLR(optimizer, lambda step: 1.0)
