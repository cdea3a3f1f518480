"""Leaf layers shared by attention, MoE and the transformer: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (arXiv 1910.07467) with HF's cast order, needed for bit-level parity:
    normalise in fp32, cast back to the input dtype, then scale by the weight.

    The normalisation is torch's fused `F.rms_norm` (one kernel forward and backward instead of
    five; on CPU half the time of the written-out x * rsqrt(mean(x^2) + eps), same result)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast off: the normalisation must stay fp32 whatever autocast's op lists say
        with torch.autocast(x.device.type, enabled=False):
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU FFN (arXiv 2002.05202): down(silu(gate(x)) * up(x)). Dense FFN, shared and routed experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
