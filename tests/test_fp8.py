"""FP8 numerics: the blockwise fake-quant against a direct per-tile reference, the E4M3 error
bound, the emulated GEMMs against independent formulations, and the grouped expert GEMMs."""

import pytest
import torch
from torchao.float8.float8_linear import Float8Linear

from tinyreason.model import moe
from tinyreason.training.fp8 import (
    E4M3_MAX,
    BlockwiseFP8Linear,
    FP8GroupedMM,
    GroupedFP8Matmul,
    TorchaoFloat8Linear,
    fake_quant,
    round_to_e4m3,
    torchao_config,
)

E4M3 = torch.float8_e4m3fn


def reference_quant(x: torch.Tensor, tr: int, tc: int):
    """DeepSeek's act_quant / weight_quant written tile by tile: -> (fp8 data, 1/scale per tile)."""
    R, C = x.shape
    data = torch.empty(R, C, dtype=E4M3)
    inv = torch.empty((R + tr - 1) // tr, (C + tc - 1) // tc)
    for i in range(0, R, tr):
        for j in range(0, C, tc):
            tile = x[i : i + tr, j : j + tc].float()
            amax = max(tile.abs().max().item(), 1e-12)
            scale = torch.tensor(448.0 / amax, dtype=torch.float64).float()
            data[i : i + tr, j : j + tc] = (tile * scale).clamp(-448, 448).to(E4M3)
            inv[i // tr, j // tc] = 1.0 / scale
    return data, inv


def dequant(data: torch.Tensor, inv: torch.Tensor, tr: int, tc: int) -> torch.Tensor:
    R, C = data.shape
    return data.float() * inv.repeat_interleave(tr, 0)[:R].repeat_interleave(tc, 1)[:, :C]


@pytest.mark.parametrize("tile", [(1, 128), (128, 128), (128, 1)])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])  # aligned, and ragged last tiles
def test_fake_quant_equals_per_tile_reference(tile, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 2, shape[1])  # columns over 5 decades
    data, inv = reference_quant(x, *tile)
    assert torch.equal(fake_quant(x, tile), dequant(data, inv, *tile))


@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
def test_fake_quant_keeps_the_e4m3_error_bound(tile):
    """Round to nearest with 3 mantissa bits: |error| <= 2^-4 |x| for normal E4M3 values and
    <= 2^-10 / scale (half the subnormal spacing) below 2^-6; each tile's amax maps to 448."""
    torch.manual_seed(1)
    x = torch.randn(256, 256) * torch.logspace(-6, 1, 256)
    xq = fake_quant(x, tile)
    tr, tc = tile
    amax_tiles = x.abs().reshape(256 // tr, tr, 256 // tc, tc).amax(dim=(1, 3))
    inv_scale = (amax_tiles / E4M3_MAX).repeat_interleave(tr, 0).repeat_interleave(tc, 1)
    bound = torch.maximum(x.abs() * 2**-4, inv_scale * 2**-10) * (1 + 1e-6)
    assert ((xq - x).abs() <= bound).all()
    tiles_amax = lambda t: t.abs().reshape(256 // tr, tr, 256 // tc, tc).amax(dim=(1, 3))
    torch.testing.assert_close(tiles_amax(xq), amax_tiles, rtol=1e-6, atol=0)
    # the error is real (FP8), not a pass-through
    assert (xq != x).float().mean() > 0.5


def test_blockwise_linear_matches_deepseek_gemm_and_bounds_gradients():
    """Forward = the official fp8_gemm formulation (per 128-wide K block: fp8 products summed,
    times the activation tile scale and the weight block scale, fp32 accumulation); dgrad and
    wgrad within FP8 error of the exact fp32 gradients."""
    torch.manual_seed(2)
    M, K, N = 192, 320, 256  # K ragged: 128 + 128 + 64
    x = torch.randn(M, K, requires_grad=True)
    lin = BlockwiseFP8Linear.from_linear(torch.nn.Linear(K, N, bias=False), emulate=True)
    y = lin(x)

    xd, xs = reference_quant(x.detach(), 1, 128)
    wd, ws = reference_quant(lin.weight.detach(), 128, 128)
    ref = torch.zeros(M, N)
    for kb in range(0, K, 128):
        part = xd[:, kb : kb + 128].float() @ wd[:, kb : kb + 128].float().T
        ref += part * xs[:, kb // 128, None] * ws[:, kb // 128].repeat_interleave(128)[None, :N]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

    dy = torch.randn(M, N)
    y.backward(dy)
    exact_dx, exact_dw = dy @ lin.weight.detach(), dy.T @ x.detach()
    for got, exact in [(x.grad, exact_dx), (lin.weight.grad, exact_dw)]:
        rel = (got - exact).norm() / exact.norm()
        assert 0 < rel < 0.05, rel  # two E4M3 operands: a few percent at most


def test_blockwise_linear_under_bf16_autocast_keeps_fp32_master_grads():
    torch.manual_seed(3)
    lin = BlockwiseFP8Linear.from_linear(torch.nn.Linear(64, 32, bias=False), emulate=True)
    x = torch.randn(4, 5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 5, 32)
    y.float().square().sum().backward()
    assert lin.weight.dtype == lin.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_torchao_linear_runs_every_recipe_under_cpu_autocast(recipe):
    """torchao's own Float8Linear fails rowwise_with_gw_hp in backward under CPU autocast; ours
    casts the input like nn.Linear and computes in fp32: it matches the fp32-input module."""
    torch.manual_seed(4)
    base = torch.nn.Linear(64, 48, bias=False)
    ours = TorchaoFloat8Linear.from_float(base, config=torchao_config(recipe, emulate=True))
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    grad = ours.weight.grad.clone()
    ours.weight.grad = None
    y_ref = ours(x.bfloat16())  # no autocast: the same bf16 input, the same GEMMs
    y_ref.float().sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(grad, ours.weight.grad)


def grouped_case(I, O, counts, seed=5):
    torch.manual_seed(seed)
    E = len(counts)
    x = torch.randn(sum(counts), I, requires_grad=True)
    w = (torch.randn(E, O, I) / I**0.5).requires_grad_()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, offsets


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_grouped_expert_gemm_equals_per_expert_fp8_linears(recipe):
    """Grouped FP8 GEMM == one FP8 linear per expert on its own tokens (blockwise: our
    BlockwiseFP8Linear; rowwise: torchao's Float8Linear), forward and both gradients."""
    counts = [0, 5, 200, 37]  # an empty expert, a ragged one, one over 128 tokens
    x, w, offsets = grouped_case(192, 160, counts)
    y = FP8GroupedMM(recipe, emulate=True)(x, w.transpose(-2, -1), offsets)
    dy = torch.randn_like(y)
    y.backward(dy)

    x2 = x.detach().clone().requires_grad_()
    outs, w_grads, start = [], [], 0
    for e, n in enumerate(counts):
        lin = torch.nn.Linear(192, 160, bias=False)
        lin.weight = torch.nn.Parameter(w[e].detach().clone())
        if recipe == "blockwise":
            fp8 = BlockwiseFP8Linear.from_linear(lin, emulate=True)
        else:
            fp8 = Float8Linear.from_float(lin, torchao_config("rowwise", emulate=True))
        rows = slice(start, start + n)
        start += n
        if n == 0:  # torchao cannot take an empty input
            outs.append(x2.new_zeros(0, 160))
            w_grads.append(torch.zeros(160, 192))
            continue
        outs.append(fp8(x2[rows]))
        outs[-1].backward(dy[rows])
        w_grads.append(fp8.weight.grad)
    torch.testing.assert_close(y, torch.cat(outs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, torch.stack(w_grads), rtol=1e-5, atol=1e-5)


def test_grouped_fp8_is_close_to_the_plain_grouped_gemm():
    x, w, offsets = grouped_case(64, 96, [10, 0, 30, 24])
    exact = moe.grouped_mm(x, w.transpose(-2, -1), offsets)
    for block in (128, None):
        y = GroupedFP8Matmul.apply(x, w.transpose(-2, -1), offsets, block, torch.float32)
        rel = (y - exact).norm() / exact.norm()
        assert 0 < rel < 0.05


def test_round_to_e4m3_equals_the_float8_cast_everywhere():
    """Every E4M3 value, every midpoint between neighbours (ties to even) and the fp32 values
    just either side of each midpoint, subnormals and signed zeros included."""
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    values = values[values.isfinite() & (values.abs() <= E4M3_MAX)].unique()
    mids = (values[1:] + values[:-1]) / 2
    y = torch.cat(
        [
            values,
            mids,
            torch.nextafter(mids, torch.tensor(-1e9)),
            torch.nextafter(mids, torch.tensor(1e9)),
            torch.tensor([-0.0, 1e-30, -1e-40, E4M3_MAX, -E4M3_MAX]),
            torch.randn(100_000) * torch.logspace(-12, 2.6, 100_000),
        ]
    ).clamp(-E4M3_MAX, E4M3_MAX)
    expected = y.to(E4M3).float()
    got = round_to_e4m3(y)
    assert torch.equal(got, expected)
    assert torch.equal(got.signbit(), expected.signbit())


def test_pad_groups_aligns_every_expert_group_with_zero_rows():
    """The GPU rowwise grouped GEMM path pads each expert's rows to a multiple of 16."""
    from tinyreason.training.fp8 import _pad_groups

    x, _, offsets = grouped_case(8, 8, [3, 0, 16, 17])
    x_pad, offsets_pad, dest = _pad_groups(x.detach(), offsets, 16)
    assert offsets_pad.tolist() == [16, 16, 32, 64] and offsets_pad.dtype == torch.int32
    assert torch.equal(x_pad[dest], x.detach())
    kept = torch.zeros(len(x_pad), dtype=torch.bool)
    kept[dest] = True
    assert not x_pad[~kept].any()
