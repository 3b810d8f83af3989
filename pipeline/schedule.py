"""The optimiser and the learning-rate schedule of the train stage, as the reference configures
them: AdamW with the backbone at a fraction of the lr, mmcv's cosine annealing with a linear
warm-up stepped once per iteration, and the lr rescaled for a global batch other than 48."""

from __future__ import annotations

import math
import warnings

import torch

from pipeline.settings import REFERENCE_BATCH


def lr_factor(it: int, max_iters: int, warmup_iters: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """mmcv's CosineAnnealing with linear warm-up, as a factor of the base learning rate."""
    cosine = min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * it / max(1, max_iters))) / 2
    if it < warmup_iters:
        return cosine * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))
    return cosine


def lr_schedule(
    optimizer: torch.optim.Optimizer, max_iters: int, warmup_iters: int, warmup_ratio: float, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each parameter group's learning rate: its base rate (the `lr` it was built with) times
    `lr_factor` of the iterations done; step it once per iteration, skipped updates included."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, max_iters, warmup_iters, warmup_ratio, min_lr_ratio)
    )


def scaled_lr(lr: float, total_batch: int, rule: str) -> float:
    """train.lr for a global batch other than the reference's 48 (train.lr_scaling).

    reference: x2/3 per halving of the batch (x3/2 per doubling), the rule the reference's
    maintainer gives users with fewer devices: lr * (batch / 48) ** log2(3/2), between sqrt and
    linear. AdamW normalises each update by the gradient's scale, so the batch changes the noise
    of an update more than its size: sqrt, lr * sqrt(batch / 48), is the usual rule for Adam;
    linear, lr * batch / 48 (Goyal et al., for SGD), shrinks it most. none: lr as written.
    """
    ratio = total_batch / REFERENCE_BATCH
    exponent = {"none": 0.0, "reference": math.log2(1.5), "linear": 1.0, "sqrt": 0.5}[rule]  # the schema's LR_SCALING
    return lr * ratio**exponent


def adamw(model: torch.nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with two groups: the image backbone at lr x backbone_lr_mult, the rest at lr."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("img_backbone") and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not n.startswith("img_backbone") and p.requires_grad]
    return torch.optim.AdamW(
        [{"params": backbone, "lr": lr * backbone_lr_mult}, {"params": others, "lr": lr}],
        lr=lr,
        weight_decay=weight_decay,
    )


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """scheduler.step(), quiet about a first iteration whose update was skipped (non-finite):
    the schedule counts iterations, taken or not."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()
