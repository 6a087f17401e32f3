"""Learning-rate schedules completed in ``configure_optimizers`` once the number of steps is known.

Each schedule is a factory ``(optimizer, num_training_steps, **options) -> LambdaLR``: the config gives the
options as a ``_partial_`` and :class:`embedlab.lightning.BiEncoderModule` adds the optimizer and the
number of optimizer steps. The module steps the scheduler once per optimizer step, so the factor at step
``s`` is the one applied to the update that follows ``s`` earlier updates (step 0: the first update).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from embedlab.errors import ConfigError


def linear_warmup(optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_ratio: float = 0.1, warmup_steps: int | None = None) -> LambdaLR:
    """Linear warm-up from 0 to the base LR, then linear decay to 0 at ``num_training_steps``.

    The factor at step ``s`` (``W`` warm-up steps, ``T`` training steps) is::

        s / W                    for s < W      (0 at the first update, as in BERT)
        max(0, (T - s) / (T - W)) for s >= W     (1 at s = W, 0 at s = T)

    which is transformers' ``get_linear_schedule_with_warmup``, the default schedule of the
    sentence-transformers trainer, step for step. ``W`` is ``warmup_steps`` when given, else
    ``ceil(warmup_ratio * T)`` (how the transformers Trainer turns a ratio into steps), so 0.1 of
    25 steps warms up over 3 steps. ``warmup_steps=0`` (or ``warmup_ratio=0``) starts at the base LR.
    """
    if warmup_steps is not None and warmup_steps < 0:
        raise ConfigError(f"module.scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0 <= warmup_ratio <= 1:
        raise ConfigError(f"module.scheduler.warmup_ratio must be in [0, 1], got {warmup_ratio}")
    total = int(num_training_steps)
    warm = int(warmup_steps) if warmup_steps is not None else math.ceil(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        return max(0.0, (total - step) / max(1, total - warm))

    return LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, num_training_steps: int) -> LambdaLR:
    """No schedule: the base LR at every step (transformers' ``get_constant_schedule``).

    ``num_training_steps`` is accepted and unused, so every schedule has the same signature."""
    return LambdaLR(optimizer, lambda step: 1.0)
