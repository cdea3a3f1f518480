"""AdamW with decay only on matrices (stock, or with bf16 moments as in DeepSeek-V3), and the
learning-rate schedules (warmup + cosine, or WSD)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "wsd", "constant")
MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    moment_dtype: str = "fp32"  # fp32: torch.optim.AdamW | bf16: BF16MomentAdamW (DeepSeek-V3)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.lr <= 0 or self.total_steps <= 0 or self.warmup_steps < 0:
            raise ValueError(
                f"optim needs lr > 0, total_steps > 0, warmup_steps >= 0; got lr={self.lr}, "
                f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ValueError("optim.min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")
        if self.moment_dtype not in MOMENT_DTYPES:
            raise ValueError(
                f"optim.moment_dtype={self.moment_dtype!r} is not one of {list(MOMENT_DTYPES)}"
            )


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


class BF16MomentAdamW(torch.optim.Optimizer):
    """AdamW (arXiv 1711.05101, torch.optim.AdamW's formulas) that stores both moments in bf16.

    DeepSeek-V3 §3.3.3: "we adopt the BF16 data format instead of FP32 to track the first and
    second moments in the AdamW optimizer", with fp32 master weights. Each step reads the moments
    in fp32, updates them and the parameter in fp32, and stores the moments rounded to bf16 (the
    step itself uses the unrounded fp32 moments). Half the optimizer-state memory of fp32 AdamW.

    bf16 keeps 8 significant bits: an EMA step that changes a moment by less than 2^-9 of its
    value is lost in the rounding, so beta2 close to 1 (0.999) lets the second moment stall;
    DeepSeek-V3 uses betas (0.9, 0.95).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        if betas[1] > 0.99:
            log.warning(
                "bf16 moments with beta2=%s > 0.99 may stall (see BF16MomentAdamW)", betas[1]
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = (
                    state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                )
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.mul_(1 - lr * group["weight_decay"])
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim casts floating state to the parameter's dtype (fp32) on load; the moments were
        # bf16 when saved, so casting them back is exact.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)


def build_optimizer(model: nn.Module, cfg: OptimConfig):
    adamw = BF16MomentAdamW if cfg.moment_dtype == "bf16" else torch.optim.AdamW
    optimizer = adamw(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler
