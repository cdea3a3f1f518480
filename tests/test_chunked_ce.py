"""The chunked output head + cross-entropy (tinyreason/model/loss.py) == full logits + F.cross_entropy:
value and gradients, alone and inside a CausalLM (MoE + MTP, tied head); and the `bench ce` CLI."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from tinyreason.bench.ce import main as bench_ce
from tinyreason.model import CausalLM, debug_config
from tinyreason.model.layers import linear
from tinyreason.model.loss import IGNORE_INDEX, ChunkedCrossEntropy, chunked_cross_entropy

N, D, V = 150, 32, 300  # >= 64 rows: the fp32 GEMMs go to oneDNN, as in training


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms); 0 when both are 0."""
    a, b = a.detach(), b.detach()
    return 0.0 if a.equal(b) else float((a - b).norm() / b.norm())


def _inputs(ignore_every: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h_ND = torch.randn(N, D, generator=gen).requires_grad_()
    weight_VD = (0.3 * torch.randn(V, D, generator=gen)).requires_grad_()
    targets_N = torch.randint(0, V, (N,), generator=gen)
    targets_N[::ignore_every] = IGNORE_INDEX
    return h_ND, weight_VD, targets_N


def _full(h_ND, weight_VD, targets_N):
    """The unchunked head: logits [N, V], then F.cross_entropy summed (the reference)."""
    logits_NV = linear(h_ND, weight_VD).float()
    return F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE_INDEX, reduction="sum")


# chunks that divide N, do not divide it (last chunk < 64 rows: torch's GEMM there), exceed it
@pytest.mark.parametrize("chunk_size", [50, 64, 7, 1000, None])
def test_chunked_equals_full_value_and_grads(chunk_size: int | None) -> None:
    h_ND, weight_VD, targets_N = _inputs()
    expected = _full(h_ND, weight_VD, targets_N)
    grad_h, grad_w = torch.autograd.grad(expected, (h_ND, weight_VD))
    total, count = chunked_cross_entropy(h_ND, weight_VD, targets_N, chunk_size)
    got_h, got_w = torch.autograd.grad(total, (h_ND, weight_VD))
    assert count.item() == (targets_N != IGNORE_INDEX).sum().item() < N
    assert _rel(total, expected) <= 1e-6
    assert _rel(got_h, grad_h) <= 1e-6 and _rel(got_w, grad_w) <= 1e-6
    # ignored rows get no gradient
    assert got_h[targets_N == IGNORE_INDEX].abs().max() == 0


def test_all_rows_ignored_gives_zero_loss_and_grads() -> None:
    h_ND, weight_VD, targets_N = _inputs()
    total, count = chunked_cross_entropy(h_ND, weight_VD, torch.full_like(targets_N, -100), 64)
    total.backward()
    assert total.item() == 0.0 and count.item() == 0
    assert h_ND.grad.abs().max() == 0 and weight_VD.grad.abs().max() == 0


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, 4, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(7, 4, dtype=torch.float64, generator=gen).requires_grad_()
    targets = torch.tensor([3, -100, 0, 6, 2, -100])
    assert torch.autograd.gradcheck(
        lambda h, w: ChunkedCrossEntropy.apply(h, w, targets, 4, None), (h, w)
    )


def test_bf16_autocast_close_to_unchunked() -> None:
    """Same bf16 logits (GEMMs in autocast's dtype, softmax in fp32); the weight gradient sums
    per-chunk bf16 GEMMs in fp32 where the unchunked head rounds one bf16 GEMM: <= 1e-2 rel."""
    h_ND, weight_VD, targets_N = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _full(h_ND, weight_VD, targets_N)
        total, _ = chunked_cross_entropy(h_ND, weight_VD, targets_N, 64)
    grad_h, grad_w = torch.autograd.grad(expected, (h_ND, weight_VD))
    got_h, got_w = torch.autograd.grad(total, (h_ND, weight_VD))
    assert got_h.dtype == got_w.dtype == torch.float32
    assert _rel(total, expected) <= 1e-5
    assert _rel(got_h, grad_h) <= 1e-3 and _rel(got_w, grad_w) <= 1e-2


def _model_pair(kind: str, tied: bool) -> tuple[CausalLM, CausalLM]:
    cfg = dataclasses.replace(debug_config(512, kind), tie_word_embeddings=tied)
    torch.manual_seed(0)
    full = CausalLM(cfg)
    chunked = CausalLM(cfg)
    chunked.load_state_dict(full.state_dict())
    chunked.loss_chunk_size = 7  # divides neither 2 x 12 main rows nor 2 x 11 MTP rows
    return full, chunked


@pytest.mark.parametrize(("kind", "tied"), [("moe", False), ("dense", True)])
def test_causal_lm_chunked_loss_and_grads_equal_full(kind: str, tied: bool) -> None:
    full, chunked = _model_pair(kind, tied)
    ids = torch.randint(0, 512, (2, 13))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, 3:6] = IGNORE_INDEX
    a, b = full(inputs, targets), chunked(inputs, targets)
    assert b.logits is None and b.mtp_logits == () and a.logits is not None
    for name in ("loss", "ce", "mtp", "balance"):
        assert _rel(getattr(b, name), getattr(a, name)) <= 1e-6, name
    a.loss.backward()
    b.loss.backward()
    grads = dict(chunked.named_parameters())
    for name, p in full.named_parameters():
        assert _rel(grads[name].grad, p.grad) <= 1e-6, name
    with torch.no_grad():  # validation and generation: logits as before
        val = chunked(inputs, targets)
    assert val.logits is not None and len(val.mtp_logits) == 1
    torch.testing.assert_close(val.loss, a.loss, rtol=1e-6, atol=0)


def test_causal_lm_bf16_autocast_close_to_full() -> None:
    """As the Function alone: the loss <= 1e-5 rel, every gradient <= 1e-2 rel."""
    full, chunked = _model_pair("moe", tied=False)
    ids = torch.randint(0, 512, (2, 13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = full(ids[:, :-1], ids[:, 1:]), chunked(ids[:, :-1], ids[:, 1:])
    a.loss.backward()
    b.loss.backward()
    assert _rel(b.loss, a.loss) <= 1e-5
    grads = dict(chunked.named_parameters())
    for name, p in full.named_parameters():  # the head's weight differs most (see above)
        assert _rel(grads[name].grad, p.grad) <= 1e-2, name


def test_bench_ce_cli_chunked_uses_less_memory_same_loss(capsys) -> None:
    args = ["--vocab", "8192", "--tokens", "256", "--hidden", "128", "--chunk", "64"]
    bench_ce([*args, "--repeats", "1"])  # `python -m tinyreason.bench ce ...` (light import)
    text = capsys.readouterr().out
    ratio = float(re.search(r"\| chunked .*?\| [\d,.]+ \| ([\d.]+)x \|", text).group(1))
    assert ratio < 1, text
    losses = [float(x) for x in re.findall(r"\| (\d+\.\d+) \|$", text, re.M)]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) <= 1e-6 * losses[0], text
