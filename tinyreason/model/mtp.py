"""Multi-token prediction module, DeepSeek-V3 §2.2 eqs. 21-23 (arXiv 2412.19437).

Shape legend: B batch, S positions this depth covers, D hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import LayerCache, Rope
from .layers import Linear, RMSNorm


class MTPModule(nn.Module):
    """Depth-k module: h'_i = M_k [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)], h^k = TRM_k(h').

    Embedding first, as in the released checkpoint, vLLM and Megatron (the paper writes [h; emb]):
    eh_proj.weight[:, :D] multiplies the embedding. The block is passed in so this file does not
    depend on the transformer; embedding and output head stay with the main model (shared).
    `norm` is the final norm before the shared head (HF checkpoint: `shared_head.norm`).
    """

    def __init__(self, hidden_size: int, eps: float, block: nn.Module) -> None:
        super().__init__()
        self.enorm = RMSNorm(hidden_size, eps)
        self.hnorm = RMSNorm(hidden_size, eps)
        self.eh_proj = Linear(2 * hidden_size, hidden_size)  # M_k
        self.block = block
        self.norm = RMSNorm(hidden_size, eps)

    def forward(
        self,
        emb_BSD: torch.Tensor,
        h_prev_BSD: torch.Tensor,
        rope: Rope,
        attn_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """emb = Emb(t_{i+k}) and h^{k-1}_i, aligned per position -> (h^k [B, S, D], balance loss).

        h^k is returned after `norm`: the shared head reads it, and depth k+1 takes it as its
        h^{k-1}, like h^0, which is the main model's final-normed state (Megatron does the same).
        `cache` (drafting, `tinyreason.speculative`): the block's own attention cache over the h'
        sequence; the positions continue the cached ones.
        """
        h_BSD = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_prev_BSD)], dim=-1))
        h_BSD, balance = self.block(h_BSD, rope, cache, attn_mask)
        return self.norm(h_BSD), balance
