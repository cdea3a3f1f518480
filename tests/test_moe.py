"""DeepSeekMoE: router invariants, group-limited routing, grouped experts == per-expert loop ==
dense reference, sequence-wise balance loss, balance modes, aux-loss-free bias update (also through
Lightning with gradient accumulation), load statistics and the load heatmap.

Router tests use hidden size = num experts and an identity router weight, so the input row *is*
the router logits and each case can be written down directly.
"""

from __future__ import annotations

import csv
import dataclasses

import lightning as L
import pytest
import torch

from tinyreason.model import CausalLM, MoEConfig, debug_config, init_weights
from tinyreason.model.moe import (
    Experts,
    MoE,
    Router,
    grouped_mm_supported,
    load_stats,
    sequence_balance_loss,
)
from tinyreason.training.callbacks import MoEBiasUpdate, heatmap_image, moe_layers

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


def test_balance_modes_switch_loss_and_bias_update() -> None:
    x = torch.randn(2, 8, 64)
    assert _moe(balance="both", balance_alpha=0.01)(x)[1].item() > 0
    assert _moe(balance="aux_loss", balance_alpha=0.01)(x)[1].item() > 0
    assert _moe(balance="aux_free", balance_alpha=0.01)(x)[1].item() == 0.0
    assert _moe(balance="none", balance_alpha=0.01)(x)[1].item() == 0.0
    cfg = debug_config(kind="moe").moe
    gamma = {
        mode: dataclasses.replace(cfg, balance=mode, bias_update_until=0.9).bias_gamma(0.5)
        for mode in ("both", "aux_free", "aux_loss", "none")
    }
    assert gamma == {"both": 1e-3, "aux_free": 1e-3, "aux_loss": 0.0, "none": 0.0}
    late = dataclasses.replace(cfg, bias_update_until=0.9)
    assert late.bias_gamma(0.89) == 1e-3 and late.bias_gamma(0.9) == 0.0  # schedule to 0
    with pytest.raises(ValueError, match="balance must be one of"):
        dataclasses.replace(cfg, balance="aux")
    with pytest.raises(ValueError, match="bias_update_until"):
        dataclasses.replace(cfg, bias_update_until=1.5)


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


# ---------------------------------------------------------------------------------------------
# routed experts: grouped GEMMs == per-expert loop == dense reference


def _experts_case(T: int, D: int, F_: int, ids_TK: torch.Tensor):
    torch.manual_seed(0)
    experts = Experts(E, D, F_)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    x_TD = torch.randn(T, D, requires_grad=True)
    w_TK = torch.rand(ids_TK.shape, requires_grad=True)
    return experts, x_TD, w_TK


@pytest.mark.parametrize(
    ("T", "D", "F_", "routing", "grouped"),
    [
        (24, 64, 32, "random", True),
        (7, 20, 12, "random", True),  # rows of 80 and 48 bytes: still 16-byte multiples
        (9, 13, 6, "random", False),  # 52-byte rows: the loop fallback
        (16, 64, 32, "few", True),  # 12 of 16 experts get no token
        (1, 64, 32, "few", True),  # a single token
    ],
)
def test_grouped_experts_equal_reference_loop(
    T: int, D: int, F_: int, routing: str, grouped: bool
) -> None:
    g = torch.Generator().manual_seed(T)
    if routing == "random":
        ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    else:
        ids_TK = torch.tensor([0, 5, 6, 15]).repeat(T, 1)
    experts, x_TD, w_TK = _experts_case(T, D, F_, ids_TK)
    assert grouped_mm_supported(x_TD, experts.gate_up_proj.transpose(-2, -1)) == grouped
    params = (x_TD, w_TK, experts.gate_up_proj, experts.down_proj)
    grad_TD = torch.randn(T, D)
    outs, grads = [], []
    for fn in (experts, experts.reference):
        out = fn(x_TD, ids_TK, w_TK)
        outs.append(out)
        grads.append(torch.autograd.grad(out, params, grad_TD))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    unused = torch.ones(E, dtype=torch.bool)
    unused[ids_TK.unique()] = False
    assert (grads[0][2][unused] == 0).all() and (grads[0][3][unused] == 0).all()


def test_grouped_experts_backward_from_expanded_grad_and_under_bf16() -> None:
    ids_TK = torch.stack([torch.randperm(E)[:K] for _ in range(32)])
    experts, x_TD, w_TK = _experts_case(32, 64, 32, ids_TK)
    experts(x_TD, ids_TK, w_TK).sum().backward()  # expanded grad_output (spec §4.4)
    grad = experts.gate_up_proj.grad.clone()
    experts.gate_up_proj.grad = None
    experts.reference(x_TD, ids_TK, w_TK).sum().backward()
    torch.testing.assert_close(grad, experts.gate_up_proj.grad, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the experts' GEMMs run in bf16
        fast = experts(x_TD, ids_TK, w_TK)
        ref = experts.reference(x_TD, ids_TK, w_TK)
    assert fast.dtype == torch.float32  # combined in the activation dtype
    torch.testing.assert_close(fast, ref, rtol=0.02, atol=0.02)


def test_moe_matches_dense_masked_reference_and_routes_every_token_to_k_experts() -> None:
    moe = _moe().train()
    x_BSD = torch.randn(2, 12, 64)
    out, _ = moe(x_BSD)
    x_TD = x_BSD.reshape(-1, 64)
    ids_TK, w_TK, _ = moe.gate(x_TD)
    assert all(len(set(row.tolist())) == K for row in ids_TK)  # exactly K distinct per token
    assert moe.tokens_per_expert.sum() == 24 * K  # the training forward counted K per token
    gates_TE = torch.zeros(x_TD.shape[0], E).scatter(1, ids_TK, w_TK)
    ex = moe.experts
    gate_TEF, up_TEF = torch.einsum("td,efd->tef", x_TD, ex.gate_up_proj).chunk(2, dim=-1)
    y_TED = torch.einsum("tef,edf->ted", torch.nn.functional.silu(gate_TEF) * up_TEF, ex.down_proj)
    ref_TD = (gates_TE[..., None] * y_TED).sum(1) + moe.shared_experts(x_TD)
    torch.testing.assert_close(out.reshape(-1, 64), ref_TD, rtol=1e-5, atol=1e-6)
    assert len(ids_TK.unique()) > 1  # the case exercises several experts


# ---------------------------------------------------------------------------------------------
# aux-loss-free bias update


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


def test_bias_stays_fp32_when_the_model_is_cast_to_bf16() -> None:
    model = CausalLM(debug_config(kind="moe")).to(torch.bfloat16)
    moe = model.moe_layers()[0]
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        moe.gate.e_score_correction_bias.fill_(1.0)  # bf16 spacing at 1.0 is 2^-7 > gamma
    moe.tokens_per_expert[0] = 10  # expert 0 overloaded, the rest idle
    moe.update_bias(1e-3)
    bias = moe.gate.e_score_correction_bias
    assert bias[0].item() == pytest.approx(1.0 - 1e-3) and bias[1].item() == pytest.approx(1.001)
    saved = model.state_dict()["layers.1.mlp.gate.e_score_correction_bias"]  # still a buffer
    assert saved.dtype == torch.float32 and torch.equal(saved, bias)


def test_bias_update_drives_skewed_router_to_uniform_load() -> None:
    moe = _moe(num_groups=1, topk_groups=1).train()
    x = torch.randn(4, 16, 64)
    max_vio = []
    with torch.no_grad():
        moe.gate.e_score_correction_bias[:4] = 1.0  # beats any sigmoid gap: experts 0-3 take all
        for _ in range(60):
            moe(x)
            moe.update_bias(0.05)
            max_vio.append(load_stats(moe.last_load)["max_vio"])
    assert max_vio[0] == pytest.approx(3.0)  # all 4 slots of every token on 4 of 16 experts
    assert max(max_vio[-10:]) < 0.5 * max_vio[0]
    # the sign update then oscillates around uniform with a step of gamma: bounded, not zero
    assert sum(max_vio[-10:]) < sum(max_vio[:10]) / 2


def test_load_stats() -> None:
    stats = load_stats(torch.tensor([4, 4, 4, 4]))
    assert stats == {"max_vio": 0.0, "cv": 0.0, "dead": 0.0}
    stats = load_stats(torch.tensor([8, 4, 4, 0]))
    assert stats["max_vio"] == pytest.approx(1.0)  # max 8 / mean 4 - 1
    assert stats["cv"] == pytest.approx((8**0.5) / 4)  # std sqrt(8) / mean 4
    assert stats["dead"] == 1


class _TinyLM(L.LightningModule):
    """The debug MoE model with lr 0: routing then changes only through the bias update."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = CausalLM(debug_config(kind="moe"))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(batch[:, :-1], batch[:, 1:]).loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.model(batch[:, :-1], batch[:, 1:])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _CountsSpy(L.Callback):
    """Before the bias update (earlier in the callback list): counts and biases at each batch end."""

    def __init__(self) -> None:
        self.counts, self.biases = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = pl_module.model.moe_layers()
        self.counts.append(torch.stack([m.tokens_per_expert.clone() for m in layers]))
        self.biases.append(torch.stack([m.gate.e_score_correction_bias.clone() for m in layers]))


def _quiet_trainer(tmp_path, callbacks: list, **kwargs) -> L.Trainer:
    """Two optimizer steps, no logger, checkpoint, progress bar or validation."""
    return L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def test_gradient_accumulation_updates_bias_once_per_step_with_summed_counts(tmp_path) -> None:
    data = torch.utils.data.DataLoader(torch.randint(0, 512, (16, 17)), batch_size=2)
    module, spy = _TinyLM(), _CountsSpy()
    trainer = _quiet_trainer(
        tmp_path, [spy, MoEBiasUpdate(heatmap_every=1)], accumulate_grad_batches=4
    )
    trainer.fit(module, data)
    layers = module.model.moe_layers()
    # Per micro-batch and MoE layer: sequences x positions x experts per token (MTP: 15 positions).
    per_micro_batch = torch.tensor([2 * 16 * K, 2 * 16 * K, 2 * 15 * K])
    # Counts grow over the 4 micro-batches of a step, then restart: one update per step.
    for i, counts_LE in enumerate(spy.counts):
        assert torch.equal(counts_LE.sum(-1), (i % 4 + 1) * per_micro_batch)
    # The spy sees the bias before the update of its own batch: step 1's update (after batch 3)
    # shows at batch 4 and nowhere else; step 2's (after batch 7) is the final bias.
    changed = [not torch.equal(spy.biases[i - 1], spy.biases[i]) for i in range(1, 8)]
    assert changed == [False, False, False, True, False, False, False]
    assert (spy.biases[0] == 0).all()
    final = torch.stack([m.gate.e_score_correction_bias for m in layers])
    gamma = module.model.config.moe.bias_update_speed
    for before, after, counts_LE in (
        (spy.biases[0], spy.biases[4], spy.counts[3]),  # counts summed over micro-batches 0-3
        (spy.biases[4], final, spy.counts[7]),  # and 4-7
    ):
        load_LE = counts_LE.float()
        expected = before + gamma * torch.sign(load_LE.mean(-1, keepdim=True) - load_LE)
        torch.testing.assert_close(after, expected)
    assert all(m.tokens_per_expert.sum() == 0 for m in layers)
    # Evaluation forwards leave counts and bias alone.
    bias = [m.gate.e_score_correction_bias.clone() for m in layers]
    trainer.validate(module, data, verbose=False)
    assert all(m.tokens_per_expert.sum() == 0 for m in layers)
    assert all(
        torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(bias, layers, strict=True)
    )
    # The load heatmap: one CSV row per MoE layer and step.
    rows = list(csv.DictReader((tmp_path / "moe_load.csv").open()))
    assert [(r["step"], r["layer"]) for r in rows] == [
        (str(s), name) for s in (1, 2) for name in ("layer1", "layer2", "mtp0")
    ]
    assert sum(float(rows[0][f"expert_{e}"]) for e in range(E)) == pytest.approx(E, rel=1e-3)


class _RankSpy(_CountsSpy):
    """`_CountsSpy` that saves what this rank saw, and its final biases, to <dir>/rank<r>.pt."""

    def __init__(self, out_dir) -> None:
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        layers = pl_module.model.moe_layers()
        final = torch.stack([m.gate.e_score_correction_bias.clone() for m in layers])
        torch.save(
            {"counts": self.counts, "biases": self.biases, "final": final},
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


def test_bias_update_sums_the_counts_of_all_ranks(tmp_path) -> None:
    """Two real data-parallel processes (CPU, gloo): each routes its own batches, and both apply
    the same bias update computed from the counts of both ranks."""
    tokens = torch.randint(0, 512, (16, 17), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(tokens, batch_size=2)
    callbacks = [_RankSpy(tmp_path), MoEBiasUpdate(heatmap_every=1)]
    trainer = _quiet_trainer(
        tmp_path, callbacks, accelerator="cpu", devices=2, strategy="ddp_spawn"
    )
    trainer.fit(_TinyLM(), data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["counts"][0], ranks[1]["counts"][0]), "same data on both ranks"
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)
    gamma = _TinyLM().model.config.moe.bias_update_speed
    bias = ranks[0]["biases"][0]
    assert (bias == 0).all()
    for step in range(2):
        load_LE = (ranks[0]["counts"][step] + ranks[1]["counts"][step]).float()
        bias = bias + gamma * torch.sign(load_LE.mean(-1, keepdim=True) - load_LE)
        if step == 0:  # what both ranks hold at their second batch
            for rank in ranks:
                torch.testing.assert_close(rank["biases"][1], bias)
    torch.testing.assert_close(ranks[0]["final"], bias)
    # The update from one rank's counts alone would differ: the sum is what moved the bias.
    local = ranks[0]["counts"][0].float()
    alone = gamma * torch.sign(local.mean(-1, keepdim=True) - local)
    assert not torch.equal(ranks[0]["biases"][1], alone)


def test_moe_layer_names_and_heatmap_image() -> None:
    names = list(moe_layers(CausalLM(debug_config(kind="moe"))))
    assert names == ["layer1", "layer2", "mtp0"]
    image = heatmap_image(torch.rand(3, E) * 2, names, "load")
    assert image.size[0] > 200 and image.size[1] > 100


def test_router_stays_fp32_under_bf16_autocast() -> None:
    router = _router(num_groups=4, topk_groups=2)
    x = torch.randn(16, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids_TK, w_TK, scores_TE = router(x)
    ref_ids, ref_w, ref_scores = router(x)
    assert scores_TE.dtype == w_TK.dtype == torch.float32
    assert torch.equal(scores_TE, ref_scores) and torch.equal(ids_TK, ref_ids)
    torch.testing.assert_close(w_TK, ref_w)


def test_bench_moe_smoke(cache_dir) -> None:
    """`python -m tinyreason.bench moe` on the debug size: every row measured."""
    from tinyreason.bench.moe import bench_moe, report

    rows = bench_moe(["debug=fast", "data.batch_size=1"], 1, 1, hf_experts="grouped_mm")
    assert [(r["dtype"], r["what"], r["model"].split(" ")[0]) for r in rows] == [
        (dtype, what, who)
        for dtype in ("fp32", "bf16")
        for what, who in (
            ("training step", "ours"),
            ("training step", "transformers"),
            ("MoE layer fwd+bwd", "ours:"),
            ("MoE layer fwd+bwd", "transformers:"),
        )
    ]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    text = report(rows)
    assert "ours bf16 / ours fp32" in text
    theirs = {
        r["dtype"]: r["busy"] for r in rows if r["model"].startswith("transformers") and r["busy"]
    }
    assert all(r["busy"] < r["mfu"] for r in rows if r["busy"])  # half the attention FLOPs
    # the ceiling line: 1 / transformers' share of the peak, per dtype
    assert f"fp32 {1 / theirs['fp32']:.2f}x, bf16 {1 / theirs['bf16']:.2f}x" in text
