"""Leaf layers shared by attention, MoE and the transformer: the linear layer, RMSNorm and the
SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# oneDNN's fp32 GEMM on dense CPU tensors (what inductor's CPU backend calls); None if this torch
# build has no oneDNN.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
ONEDNN_MIN_ROWS = 64  # below this oneDNN's call overhead loses to MKL (decoding, tiny tests)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _ONEDNN_LINEAR(x, weight, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x w^T and dx = dy w on oneDNN; dw = dy^T x on torch's mm, which reads the transposed
    activations in place (oneDNN's op would copy both [rows, features] operands first)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad_y, weight.t().contiguous())  # dy w
        if ctx.needs_input_grad[1]:  # dy^T x: torch's mm, which reads transposes in place
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on CPU, outside autocast (which runs bf16 GEMMs on oneDNN itself), >= 64 rows, eager
    (inductor lowers `F.linear` itself, not this op)."""
    return (
        _ONEDNN_LINEAR is not None
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x w^T, as F.linear without bias. On CPU in fp32 the forward and input-gradient GEMMs go to
    oneDNN instead of torch's default BLAS: MKL checks the CPU vendor and runs its AVX2 kernels on
    AMD, at half the rate of oneDNN's AVX-512 ones (a 2048^3 fp32 matmul: 214 vs 467 GFLOP/s on
    the project's EPYC machine). Same fp32 math; only the summation order differs."""
    if uses_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight)
    return F.linear(x, weight)


@torch.no_grad()
def init_normal_(param: torch.Tensor, std: float) -> None:
    """param ~ N(0, std), in place. A DTensor (FSDP2 / expert-parallel shards) draws its full
    tensor and keeps its own shard, so a sharded model's weights equal the same model built whole
    after the same seed (meta-device init == eager init)."""
    if isinstance(param, DTensor):
        full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        nn.init.normal_(full, mean=0.0, std=std)
        mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(mine.to_local())
    else:
        nn.init.normal_(param, mean=0.0, std=std)


class Linear(nn.Linear):
    """nn.Linear without bias (HF name and layout: `weight` [out, in]) computed by `linear`.

    It has no init of its own: `reset_parameters` draws N(0, `init_std`) once `init_weights`
    (tinyreason/model/transformer.py) has set `init_std` from its table; before that (at
    construction) it draws nothing, so building a model consumes no random numbers and a
    meta-device build initialised later draws exactly what an eager build draws."""

    init_std: float | None = None

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        if self.init_std is not None:
            init_normal_(self.weight, self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm (arXiv 1910.07467) with HF's cast order, needed for bit-level parity:
    normalise in fp32, cast back to the input dtype, then scale by the weight.

    The normalisation is torch's fused `F.rms_norm` (one kernel forward and backward instead of
    five; on CPU half the time of the written-out x * rsqrt(mean(x^2) + eps), same result)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast off: the normalisation must stay fp32 whatever autocast's op lists say (the
        # context is entered only when autocast is on: it costs more than the norm when decoding)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        else:
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Embedding(nn.Embedding):
    """nn.Embedding whose init is N(0, `init_std`), set by `init_weights` (as `Linear`)."""

    init_std: float | None = None

    def reset_parameters(self) -> None:
        if self.init_std is not None:
            init_normal_(self.weight, self.init_std)


class MLP(nn.Module):
    """SwiGLU FFN (arXiv 2002.05202): down(silu(gate(x)) * up(x)). Dense FFN, shared and routed experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
