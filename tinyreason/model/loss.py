"""The output head, and its cross-entropy computed chunk by chunk over the tokens so that training
never holds the [N, V] logits: at V = 151,936 and N = 2,048 they take 1.2 GiB in fp32, ~3.4 GiB at
the peak with their gradient. The idea of Liger Kernel's fused linear cross-entropy and of Cut
Cross-Entropy (Wijmans et al., arXiv 2411.09009), in plain PyTorch.

Shape legend: N rows (tokens), C rows of one chunk, D hidden size, V vocab.
"""

from __future__ import annotations

import torch

from .layers import Linear, linear, uses_onednn

IGNORE_INDEX = -100  # a target that is not scored (torch's default ignore_index)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed CE of the logits h_ND @ weight_VD^T against targets_N, rows not IGNORE_INDEX.

    Forward: each chunk's fp32 logits [C, V] give its rows' log-sum-exp and target logit, then
    are dropped; saved for backward are h, weight, targets and the log-sum-exp [N] (fp32).
    Backward: recompute each chunk's logits; d loss / d logits = softmax - onehot (softmax =
    exp(logits - lse)), zero on ignored rows, times the incoming gradient; then grad_h of the
    chunk's rows = g_CV @ weight_VD and grad_weight += g_CV^T @ h_CD. One GEMM more than the
    unchunked head (the recomputation), at most [C, V] of logits alive at a time.

    `dtype`: autocast's GEMM dtype (None outside autocast). Autocast is then off inside and the
    operands are cast once, so the GEMMs run as autocast would run F.linear, and the softmax is
    taken of the upcast logits, as `cross_entropy(logits.float())` does after the unchunked head.
    """

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, chunk_size: int, dtype: torch.dtype | None):
        device = h_ND.device
        valid_N = targets_N != IGNORE_INDEX
        safe_N1 = targets_N.masked_fill(~valid_N, 0).unsqueeze(1)  # any index for ignored rows
        lse_N = torch.empty(h_ND.shape[0], dtype=_float(weight_VD), device=device)
        target_N = torch.empty_like(lse_N)
        with torch.autocast(device.type, enabled=False):
            h_cast, w_cast = _cast(h_ND, dtype), _cast(weight_VD, dtype)
            for rows in _chunks(h_ND.shape[0], chunk_size):
                logits_CV = linear(h_cast[rows], w_cast).to(lse_N.dtype)
                lse_N[rows] = torch.logsumexp(logits_CV, dim=-1)
                target_N[rows] = logits_CV.gather(1, safe_N1[rows]).squeeze(1)
        ctx.save_for_backward(h_ND, weight_VD, targets_N, lse_N)
        ctx.chunk_size, ctx.autocast_dtype = chunk_size, dtype
        return torch.where(valid_N, lse_N - target_N, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        h_ND, weight_VD, targets_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        valid_N = targets_N != IGNORE_INDEX
        safe_N = targets_N.masked_fill(~valid_N, 0)
        scale_N1 = torch.where(valid_N, grad_total, 0.0).unsqueeze(1)  # d total / d CE_n
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        grad_w_VD = torch.zeros_like(weight_VD, dtype=lse_N.dtype) if need_w else None
        with torch.autocast(h_ND.device.type, enabled=False):
            h_cast, w_cast = _cast(h_ND, ctx.autocast_dtype), _cast(weight_VD, ctx.autocast_dtype)
            w_DV = w_cast.t()
            if uses_onednn(h_cast[: ctx.chunk_size], w_cast):  # oneDNN reads [out, in] contiguous
                w_DV = w_DV.contiguous()
            for rows in _chunks(h_ND.shape[0], ctx.chunk_size):
                logits_CV = linear(h_cast[rows], w_cast).to(lse_N.dtype)
                g_CV = logits_CV.sub_(lse_N[rows, None]).exp_()  # softmax
                g_CV[torch.arange(g_CV.shape[0], device=g_CV.device), safe_N[rows]] -= 1.0
                g_CV = g_CV.mul_(scale_N1[rows]).to(w_cast.dtype)
                if need_h:
                    grad_h_ND[rows] = linear(g_CV, w_DV)
                if need_w:
                    if g_CV.dtype == grad_w_VD.dtype:
                        grad_w_VD.addmm_(g_CV.t(), h_cast[rows])
                    else:  # a low-precision GEMM per chunk, summed in fp32
                        grad_w_VD += g_CV.t() @ h_cast[rows]
        if grad_w_VD is not None:
            grad_w_VD = grad_w_VD.to(weight_VD.dtype)
        return grad_h_ND, grad_w_VD, None, None, None


def _float(x: torch.Tensor) -> torch.dtype:
    """fp32, or float64 for float64 operands (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def _chunks(num_rows: int, chunk_size: int) -> list[slice]:
    return [slice(s, min(s + chunk_size, num_rows)) for s in range(0, num_rows, chunk_size)]


def chunked_cross_entropy(
    h: torch.Tensor, weight_VD: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, number of scored targets) of the logits h [..., D] @ weight_VD^T against
    targets [...] (IGNORE_INDEX: not scored), `chunk_size` rows at a time (None: one chunk)."""
    h_ND, targets_N = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    chunk = chunk_size or max(h_ND.shape[0], 1)
    total = ChunkedCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk, dtype)
    return total, (targets_N != IGNORE_INDEX).sum()


class OutputHead(Linear):
    """The LM head (`weight` [V, D], HF's `lm_head.weight`; the embedding's tensor when tied).
    Its loss is computed here, not after it, so that the head is called as a module either way:
    FSDP2 unshards a module's parameters only in its forward hooks."""

    def forward(
        self, h: torch.Tensor, targets: torch.Tensor | None = None, chunk_size: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """h [..., D] -> logits [..., V]; with targets [...]: (summed CE, number of scored
        targets) by `chunked_cross_entropy`, without the logits."""
        if targets is None:
            return linear(h, self.weight)
        return chunked_cross_entropy(h, self.weight, targets, chunk_size)
