"""Training FLOPs per token and the peak FLOP/s they are divided by, for MFU.

6 * N_active (Kaplan et al. 2020: 2 FLOPs per multiply-add forward, twice that backward) plus
the attention-score term of PaLM (Chowdhery et al. 2022, App. B) that parameters do not count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .config import MLAConfig
from .layers import linear

if TYPE_CHECKING:
    from .transformer import CausalLM


def active_params_per_token(model: CausalLM) -> float:
    """Parameters one token multiplies through in a training forward.

    Counts every unique parameter, except: the embedding lookup (not a matmul; a tied table is
    counted once, as the head), and routed experts beyond the K of E a token uses (shared experts
    count fully). The shared head is counted once more per MTP depth, since it runs again there.
    Norm weights are included (negligible, as in nanoGPT).
    """
    cfg = model.config
    n = float(model.num_params(exclude_embeddings=not cfg.tie_word_embeddings))
    for moe in model.moe_layers():
        routed = sum(p.numel() for p in moe.experts.parameters())
        n -= routed * (1 - moe.top_k / moe.num_experts)
    return n + cfg.mtp.depth * model.lm_head.weight.numel()


def flops_per_token(model: CausalLM, seq_len: int, causal: bool = False) -> float:
    """6 * N_active + 6 * layers * S * H * (d_qk + d_v).

    Per token and layer the forward computes q.k against S keys and the weighted sum of S values:
    2*S*H*(d_qk + d_v) FLOPs, times 3 for forward + backward. No causal halving by default (PaLM
    convention, so MFU numbers compare with published ones); `causal=True` halves the attention
    term: the least work any causal implementation must do (a lower bound, for speed ceilings).
    MTP blocks count as extra attention layers.
    """
    cfg = model.config
    a = cfg.attention
    if isinstance(a, MLAConfig):
        qk_dim, v_dim = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    else:
        qk_dim = v_dim = a.resolved_head_dim(cfg.hidden_size)
    attn_layers = cfg.num_layers + cfg.mtp.depth
    attention = 6 * attn_layers * seq_len * a.num_heads * (qk_dim + v_dim)
    if causal:
        attention /= 2
    return 6 * active_params_per_token(model) + attention


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, by device-name substring
# (first match wins); the convention of nanochat and torchtitan for GPU MFU.
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}


def matmul_flops(
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    n: int = 2048,
    reps: int = 3,
) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` timed here: the median of `reps` after a warm-up,
    for torch's `a @ b` and for our `layers.linear` (which takes oneDNN for fp32 on CPU, where
    torch's MKL can be half as fast); the faster of the two."""
    device = torch.device(device)
    n = _affordable_size(dtype, device, n)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for matmul in (torch.matmul, linear):
        times = []
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock() - start)
        best = max(best, 2 * n**3 / sorted(times[1:])[reps // 2])
    return best


def _affordable_size(dtype: torch.dtype, device: torch.device, n: int) -> int:
    """n, halved until one matmul takes under ~0.2 s: a CPU without native bf16 (AVX2 only) runs
    bf16 GEMMs at ~1 GFLOP/s, where 2048^3 would hold the start of a run for minutes."""
    if device.type != "cpu":
        return n
    probe = torch.randn(256, 256, dtype=dtype)
    probe @ probe  # warm-up
    start = time.perf_counter()
    probe @ probe
    rate = 2 * 256**3 / max(time.perf_counter() - start, 1e-9)
    while n > 256 and 2 * n**3 / rate > 0.2:
        n //= 2
    return n


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """What MFU divides by: the data-sheet bf16 peak of a known GPU, else (CPU, other GPUs) the
    measured `matmul_flops` in `dtype`: on CPU, the rate torch's own GEMM reaches here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK_FLOPS.items():
            if key in name:
                return flops
    return matmul_flops(dtype, device)
