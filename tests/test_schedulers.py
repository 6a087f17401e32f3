"""The LR schedules against transformers' own: the learning rate at every optimizer step."""

from __future__ import annotations

import pytest
import torch
from transformers import get_constant_schedule, get_linear_schedule_with_warmup

from embedlab.errors import ConfigError, UserError
from embedlab.lightning.schedulers import constant, linear_warmup

BASE_LR = 3e-5


def lr_trace(make_scheduler, steps: int) -> list[float]:
    """The LR of each update ``0 .. steps-1`` on a one-parameter AdamW, stepping the scheduler after each
    update as the LightningModule does (interval: step)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(("warmup_steps", "total"), [(0, 10), (1, 10), (3, 10), (10, 10), (4, 7), (12, 10), (0, 1), (1, 1)])
def test_linear_warmup_matches_transformers_with_warmup_steps(warmup_steps, total):
    """Given ``warmup_steps``: transformers' ``get_linear_schedule_with_warmup`` at every step, including
    steps past the end (LR stays 0) and a warm-up longer than training."""
    ours = lr_trace(lambda opt: linear_warmup(opt, num_training_steps=total, warmup_steps=warmup_steps), total + 3)
    reference = lr_trace(lambda opt: get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup_steps, num_training_steps=total), total + 3)
    assert ours == reference


def test_linear_warmup_starts_at_zero_and_peaks_after_warmup():
    """By hand: 4 warm-up steps of 10 give factors 0, 1/4, 2/4, 3/4, then 1 at step 4 and (10-s)/6 after."""
    expected = [BASE_LR * f for f in (0, 0.25, 0.5, 0.75, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0)]
    assert lr_trace(lambda opt: linear_warmup(opt, num_training_steps=10, warmup_steps=4), 11) == pytest.approx(expected, rel=0, abs=1e-18)


@pytest.mark.parametrize(("warmup_ratio", "total"), [(0.0, 10), (0.1, 10), (0.1, 25), (0.1, 30), (0.06, 1000), (0.25, 7), (0.99, 5)])
def test_linear_warmup_ratio_matches_transformers_trainer(warmup_ratio, total):
    """Given a ratio: the warm-up length the transformers Trainer derives from it (``TrainingArguments``
    with a fractional ``warmup_steps``; 1.0 would mean one step there), then the same schedule step for step."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", warmup_steps=warmup_ratio, report_to=[])
    warmup_steps = args.get_warmup_steps(total)
    ours = lr_trace(lambda opt: linear_warmup(opt, num_training_steps=total, warmup_ratio=warmup_ratio), total + 1)
    reference = lr_trace(lambda opt: get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup_steps, num_training_steps=total), total + 1)
    assert ours == reference


def test_warmup_steps_overrides_ratio():
    """``warmup_steps`` wins over ``warmup_ratio`` (2 steps, not ceil(0.5 * 10) = 5)."""
    ours = lr_trace(lambda opt: linear_warmup(opt, num_training_steps=10, warmup_ratio=0.5, warmup_steps=2), 10)
    assert ours == lr_trace(lambda opt: get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10), 10)


def test_linear_warmup_rejects_bad_values_with_the_config_key():
    with pytest.raises(ConfigError, match=r"^module\.scheduler\.warmup_ratio must be in \[0, 1\], got 1\.5$") as info:
        linear_warmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_training_steps=10, warmup_ratio=1.5)
    assert isinstance(info.value, UserError)
    with pytest.raises(ConfigError, match=r"^module\.scheduler\.warmup_steps must be >= 0, got -1$"):
        linear_warmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_training_steps=10, warmup_steps=-1)


def test_constant_matches_transformers():
    assert lr_trace(lambda opt: constant(opt, num_training_steps=5), 7) == lr_trace(get_constant_schedule, 7) == [BASE_LR] * 7
