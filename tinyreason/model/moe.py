"""DeepSeekMoE: sigmoid router with group-limited top-k and aux-loss-free bias, routed experts
(reference per-expert loop), shared experts, and the sequence-wise balance loss.
DeepSeek-V3 report §2.1.2, eqs. 12-20 (arXiv 2412.19437).

Shape legend: B batch, S sequence, T tokens (B*S flattened), D hidden size, E routed experts,
K experts per token, G expert groups, X experts per group (E/G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, MoEConfig
from .layers import MLP


class Router(nn.Module):
    """Sigmoid top-k router (HF `DeepseekV3TopkRouter` numerics).

    `weight` is a bare Parameter, not an nn.Linear, so FP8 conversion that swaps nn.Linear leaves the
    router alone; routing runs in fp32 even under autocast because near-ties flip experts.
    """

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.num_groups, self.topk_groups = (
            moe.num_experts_per_tok,
            moe.num_groups,
            moe.topk_groups,
        )
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, hidden_size))  # e_i of eq. 15
        # b_i of eq. 16: used only to pick experts; persistent so it is saved and exported.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(moe.num_experts, dtype=torch.float32)
        )

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (expert ids [T, K], gate weights [T, K] fp32, unbiased scores [T, E] fp32)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()  # eq. 15
            biased_TE = scores_TE.detach() + self.e_score_correction_bias.float()
            if self.num_groups > 1:
                biased_TE = self._limit_to_groups(biased_TE)
            ids_TK = biased_TE.topk(self.top_k, dim=-1).indices
            # Gate weights come from the unbiased scores (eq. 13), normalised over the chosen K.
            w_TK = scores_TE.gather(1, ids_TK)
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        return ids_TK, w_TK, scores_TE

    def _limit_to_groups(self, biased_TE: torch.Tensor) -> torch.Tensor:
        """Node-limited routing (§2.1.2): rank groups by the sum of their top-2 biased scores,
        keep `topk_groups` groups and hide the others from top-k with -inf."""
        T, E = biased_TE.shape
        biased_TGX = biased_TE.view(T, self.num_groups, E // self.num_groups)
        group_scores_TG = biased_TGX.topk(2, dim=-1).values.sum(dim=-1)
        keep_TK = group_scores_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, keep_TK, True)
        return biased_TGX.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)


def sequence_balance_loss(scores_BSE: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss, eqs. 17-20, averaged over the batch.

    f_i = E/(K*S) * #{t : s_i,t in top-K of the unbiased scores} (a count, no gradient);
    P_i = mean_t s_i,t / sum_j s_j,t;  L = alpha * sum_i f_i P_i. Uniform routing gives L = alpha.
    """
    if alpha == 0:
        return scores_BSE.new_zeros(())
    B, S, E = scores_BSE.shape
    with torch.no_grad():
        top_BSK = scores_BSE.topk(top_k, dim=-1).indices
        ones = torch.ones_like(top_BSK, dtype=scores_BSE.dtype).flatten(1)
        counts_BE = scores_BSE.new_zeros(B, E).scatter_add_(1, top_BSK.flatten(1), ones)
        f_BE = counts_BE * (E / (top_k * S))
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


class MoE(nn.Module):
    """h' = sum_k g_k Expert_{id_k}(u) + Shared(u) (eq. 12; the residual is added by the Block)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.num_experts, self.top_k, self.balance_alpha = (
            moe.num_experts,
            moe.num_experts_per_tok,
            moe.balance_alpha,
        )
        d = config.hidden_size
        self.gate = Router(d, moe)
        self.experts = nn.ModuleList(
            MLP(d, moe.moe_intermediate_size) for _ in range(moe.num_experts)
        )
        # All shared experts see every token, so they fuse into one MLP (HF layout).
        shared = moe.num_shared_experts * moe.moe_intermediate_size
        self.shared_experts = MLP(d, shared) if shared > 0 else None
        # Tokens routed to each expert since the last update_bias (training forwards only). Not saved:
        # it is per-step state; a distributed caller all-reduces it before update_bias.
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts), persistent=False)
        self.register_buffer(
            "last_load", torch.zeros(moe.num_experts), persistent=False
        )  # for logging

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output [B, S, D], balance loss scalar, already multiplied by alpha)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        ids_TK, w_TK, scores_TE = self.gate(x_TD)
        out_TD = self._routed_experts(x_TD, ids_TK, w_TK)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        balance = sequence_balance_loss(scores_TE.view(B, S, -1), self.top_k, self.balance_alpha)
        return out_TD.view(B, S, D), balance

    def _routed_experts(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor
    ) -> torch.Tensor:
        """Reference loop: each expert runs on exactly the tokens routed to it (no dropping)."""
        ids_flat = ids_TK.flatten()
        counts_E = torch.bincount(ids_flat, minlength=self.num_experts)
        if self.training:
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
        slots_by_expert = ids_flat.argsort(stable=True).split(counts_E.tolist())
        w_flat = w_TK.flatten()
        out_TD = torch.zeros_like(x_TD)
        for expert, slots in zip(self.experts, slots_by_expert, strict=True):
            if slots.numel() == 0:
                continue
            tokens = slots // self.top_k  # slot t*K + k belongs to token t
            y = expert(x_TD[tokens]) * w_flat[slots, None]
            out_TD.index_add_(0, tokens, y.to(out_TD.dtype))  # combine in the activation dtype
        return out_TD

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing (§2.1.2): b_i += gamma * sign(mean load - load_i), i.e. raise the
        bias of underloaded experts and lower it for overloaded ones; call once per optimizer step."""
        load_E = self.tokens_per_expert
        self.gate.e_score_correction_bias += gamma * torch.sign(load_E.mean() - load_E)
        self.last_load.copy_(load_E)
        load_E.zero_()
