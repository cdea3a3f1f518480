"""AdamW with decay only on matrices, and the learning-rate schedules (warmup + cosine, or WSD)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # final lr / peak lr
    decay_fraction: float = 0.2  # wsd only: share of steps spent in the final decay

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.lr <= 0 or self.total_steps <= 0 or self.warmup_steps < 0:
            raise ValueError(
                f"optim needs lr > 0, total_steps > 0, warmup_steps >= 0; got lr={self.lr}, "
                f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ValueError("optim.min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices of linear layers only: not on norms, biases, embeddings (and the
    router's gate, which the aux-loss-free rule already steers)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embed_tokens" in name or name.endswith("gate.weight")
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":  # warmup-stable-decay: flat, then linear decay over the last part
        decay_start = cfg.total_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / max(1.0, cfg.total_steps - decay_start))
        return 1.0 - (1.0 - cfg.min_lr_ratio) * frac
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def build_optimizer(model: nn.Module, cfg: OptimConfig):
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler
