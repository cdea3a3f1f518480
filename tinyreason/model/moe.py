"""DeepSeekMoE: sigmoid router with group-limited top-k and aux-loss-free bias, routed experts
(grouped GEMMs over HF's fused 3-D weights; the per-expert loop as reference), shared experts,
and the sequence-wise balance loss. DeepSeek-V3 report §2.1.2, eqs. 12-20 (arXiv 2412.19437).

Shape legend: B batch, S sequence, T tokens (B*S flattened), D hidden size, E routed experts,
K experts per token, G expert groups, X experts per group (E/G), F expert FFN width,
M token-expert slots (T*K), N tokens of one expert, I and O a grouped GEMM's input and output
widths; under expert parallelism (model/expert_parallel.py) P ranks, L experts a rank (E/P),
R rows a rank receives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, MoEConfig
from .layers import MLP, init_normal_


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

    init_std: float | None = None  # set by init_weights

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init_std is not None:
            init_normal_(self.weight, self.init_std)
        self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse: bool = True):
        """Keep the bias fp32 through `model.to(bf16)` / `.half()` (HF: `_keep_in_fp32_modules`):
        near 1.0 a bf16 step is 2^-7, so bf16 would swallow every gamma = 1e-3 update."""
        super()._apply(fn, recurse)
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the CPU `_grouped_mm`
    backward rejects an expanded grad_output (e.g. from `.sum().backward()`), spec §4.4."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale`: an expert-parallel expert's
    gradient sums every rank's tokens, where data parallelism averages the other gradients over
    the ranks (`Experts.ep_grad_scale` = 1 / ranks makes it the same mean)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None


def grouped_mm_supported(x_MI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs these operands: CUDA sm80+ in bf16; CPU in
    fp32/bf16 when every non-unit stride of the operands and the output is a multiple of 16 bytes
    (torch 2.13 CPU raises "strides should be multiple of 16 bytes" otherwise). Not for M = 0
    rows (an expert-parallel rank may receive no token), which torch 2.13 CPU rejects."""
    if not hasattr(F, "grouped_mm") or x_MI.dtype != w_EIO.dtype or x_MI.shape[0] == 0:
        return False
    if x_MI.device.type == "cuda":
        sm80 = torch.cuda.get_device_capability(x_MI.device) >= (8, 0)
        return sm80 and x_MI.dtype == torch.bfloat16
    if x_MI.device.type != "cpu" or x_MI.dtype not in (torch.float32, torch.bfloat16):
        return False
    size = x_MI.element_size()
    strides = [*x_MI.stride(), *w_EIO.stride(), w_EIO.shape[-1]]  # the last: output row stride
    return all(s * size % 16 == 0 for s in strides if s != 1)


def grouped_mm(x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e]: rows of expert e are offsets[e-1]:offsets[e] (int32,
    cumulative; offsets[-1] == M). The one grouped GEMM of the routed experts.

    This is the hook for low-precision expert GEMMs: `Experts.grouped_mm` calls it for the gate/up
    and the down projection, with `w_EIO` a transposed (column-major) view of the [E, O, I]
    Parameter, the layout FP8 grouped kernels expect. Replace it on an `Experts` instance
    (`experts.grouped_mm = fp8_grouped_mm`, same signature) or in a subclass.
    Runs `F.grouped_mm` where supported, else a loop of matmuls over the groups (same result).
    (A loop of oneDNN GEMMs, as `layers.linear` uses for fp32 on CPU, is slower here: every step
    brings new group sizes, and oneDNN builds a kernel per shape.)
    """
    if grouped_mm_supported(x_MI, w_EIO):
        return _ContiguousGrad.apply(F.grouped_mm(x_MI, w_EIO, offs=offsets_E))
    ends = offsets_E.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat(
        [x_MI[a:b] @ w_EIO[e] for e, (a, b) in enumerate(zip(starts, ends, strict=True))]
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when it is on (grouped_mm is not an autocast op), else the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _routed(
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    w_TK: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    mm=grouped_mm,
) -> torch.Tensor:
    """`Experts.forward` on one rank: sort the T*K slots by expert, two grouped GEMMs (`mm`)."""
    T, K = ids_TK.shape
    E = gate_up_E2FD.shape[0]
    ids_M = ids_TK.flatten()
    order_M = ids_M.argsort(stable=True)  # slot t*K + k, grouped by expert
    offsets_E = torch.bincount(ids_M, minlength=E).cumsum(0).to(torch.int32)
    tokens_M = order_M // K
    dtype = _compute_dtype(x_TD)
    # Cast the T rows, then gather the M = T*K. index_select, not x[tokens]: its backward is
    # index_add_, ~10x faster on CPU than indexing's accumulating index_put_.
    x_MD = x_TD.to(dtype).index_select(0, tokens_M)
    gate_up_M2F = mm(x_MD, gate_up_E2FD.to(dtype).transpose(-2, -1), offsets_E)
    gate_MF, up_MF = gate_up_M2F.chunk(2, dim=-1)
    h_MF = F.silu(gate_MF) * up_MF * w_TK.flatten().index_select(0, order_M)[:, None].to(dtype)
    y_MD = mm(h_MF, down_EDF.to(dtype).transpose(-2, -1), offsets_E)
    out_TD = torch.zeros(T, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
    return out_TD.index_add_(0, tokens_M, y_MD.float()).to(x_TD.dtype)


@torch.library.custom_op("tinyreason::routed_experts", mutates_args=())
def routed_experts(
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    w_TK: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
) -> torch.Tensor:
    """`_routed` as one op that `torch.compile` does not trace into: the group sizes are data
    (a traced loop over them would break the graph every MoE layer), and fp32 `grouped_mm` has
    no meta kernel in torch 2.13. Inference only (no autograd formula): compiled decoding."""
    return _routed(x_TD, ids_TK, w_TK, gate_up_E2FD, down_EDF)


@routed_experts.register_fake
def _(x_TD, ids_TK, w_TK, gate_up_E2FD, down_EDF):
    return torch.empty_like(x_TD)


# Inference with fewer than this many token-expert rows per expert runs `Experts.dense`.
DENSE_MAX_ROWS = 32


class Experts(nn.Module):
    """The E routed SwiGLU experts as fused 3-D weights, HF `DeepseekV3Experts` names and shapes:
    `gate_up_proj` [E, 2F, D] (rows [0, F) gate, [F, 2F) up) and `down_proj` [E, D, F].

    `forward` sorts the token-expert slots by expert and runs two grouped GEMMs; `reference` is the
    plain per-expert loop over the same tensors, kept for tests. Neither drops tokens.
    """

    grouped_mm = staticmethod(grouped_mm)  # the low-precision hook, see `grouped_mm`
    # Expert parallelism, set by `expert_parallel.shard_experts`: the weights are then DTensors
    # Shard(0) over `ep_group`; rank r holds experts [r*E/ep_size, (r+1)*E/ep_size).
    ep_group: dist.ProcessGroup | None = None
    ep_size, ep_rank = 1, 0
    ep_grad_scale = 1.0  # the training strategy's choice: 1 / ranks when it averages gradients

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        E, D, F_ = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    init_std: float | None = None  # set by init_weights: gate_up_proj's std ..
    residual_std: float | None = None  # .. and down_proj's (it writes into the residual stream)

    def reset_parameters(self) -> None:
        if self.init_std is not None:
            init_normal_(self.gate_up_proj, self.init_std)
            init_normal_(self.down_proj, self.residual_std)

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """sum_k w[t, k] * Expert_{ids[t, k]}(x[t]) -> [T, D] in x's dtype.

        The GEMMs run in autocast's dtype when it is on. The gate weight scales the [M, F] hidden
        state before the down projection (linear, so the same sum, on fewer numbers than the
        [M, D] output), and the K slots of a token are summed in fp32.
        """
        if self.ep_group is not None:
            return self._forward_expert_parallel(x_TD, ids_TK, w_TK)
        # inference with the plain GEMMs (a wrapper of them, e.g. training.memory's, keeps them
        # in `.hook`; a low-precision hook such as FP8's keeps its own path)
        plain = getattr(self.grouped_mm, "hook", self.grouped_mm) is grouped_mm
        if not torch.is_grad_enabled() and plain:
            T, K = ids_TK.shape
            if T * K < DENSE_MAX_ROWS * self.num_experts:  # a few rows per expert: decoding
                return self.dense(x_TD, ids_TK, w_TK)
            if torch.compiler.is_compiling():  # compiled: one opaque op (see `routed_experts`)
                return routed_experts(x_TD, ids_TK, w_TK, self.gate_up_proj, self.down_proj)
        return _routed(x_TD, ids_TK, w_TK, self.gate_up_proj, self.down_proj, self.grouped_mm)

    def dense(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """`forward` for a handful of tokens (decoding): every expert on every token, weighted by
        a gate that is 0 outside the token's top-k, so the same sum as `forward` up to rounding.
        E/K times the routed FLOPs, in two large GEMMs (one [T, D] @ [D, E*2F] and a batched
        [E, T, F] @ [E, F, D]) instead of 2E tiny ones plus the sort and scatter around them:
        at 64 tokens over 8 experts (16 rows each) that is the cheaper side, and every shape is
        static (what a compiled decode step and CUDA graphs need)."""
        T, (E, F2, D) = x_TD.shape[0], self.gate_up_proj.shape
        dtype = _compute_dtype(x_TD)
        gate_TE = torch.zeros(T, E, dtype=dtype, device=x_TD.device)
        gate_TE = gate_TE.scatter(1, ids_TK, w_TK.to(dtype))
        h_TE2F = (x_TD.to(dtype) @ self.gate_up_proj.to(dtype).view(E * F2, D).t()).view(
            T, E, 2, F2 // 2
        )
        a_TEF = F.silu(h_TE2F[:, :, 0]) * h_TE2F[:, :, 1] * gate_TE[:, :, None]
        y_ETD = a_TEF.transpose(0, 1) @ self.down_proj.to(dtype).transpose(1, 2)
        return y_ETD.float().sum(0).to(x_TD.dtype)

    def _forward_expert_parallel(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor
    ) -> torch.Tensor:
        """`forward` with the experts split over the EP group (P ranks, L = E/P local experts):
        the slots, sorted by global expert, go to their expert's rank (all_to_all, uneven splits),
        are regrouped by local expert for the same two grouped GEMMs on the local weights, and
        come back. The gate weight then scales each returned [M, D] row in fp32 (EP=1 scales the
        [M, F] hidden state: the same sum, another rounding). R: the rows this rank receives."""
        from torch.distributed._functional_collectives import all_to_all_single  # autograd-aware

        group, P, L = self.ep_group, self.ep_size, self.num_experts // self.ep_size
        T, K = ids_TK.shape
        ids_M = ids_TK.flatten()
        order_M = ids_M.argsort(stable=True)  # by global expert, so also by destination rank
        tokens_M = order_M // K
        with torch.no_grad():  # recv_PL[p, l]: slots rank p sends to this rank's expert l
            send_E = torch.bincount(ids_M, minlength=self.num_experts)
            recv_PL = torch.empty_like(send_E)
            dist.all_to_all_single(recv_PL, send_E, group=group)
            recv_PL = recv_PL.view(P, L)
            local_R = torch.arange(L, device=ids_M.device).repeat(P)
            order_R = local_R.repeat_interleave(recv_PL.flatten()).argsort(stable=True)
            offsets_L = recv_PL.sum(0).cumsum(0).to(torch.int32)
        send_P, recv_P = send_E.view(P, L).sum(1).tolist(), recv_PL.sum(1).tolist()
        dtype = _compute_dtype(x_TD)
        x_MD = x_TD.to(dtype).index_select(0, tokens_M)
        x_RD = all_to_all_single(x_MD, recv_P, send_P, group)  # by (source rank, local expert)
        x_RD = x_RD.index_select(0, order_R)  # by local expert
        gate_up_L2FD = _ScaleGrad.apply(self.gate_up_proj.to_local(), self.ep_grad_scale)
        down_LDF = _ScaleGrad.apply(self.down_proj.to_local(), self.ep_grad_scale)
        gate_up_R2F = self.grouped_mm(x_RD, gate_up_L2FD.to(dtype).transpose(-2, -1), offsets_L)
        gate_RF, up_RF = gate_up_R2F.chunk(2, dim=-1)
        y_RD = self.grouped_mm(
            F.silu(gate_RF) * up_RF, down_LDF.to(dtype).transpose(-2, -1), offsets_L
        )
        y_RD = y_RD.index_select(0, order_R.argsort())  # back to (source rank, local expert)
        y_MD = all_to_all_single(y_RD, send_P, recv_P, group)  # in the order of order_M
        w_M = w_TK.flatten().index_select(0, order_M).float()
        out_TD = torch.zeros(T, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
        return out_TD.index_add_(0, tokens_M, y_MD.float() * w_M[:, None]).to(x_TD.dtype)

    def reference(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor
    ) -> torch.Tensor:
        """The per-expert loop (HF "eager" experts): expert e runs on exactly its tokens."""
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            token_N, k_N = torch.where(ids_TK == e)
            if token_N.numel() == 0:
                continue
            gate_NF, up_NF = F.linear(x_TD[token_N], self.gate_up_proj[e]).chunk(2, dim=-1)
            y_ND = F.linear(F.silu(gate_NF) * up_NF, self.down_proj[e])
            out_TD.index_add_(0, token_N, (y_ND * w_TK[token_N, k_N, None]).to(out_TD.dtype))
        return out_TD


class MoE(nn.Module):
    """h' = sum_k g_k Expert_{id_k}(u) + Shared(u) (eq. 12; the residual is added by the Block)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.num_experts, self.top_k = moe.num_experts, moe.num_experts_per_tok
        self.loss_alpha = moe.loss_alpha  # 0 unless model.moe.balance has the loss
        d = config.hidden_size
        self.gate = Router(d, moe)
        self.experts = Experts(moe.num_experts, d, moe.moe_intermediate_size)
        # All shared experts see every token, so they fuse into one MLP (HF layout).
        shared = moe.num_shared_experts * moe.moe_intermediate_size
        self.shared_experts = MLP(d, shared) if shared > 0 else None
        # Tokens routed to each expert since the last update_bias (training forwards only). Not saved:
        # it is per-step state; a distributed caller all-reduces it before update_bias. int64, so
        # that a cast of the model to bf16 cannot round the counts.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.long), persistent=False
        )
        self.register_buffer(  # the load of the last update_bias, for logging
            "last_load", torch.zeros(moe.num_experts, dtype=torch.long), persistent=False
        )

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output [B, S, D], balance loss scalar, already multiplied by alpha)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        ids_TK, w_TK, scores_TE = self.gate(x_TD)
        if self.training:  # the load of the experts actually selected (post-bias, post-group)
            self.tokens_per_expert += torch.bincount(ids_TK.flatten(), minlength=self.num_experts)
        out_TD = self.experts(x_TD, ids_TK, w_TK)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        balance = sequence_balance_loss(scores_TE.view(B, S, -1), self.top_k, self.loss_alpha)
        return out_TD.view(B, S, D), balance

    @torch.no_grad()
    def reset_parameters(self) -> None:  # its own tensors are the counters (meta-device init)
        self.tokens_per_expert.zero_()
        self.last_load.zero_()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing (§2.1.2): b_i += gamma * sign(mean load - load_i), i.e. raise the
        bias of underloaded experts and lower it for overloaded ones; call once per optimizer step.
        Moves the counts to `last_load` and zeroes them (also with gamma = 0)."""
        load_E = self.tokens_per_expert.float()
        if gamma:
            self.gate.e_score_correction_bias += gamma * torch.sign(load_E.mean() - load_E)
        self.last_load.copy_(self.tokens_per_expert)
        self.tokens_per_expert.zero_()


def load_stats(load_E: torch.Tensor) -> dict[str, float]:
    """Balance of one layer's per-expert token counts: MaxVio = max load / mean load - 1 (Wang et
    al. 2024, arXiv 2408.15664), coefficient of variation std / mean, and experts with no token."""
    load_E = load_E.double()
    mean = load_E.mean().clamp(min=1e-9)
    return {
        "max_vio": (load_E.max() / mean - 1).item(),
        "cv": (load_E.std(unbiased=False) / mean).item(),
        "dead": float((load_E == 0).sum().item()),
    }
