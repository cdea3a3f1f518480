"""FP8 training of the linears: torchao's float8 recipes, and DeepSeek-V3's blockwise recipe.

Recipes (what is scaled together; E4M3 = torch.float8_e4m3fn, max 448):

| recipe              | input x          | weight W          | grad dy                | wgrad operands         |
|---------------------|------------------|-------------------|------------------------|------------------------|
| tensorwise          | E4M3, per tensor | E4M3, per tensor  | E5M2, per tensor       | same casts             |
| rowwise             | E4M3, per row    | E4M3, per row     | E4M3, per row          | E4M3, per column       |
| rowwise_with_gw_hp  | E4M3, per row    | E4M3, per row     | E4M3 row (dgrad only)  | bf16 (no FP8)          |
| blockwise           | E4M3, 1x128 tile | E4M3, 128x128     | E4M3, 1x128 tile       | E4M3, 128x1 (tokens)   |

`blockwise` is DeepSeek-V3's (arXiv 2412.19437 §3.3.2, App. B.2): scales from the current amax,
fp32 accumulation, output in the activation dtype. Master weights stay fp32 Parameters under every
recipe, so state dicts hold plain tensors with unchanged names.

Kernels: torchao's `Float8Linear` (`torch._scaled_mm`, sm89+) and torchao's prototype
`fp8_blockwise_mm` (cuBLAS blockwise `F.scaled_mm`, sm90+). Elsewhere the same numerics are
emulated: torchao's `emulate=True`, and `fake_quant` below for the blockwise recipe, which rounds
each tile to E4M3 exactly as the kernels do and multiplies the dequantized fp32 operands, so it
equals the kernel up to the order of fp32 accumulation.

Shape legend: M tokens, K input features (the contraction dim of the forward GEMM), N output features.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchao.float8 import Float8LinearConfig
from torchao.float8.float8_linear import Float8Linear

from tinyreason.model import moe
from tinyreason.model.layers import Linear

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# torchao's training kernels floor the tile amax at 1e-12. (DeepSeek's inference act_quant uses
# 1e-4, which would flush whole tiles of small activation gradients to zero in training.)
AMAX_FLOOR = 1e-12
BLOCK = 128
ACT_TILE = (1, BLOCK)  # x and dy along the contraction dim: per token, per 128 channels
WEIGHT_BLOCK = (BLOCK, BLOCK)
TOKEN_TILE = (BLOCK, 1)  # x and dy for wgrad, whose contraction dim is the tokens

TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
RECIPES = (*TORCHAO_RECIPES, "blockwise")
HIGH_PRECISION = ("lm_head",)  # never converted, whatever their shape


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-448, 448] to the nearest E4M3 value, ties to even: equal to
    `y.to(torch.float8_e4m3fn).float()`, in a few vectorised ops (the float8 cast is a slow scalar
    loop on CPU). E4M3 values in [2^e, 2^(e+1)) are spaced 2^(e-3), and 2^-9 below 2^-6
    (subnormals); the exponent bits of y give 2^e."""
    spacing = (y.view(torch.int32) & 0x7F800000).view(torch.float32) * 2**-3
    spacing = spacing.clamp_(min=2**-9)
    return torch.round(y / spacing) * spacing


def fake_quant(x: torch.Tensor, tile: tuple[int, int], pow2: bool = False) -> torch.Tensor:
    """Round x [..., R, C] to E4M3 with one scale per `tile` (rows x cols) of its last two dims;
    -> the dequantized values in fp32.

    Per tile: scale = 448 / max(amax, 1e-12) (in fp64, then fp32, as torchao's kernels; with
    `pow2`, rounded down to a power of two as torchao's rowwise recipes do),
    q = e4m3(clamp(x * scale)), out = q * (1 / scale). A ragged last tile is padded with zeros,
    which changes no amax and no product: it is what a kernel on zero-padded operands computes.
    """
    *lead, R, C = x.shape
    tr, tc = tile
    x = x.float()
    if R % tr or C % tc:
        x = F.pad(x, (0, -C % tc, 0, -R % tr))
    Rp, Cp = x.shape[-2:]
    t = x.reshape(*lead, Rp // tr, tr, Cp // tc, tc)
    amax = t.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=AMAX_FLOOR)
    scale = (E4M3_MAX / amax.double()).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    q = round_to_e4m3((t * scale).clamp_(-E4M3_MAX, E4M3_MAX))
    return (q * scale.reciprocal()).reshape(*lead, Rp, Cp)[..., :R, :C]


class BlockwiseFP8Matmul(torch.autograd.Function):
    """y = x W^T with DeepSeek-V3's three FP8 GEMMs, emulated (spec: deepseek_v3.md §2.4).

    fwd:   y  = q1x128(x)  @ q128x128(W)^T
    dgrad: dx = q1x128(dy) @ q128x128(W)          (dy tiled along N, the contraction dim)
    wgrad: dW = q128x1(dy)^T @ q128x1(x)          (both tiled along M, the tokens)
    The gradient w.r.t. the fp32 master weight is the FP8-computed dW (straight-through).
    """

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype):
        ctx.save_for_backward(x_MK, w_NK)
        with torch.autocast(x_MK.device.type, enabled=False):  # fp32 accumulation
            y_MN = fake_quant(x_MK, ACT_TILE) @ fake_quant(w_NK, WEIGHT_BLOCK).T
        return y_MN.to(out_dtype)

    @staticmethod
    def backward(ctx, dy_MN: torch.Tensor):
        x_MK, w_NK = ctx.saved_tensors
        dx_MK = dw_NK = None
        with torch.autocast(dy_MN.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx_MK = (fake_quant(dy_MN, ACT_TILE) @ fake_quant(w_NK, WEIGHT_BLOCK)).to(
                    x_MK.dtype
                )
            if ctx.needs_input_grad[1]:
                dw_NK = fake_quant(dy_MN, TOKEN_TILE).T @ fake_quant(x_MK, TOKEN_TILE)
        return dx_MK, dw_NK, None


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in here: the autocast dtype of x's device, if enabled."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class BlockwiseFP8Linear(nn.Linear):
    """nn.Linear (no bias) whose forward and backward GEMMs follow the blockwise recipe."""

    emulate: bool = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, emulate: bool) -> BlockwiseFP8Linear:
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight  # the same fp32 Parameter: names and state dict unchanged
        new.emulate = emulate
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _activation_dtype(x)
        x_MK = x.reshape(-1, self.in_features).to(dtype)
        if self.emulate:
            y_MN = BlockwiseFP8Matmul.apply(x_MK, self.weight, dtype)
        else:
            y_MN = _blockwise_kernel(x_MK, self.weight).to(dtype)
        return y_MN.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else "kernels"
        return f"{super().extra_repr()}, fp8=blockwise 1x128/128x128 ({mode})"


def _blockwise_kernel(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """torchao's blockwise FP8 GEMMs (sm90): cuBLAS `F.scaled_mm`, or its Triton GEMMs on a
    torch without it. Its wgrad tiles the tokens by 128, so M is padded with zero rows (no effect
    on any amax or product) and the output sliced back."""
    from torchao.prototype.blockwise_fp8_training.linear import fp8_blockwise_mm

    M = x_MK.shape[0]
    x_MK = F.pad(x_MK.to(torch.bfloat16), (0, 0, 0, -M % BLOCK)).contiguous()
    use_triton = not hasattr(F, "scaled_mm")
    return fp8_blockwise_mm.apply(x_MK, w_NK, BLOCK, torch.bfloat16, use_triton)[:M]


class TorchaoFloat8Linear(Float8Linear):
    """torchao's Float8Linear with autocast handled for every device.

    torchao casts the input to the autocast dtype only under CUDA autocast
    (`torch.is_autocast_enabled()` without a device). Under CPU autocast the input then stayed
    fp32, the emulated GEMMs were autocast to bf16, and `rowwise_with_gw_hp` failed in backward on
    its high-precision wgrad mm (bf16 grad x fp32 input). Here the input is cast like nn.Linear's
    would be, and torchao's GEMMs run with autocast off: fp32 accumulation, output in the
    activation dtype, as `torch._scaled_mm` does on a GPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_activation_dtype(x))
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


class GroupedFP8Matmul(torch.autograd.Function):
    """The routed experts' grouped GEMM y[rows of e] = x[rows of e] @ w[e] with FP8 operands,
    emulated. `block` = 128: DeepSeek's tiles (x and dy 1x128, w 128x128, wgrad 128x1 along each
    expert's tokens); `block` = None: torchao's float8 grouped GEMM (`_Float8GroupedMM`): x and dy
    per row, w per column of each expert, wgrad per column of each expert's tokens, power-of-two
    scales, E4M3 everywhere.
    """

    @staticmethod
    def forward(ctx, x_MI, w_EIO, offsets_E, block: int | None, out_dtype: torch.dtype):
        ctx.save_for_backward(x_MI, w_EIO, offsets_E)
        ctx.block = block
        I, O = w_EIO.shape[-2:]
        x_tile, w_tile = ((1, block), (block, block)) if block else ((1, I), (I, 1))
        with torch.autocast(x_MI.device.type, enabled=False):
            xq = fake_quant(x_MI, x_tile, pow2=not block)
            wq = fake_quant(w_EIO, w_tile, pow2=not block)
            return moe.grouped_mm(xq, wq, offsets_E).to(out_dtype)

    @staticmethod
    def backward(ctx, dy_MO):
        x_MI, w_EIO, offsets_E = ctx.saved_tensors
        block, pow2 = ctx.block, not ctx.block
        O = w_EIO.shape[-1]
        dy_tile, w_tile = ((1, block), (block, block)) if block else ((1, O), (1, O))
        with torch.autocast(dy_MO.device.type, enabled=False):
            dyq = fake_quant(dy_MO, dy_tile, pow2)
            wq_EOI = fake_quant(w_EIO, w_tile, pow2).transpose(-2, -1).contiguous()
            dx_MI = moe.grouped_mm(dyq, wq_EOI, offsets_E).to(x_MI.dtype)
            ends = offsets_E.tolist()
            dw = []
            for a, b in zip([0, *ends[:-1]], ends, strict=True):
                tok_tile = (block or max(b - a, 1), 1)  # along this expert's tokens only
                dw.append(
                    fake_quant(x_MI[a:b], tok_tile, pow2).T @ fake_quant(dy_MO[a:b], tok_tile, pow2)
                )
        return dx_MI, torch.stack(dw).to(w_EIO.dtype), None, None, None


def _pad_groups(x_MI: torch.Tensor, offsets_E: torch.Tensor, align: int):
    """Zero rows after each group so every group size is a multiple of `align` (what FP8 grouped
    kernels need); -> (padded x, padded offsets, destination row of each input row)."""
    M = x_MI.shape[0]
    counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    padded_E = (counts_E + align - 1) // align * align
    pend_E = padded_E.cumsum(0)
    rows_M = torch.arange(M, device=x_MI.device)
    group_M = torch.searchsorted(offsets_E, rows_M.to(offsets_E.dtype), right=True)
    dest_M = (pend_E - padded_E)[group_M] + rows_M - (offsets_E - counts_E)[group_M]
    x_pad = x_MI.new_zeros(int(pend_E[-1]), x_MI.shape[1]).index_copy(0, dest_M, x_MI)
    return x_pad, pend_E.to(torch.int32), dest_M


@dataclass(frozen=True)
class FP8GroupedMM:
    """Drop-in for `tinyreason.model.moe.grouped_mm` (the routed experts' hook), same signature."""

    recipe: str
    emulate: bool

    def __call__(self, x_MI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor):
        block = BLOCK if self.recipe == "blockwise" else None
        if self.emulate:
            return GroupedFP8Matmul.apply(x_MI, w_EIO, offsets_E, block, x_MI.dtype)
        from torchao.prototype.moe_training.blockwise_fp8.grouped_mm import (
            _to_fp8_blockwise_then_scaled_grouped_mm,
        )
        from torchao.prototype.moe_training.fp8_grouped_mm import (
            _to_fp8_rowwise_then_scaled_grouped_mm,
        )

        x_MI = x_MI.to(torch.bfloat16).contiguous()
        if block:  # DeepGEMM when installed, else torchao's dequantize-then-GEMM
            return _to_fp8_blockwise_then_scaled_grouped_mm(x_MI, w_EIO, offsets_E)
        x_pad, offsets_pad, dest_M = _pad_groups(x_MI, offsets_E, 16)
        y = _to_fp8_rowwise_then_scaled_grouped_mm(
            x_pad, w_EIO, offsets_pad, pad_token_groups_for_grouped_mm=False
        )
        return y[dest_M]


def torchao_config(recipe: str, emulate: bool) -> Float8LinearConfig:
    # pad_inner_dim: _scaled_mm needs every contracted dim % 16, including the tokens in wgrad
    # (e.g. B * (S - 1) for the MTP block); zero padding changes no result.
    cfg = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(cfg, emulate=emulate, pad_inner_dim=not emulate)


def kernels_available(recipe: str) -> bool:
    """Real FP8 GEMMs: torchao's need sm89+ (Ada, Hopper); the blockwise ones sm90+ (Hopper)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= ((9, 0) if recipe == "blockwise" else (8, 9))


def kernel_takes(in_features: int, out_features: int, recipe: str, emulate: bool) -> bool:
    """Shapes the FP8 GEMMs take: torchao's (_scaled_mm and its grouped GEMM) need K and N % 16,
    the blockwise kernels K and N % 128. Emulation reproduces the blockwise numerics for any shape
    (ragged tiles = zero padding) and keeps torchao's rule, so CPU runs convert what a GPU would."""
    if recipe != "blockwise":
        return in_features % 16 == 0 and out_features % 16 == 0
    return emulate or (in_features % BLOCK == 0 and out_features % BLOCK == 0)


def convert(model: nn.Module, recipe: str, emulate: bool) -> list[str]:
    """Put every large GEMM of `model` in FP8, in place; return the names of what was converted.

    nn.Linear modules become `TorchaoFloat8Linear` / `BlockwiseFP8Linear` (same fp32 Parameter),
    and each routed-expert module (`moe.Experts`) gets `FP8GroupedMM` as its grouped GEMM. torchao
    has no tensorwise grouped GEMM, so under every torchao recipe the experts use its rowwise one.
    Not converted: `lm_head` (DeepSeek-V3 §3.3.1: embedding, output head, gating, norms and the
    attention core stay in high precision; the router and embedding are not nn.Linear), linears
    with a bias under blockwise, and shapes the kernel cannot take, which stay in bf16 and are
    listed in the log.
    """
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} is not one of {list(RECIPES)}")
    if recipe == "blockwise":
        make: Callable[[nn.Linear], nn.Module] = lambda m: BlockwiseFP8Linear.from_linear(
            m, emulate
        )
    else:
        cfg = torchao_config(recipe, emulate)
        make = lambda m: TorchaoFloat8Linear.from_float(m, config=cfg)
    converted, skipped = [], []
    for fqn, module in list(model.named_modules()):
        if isinstance(module, moe.Experts):
            E, O, I = module.gate_up_proj.shape
            if kernel_takes(I, O, recipe, emulate) and kernel_takes(O // 2, I, recipe, emulate):
                module.grouped_mm = FP8GroupedMM(recipe, emulate)
                converted.append(fqn)
            else:
                skipped.append(f"{fqn} [{E}x{O}x{I}]")
            continue
        if type(module) not in (nn.Linear, Linear) or fqn.rsplit(".", 1)[-1] in HIGH_PRECISION:
            continue
        shape_ok = kernel_takes(module.in_features, module.out_features, recipe, emulate)
        if not shape_ok or (recipe == "blockwise" and module.bias is not None):
            skipped.append(f"{fqn} [{module.out_features}x{module.in_features}]")
            continue
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, make(module))
        converted.append(fqn)
    if skipped and not converted:  # an "FP8" run that would be bf16 throughout
        multiple = 16 if recipe != "blockwise" or emulate else BLOCK
        raise ValueError(
            f"precision recipe {recipe}: no GEMM of this model has a shape the FP8 kernels take "
            f"(in and out features multiples of {multiple}; got {', '.join(skipped[:3])}"
            f"{', ...' if len(skipped) > 3 else ''}): "
            f"make model.hidden_size and the FFN sizes multiples of {multiple}, or use "
            "precision=bf16"
        )
    log.info(
        "fp8 %s (%s): %d GEMM modules in FP8 (%d routed-expert groups); high precision: lm_head, "
        "embedding, router, norms, attention core%s",
        recipe,
        "emulated: no FP8 kernels on this device" if emulate else "FP8 kernels",
        len(converted),
        sum(isinstance(model.get_submodule(n), moe.Experts) for n in converted),
        f"; left in bf16, shape not taken by the kernel: {', '.join(skipped)}" if skipped else "",
    )
    return converted
