"""DeepSeekMoE: router invariants, group-limited routing, expert loop vs dense reference,
sequence-wise balance loss, aux-loss-free bias update.

Router tests use hidden size = num experts and an identity router weight, so the input row *is*
the router logits and each case can be written down directly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tinyreason.model import MoEConfig, debug_config, init_weights
from tinyreason.model.moe import MoE, Router, sequence_balance_loss

E, K = 16, 4


def _router(num_groups: int = 1, topk_groups: int = 1, scale: float = 2.5) -> Router:
    moe = MoEConfig(
        num_experts=E,
        num_shared_experts=0,
        num_experts_per_tok=K,
        moe_intermediate_size=8,
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling_factor=scale,
    )
    router = Router(E, moe)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def _moe(**moe_changes: object) -> MoE:
    cfg = debug_config(kind="moe")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_changes))
    torch.manual_seed(0)
    moe = MoE(cfg)
    init_weights(moe, cfg)
    with torch.no_grad():  # sharper router than init so routing is not a coin toss
        moe.gate.weight.mul_(30)
    return moe


@pytest.mark.parametrize(("num_groups", "topk_groups"), [(1, 1), (4, 2)])
def test_router_weights_and_distinct_topk(num_groups: int, topk_groups: int) -> None:
    router = _router(num_groups, topk_groups)
    logits_TE = torch.randn(64, E) * 3
    ids_TK, w_TK, scores_TE = router(logits_TE)
    assert ids_TK.shape == w_TK.shape == (64, K)
    assert all(len(set(row.tolist())) == K for row in ids_TK)  # K distinct experts per token
    torch.testing.assert_close(w_TK.sum(-1), torch.full((64,), 2.5))
    torch.testing.assert_close(scores_TE, logits_TE.sigmoid())
    if num_groups == 1:  # without bias or groups: the top-K sigmoid scores
        expected = logits_TE.topk(K, dim=-1).indices.sort(-1).values
        assert torch.equal(ids_TK.sort(-1).values, expected)


def test_bias_changes_choice_not_weights() -> None:
    router = _router()
    logits_TE = torch.randn(32, E)
    favoured = torch.tensor([3, 7, 11, 12])
    ids_before, _, _ = router(logits_TE)
    with torch.no_grad():
        router.e_score_correction_bias[favoured] = 5.0  # beats any sigmoid gap (< 1)
    ids_TK, w_TK, scores_TE = router(logits_TE)
    assert not torch.equal(ids_before.sort(-1).values, ids_TK.sort(-1).values)
    assert torch.equal(ids_TK.sort(-1).values, favoured.expand(32, K))
    # Weights: the chosen experts' *unbiased* scores, normalised, times the scaling factor.
    chosen = scores_TE.gather(1, ids_TK)
    torch.testing.assert_close(w_TK, chosen / chosen.sum(-1, keepdim=True) * 2.5)


def test_group_limited_routing_ranks_groups_by_top2_sum() -> None:
    router = _router(num_groups=4, topk_groups=2)
    logits = torch.full((E,), -6.0)
    logits[0] = 6.0  # group 0: best single expert, but top-2 sum ~1.0
    logits[[4, 5, 8, 9]] = 2.0  # groups 1 and 2: top-2 sums ~1.76
    ids_TK, _, _ = router(logits[None])
    assert sorted(ids_TK[0].tolist()) == [4, 5, 8, 9]
    ungrouped, _, _ = _router()(logits[None])
    assert 0 in ungrouped[0].tolist()
    # Random inputs: chosen experts always come from at most topk_groups groups.
    ids_TK, _, _ = router(torch.randn(256, E) * 3)
    assert max(len(set((row // 4).tolist())) for row in ids_TK) <= 2


def test_expert_loop_matches_dense_masked_reference() -> None:
    moe = _moe()
    x_BSD = torch.randn(2, 12, 64)
    out, _ = moe(x_BSD)
    x_TD = x_BSD.reshape(-1, 64)
    ids_TK, w_TK, _ = moe.gate(x_TD)
    gates_TE = torch.zeros(x_TD.shape[0], E).scatter(1, ids_TK, w_TK)
    ex = moe.experts
    gate_TEF, up_TEF = torch.einsum("td,efd->tef", x_TD, ex.gate_up_proj).chunk(2, dim=-1)
    y_TED = torch.einsum("tef,edf->ted", torch.nn.functional.silu(gate_TEF) * up_TEF, ex.down_proj)
    ref_TD = (gates_TE[..., None] * y_TED).sum(1)
    ref_TD = ref_TD + moe.shared_experts(x_TD)
    torch.testing.assert_close(out.reshape(-1, 64), ref_TD, rtol=1e-5, atol=1e-6)
    assert len(ids_TK.unique()) > 1  # the case exercises several experts


def test_no_shared_experts() -> None:
    moe = _moe(num_shared_experts=0)
    assert moe.shared_experts is None
    out, _ = moe(torch.randn(1, 5, 64))
    assert out.shape == (1, 5, 64)


def _scores_routing(blocks_per_token: list[int]) -> torch.Tensor:
    """One sequence; token t scores 0.6 on the 4 experts of block b_t, 0.4 elsewhere."""
    scores = torch.full((1, len(blocks_per_token), E), 0.4)
    for t, b in enumerate(blocks_per_token):
        scores[0, t, 4 * b : 4 * b + 4] = 0.6
    return scores


def test_balance_loss_is_alpha_when_uniform_and_grows_with_imbalance() -> None:
    alpha = 1e-4
    uniform = sequence_balance_loss(_scores_routing([0, 1, 2, 3]), K, alpha)
    partial = sequence_balance_loss(_scores_routing([0, 0, 2, 3]), K, alpha)
    collapsed = sequence_balance_loss(_scores_routing([0, 0, 0, 0]), K, alpha)
    torch.testing.assert_close(uniform, torch.tensor(alpha))
    # Collapsed: f = 4 on 4 experts, P = 0.6/7.2 each -> 4/3 alpha.
    torch.testing.assert_close(collapsed, torch.tensor(alpha * 4 / 3))
    assert uniform < partial < collapsed
    # Per-sequence, then averaged: two uniform sequences stay at alpha.
    both = torch.cat([_scores_routing([0, 1, 2, 3]), _scores_routing([3, 2, 1, 0])])
    torch.testing.assert_close(sequence_balance_loss(both, K, alpha), torch.tensor(alpha))
    assert sequence_balance_loss(both, K, 0.0).item() == 0.0


def test_balance_loss_is_computed_from_unbiased_scores_and_trains_router() -> None:
    moe = _moe(balance_alpha=0.01)
    x = torch.randn(2, 8, 64)
    _, loss = moe(x)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-3, 3, E))  # changes the choice only
    _, loss_biased = moe(x)
    torch.testing.assert_close(loss, loss_biased)
    loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert _moe(balance_alpha=0.0)(x)[1].item() == 0.0


def test_counts_only_in_training_and_update_bias_moves_toward_underloaded() -> None:
    moe = _moe(num_groups=1, topk_groups=1)
    favoured = [0, 1, 2, 3]
    with torch.no_grad():
        moe.gate.e_score_correction_bias[favoured] = 5.0
    x = torch.randn(2, 8, 64)

    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == 0  # eval forwards have no side effects

    moe.train()
    moe(x)
    moe(x)
    expected = torch.zeros(E, dtype=torch.long)
    expected[favoured] = 2 * 16  # every token of both forwards picked all four
    assert torch.equal(moe.tokens_per_expert, expected)

    bias_before = moe.gate.e_score_correction_bias.clone()
    moe.update_bias(0.01)
    delta = moe.gate.e_score_correction_bias - bias_before
    overloaded = torch.zeros(E, dtype=torch.bool)
    overloaded[favoured] = True
    torch.testing.assert_close(delta[overloaded], torch.full((4,), -0.01))
    torch.testing.assert_close(delta[~overloaded], torch.full((12,), 0.01))
    assert moe.tokens_per_expert.sum() == 0 and torch.equal(moe.last_load, expected)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32


def test_update_bias_balances_load_over_steps() -> None:
    moe = _moe(num_groups=1, topk_groups=1).train()
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[:4] = 0.3  # start imbalanced
        moe(x)
        start = moe.tokens_per_expert.clone()
        moe.update_bias(0.02)
        for _ in range(100):
            moe(x)
            moe.update_bias(0.02)
    assert moe.last_load.float().std() < 0.5 * start.float().std()


def test_router_stays_fp32_under_bf16_autocast() -> None:
    router = _router(num_groups=4, topk_groups=2)
    x = torch.randn(16, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids_TK, w_TK, scores_TE = router(x)
    ref_ids, ref_w, ref_scores = router(x)
    assert scores_TE.dtype == w_TK.dtype == torch.float32
    assert torch.equal(scores_TE, ref_scores) and torch.equal(ids_TK, ref_ids)
    torch.testing.assert_close(w_TK, ref_w)


def _experts_case(T: int, D: int, F_: int, ids_TK: torch.Tensor, seed: int = 0):
    from tinyreason.model.moe import Experts

    torch.manual_seed(seed)
    experts = Experts(E, D, F_)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    x_TD = torch.randn(T, D, requires_grad=True)
    w_TK = torch.rand(ids_TK.shape, requires_grad=True)
    return experts, x_TD, w_TK


@pytest.mark.parametrize(
    ("T", "D", "F_", "routing"),
    [
        (24, 64, 32, "random"),  # grouped_mm path
        (7, 20, 12, "random"),  # 20 fp32 = 80 bytes rows, 12*4 = 48: still aligned
        (9, 13, 6, "random"),  # strides not multiples of 16 bytes: fallback loop
        (16, 64, 32, "few"),  # 12 of 16 experts get no token
        (1, 64, 32, "few"),  # a single token
    ],
)
def test_grouped_experts_equal_reference_loop(T: int, D: int, F_: int, routing: str) -> None:
    g = torch.Generator().manual_seed(T)
    if routing == "random":
        ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    else:
        ids_TK = torch.tensor([0, 5, 6, 15]).repeat(T, 1)
    experts, x_TD, w_TK = _experts_case(T, D, F_, ids_TK)
    grad_TD = torch.randn(T, D)
    outs, grads = [], []
    for fn in (experts, experts.reference):
        out = fn(x_TD, ids_TK, w_TK)
        params = (x_TD, w_TK, experts.gate_up_proj, experts.down_proj)
        outs.append(out)
        grads.append(torch.autograd.grad(out, params, grad_TD))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    unused = torch.ones(E, dtype=torch.bool)
    unused[ids_TK.unique()] = False
    assert (grads[0][2][unused] == 0).all() and (grads[0][3][unused] == 0).all()
