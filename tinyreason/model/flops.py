"""Training FLOPs per token of a model, for MFU (the peak it is divided by: `training/perf.py`).

6 * N_active (Kaplan et al. 2020: 2 FLOPs per multiply-add forward, twice that backward) plus
the attention-score term of PaLM (Chowdhery et al. 2022, App. B) that parameters do not count.
"""

from __future__ import annotations

from torch import nn

from .config import MLAConfig


def active_params_per_token(model: nn.Module) -> float:
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


def flops_per_token(model: nn.Module, seq_len: int, causal: bool = False) -> float:
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
