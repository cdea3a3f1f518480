"""Model package: configs, attention, RoPE, MTP alignment, causality, convergence.

MoE routing, balancing and the expert loop are tested in test_moe.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tinyreason.model import (
    CausalLM,
    GQAConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    debug_config,
    init_weights,
)
from tinyreason.model import attention as attention_mod
from tinyreason.model.attention import apply_rope, causal_attention, rope_cos_sin
from tinyreason.model.flops import flops_per_token
from tinyreason.model.layers import RMSNorm, linear, uses_onednn
from tinyreason.model.moe import MoE

V = 512


def _variant(name: str) -> ModelConfig:
    """Debug configs plus the attention variants they do not cover."""
    if name in ("moe", "dense", "dense_mla"):
        return debug_config(V, name)
    if name == "mla_no_q_lora":
        cfg = debug_config(V, "moe")
        return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, q_lora_rank=0))
    if name == "gqa_no_qk_norm":
        cfg = debug_config(V, "dense")
        return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, qk_norm=False))
    raise AssertionError(name)


VARIANTS = ["moe", "dense", "dense_mla", "mla_no_q_lora", "gqa_no_qk_norm"]


def _model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(cfg)


# ---------------------------------------------------------------------------------------------
# shapes, losses, parameter names


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_loss_composition(name: str) -> None:
    cfg = _variant(name)
    model = _model(cfg)
    ids = torch.randint(0, V, (2, 12))
    out = model(ids, ids)
    assert out.logits.shape == (2, 12, V)
    assert [t.shape for t in out.mtp_logits] == [(2, 11, V)]
    for scalar in (out.loss, out.ce, out.mtp, out.balance):
        assert scalar.shape == () and torch.isfinite(scalar)
    expected = out.ce + cfg.mtp.loss_weight * out.mtp + out.balance
    torch.testing.assert_close(out.loss, expected)
    # Random init predicts near-uniformly: CE ~ ln V.
    assert abs(out.ce.item() - math.log(V)) < 0.2
    assert (out.balance.item() > 0) == (cfg.moe is not None)

    no_targets = model(ids)
    assert no_targets.loss is None and no_targets.ce is None and no_targets.mtp_logits == ()
    torch.testing.assert_close(no_targets.logits, out.logits)


def test_hf_parameter_names() -> None:
    names = set(_model(debug_config(V, "moe")).state_dict())
    for key in [
        "embed_tokens.weight",
        "norm.weight",
        "lm_head.weight",
        "layers.0.mlp.gate_proj.weight",  # first layer dense (num_dense_layers=1)
        "layers.1.input_layernorm.weight",
        "layers.1.post_attention_layernorm.weight",
        "layers.1.self_attn.q_a_proj.weight",
        "layers.1.self_attn.q_a_layernorm.weight",
        "layers.1.self_attn.q_b_proj.weight",
        "layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "layers.1.self_attn.kv_a_layernorm.weight",
        "layers.1.self_attn.kv_b_proj.weight",
        "layers.1.self_attn.o_proj.weight",
        "layers.1.mlp.gate.weight",
        "layers.1.mlp.gate.e_score_correction_bias",
        "layers.1.mlp.shared_experts.down_proj.weight",
        "layers.2.mlp.experts.gate_up_proj",  # HF fused layout [E, 2F, D]
        "layers.2.mlp.experts.down_proj",
        "mtp.0.enorm.weight",
        "mtp.0.hnorm.weight",
        "mtp.0.eh_proj.weight",
        "mtp.0.norm.weight",
        "mtp.0.block.mlp.experts.gate_up_proj",  # MTP block is MoE
    ]:
        assert key in names, key
    assert not any("tokens_per_expert" in n or "last_load" in n for n in names)  # not persistent
    gqa_names = set(_model(debug_config(V, "dense")).state_dict())
    assert {"layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_proj.weight"} <= gqa_names


def test_tied_embeddings_share_one_tensor() -> None:
    cfg = dataclasses.replace(debug_config(V, "dense"), tie_word_embeddings=True)
    model = _model(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = _model(debug_config(V, "dense"))
    assert untied.num_params() - model.num_params() == V * cfg.hidden_size


def test_param_and_flop_counts() -> None:
    dense = _model(debug_config(V, "dense"))
    cfg = dense.config
    n_all = sum(p.numel() for p in dense.parameters())
    assert dense.num_params() == n_all
    assert dense.num_params(exclude_embeddings=True) == n_all - V * cfg.hidden_size
    S, H, hd = 64, cfg.attention.num_heads, cfg.hidden_size // cfg.attention.num_heads
    # Dense: all weights but the embedding lookup are active, and the head runs once more for
    # the MTP depth, which adds back exactly an embedding-sized matrix.
    active = n_all
    attn = 6 * (cfg.num_layers + 1) * S * H * 2 * hd
    assert flops_per_token(dense, S) == pytest.approx(6 * active + attn)
    assert flops_per_token(dense, S, causal=True) == pytest.approx(6 * active + attn / 2)

    moe_model = _model(debug_config(V, "moe"))
    routed = sum(p.numel() for m in moe_model.moe_layers() for p in m.experts.parameters())
    no_attn = flops_per_token(moe_model, S) - flops_per_token(moe_model, 0)
    assert no_attn > 0
    # Only K/E of the routed experts are active: 4 of 16.
    full = 6 * (moe_model.num_params(exclude_embeddings=True) + V * 64)
    assert flops_per_token(moe_model, 0) == pytest.approx(full - 6 * routed * (1 - 4 / 16))


def test_init_weights_table() -> None:
    cfg = dataclasses.replace(debug_config(V, "moe"), init_std=0.05, num_layers=8)
    model = _model(cfg)
    std = model.layers[3].mlp.experts.gate_up_proj.std().item()
    assert std == pytest.approx(0.05, rel=0.1)
    o_std = (
        torch.cat([layer.self_attn.o_proj.weight.flatten() for layer in model.layers]).std().item()
    )
    assert o_std == pytest.approx(0.05 / math.sqrt(16), rel=0.1)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(model.layers[1].self_attn.kv_a_layernorm.weight, torch.ones(16))
    assert torch.equal(model.mtp[0].hnorm.weight, torch.ones(64))
    gate = model.layers[1].mlp.gate
    assert gate.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, torch.zeros(16))


def test_forward_rejects_bad_inputs() -> None:
    model = _model(debug_config(V, "dense"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(8, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# causality and attention core


@pytest.mark.parametrize("name", ["moe", "dense", "dense_mla"])
def test_causality_main_and_mtp_logits(name: str) -> None:
    model = _model(_variant(name)).eval()
    ids = torch.randint(0, V, (2, 16))
    j = 9  # changed position
    ids2 = ids.clone()
    ids2[:, j] = (ids[:, j] + 1) % V
    with torch.no_grad():
        a, b = model(ids, ids), model(ids2, ids)
    torch.testing.assert_close(a.logits[:, :j], b.logits[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(a.logits[:, j], b.logits[:, j])
    # MTP position i reads input_ids[..i+1]: positions < j-1 are unaffected, j-1 is.
    torch.testing.assert_close(
        a.mtp_logits[0][:, : j - 1], b.mtp_logits[0][:, : j - 1], rtol=0, atol=1e-6
    )
    assert not torch.allclose(a.mtp_logits[0][:, j - 1], b.mtp_logits[0][:, j - 1])


@pytest.mark.parametrize("shape", [(128, 48), (4, 32, 48), (2, 40, 48)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_onednn_linear_equals_f_linear(shape: tuple[int, ...], weight_grad: bool) -> None:
    """The fp32 CPU path of `linear` (oneDNN GEMMs forward and backward) == F.linear."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(80, 48, requires_grad=weight_grad)
    assert uses_onednn(x, w), "this torch build must have oneDNN (torch.ops.mkldnn)"
    got, want = linear(x, w), F.linear(x, w)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    inputs = (x, w) if weight_grad else (x,)
    for g, r in zip(
        torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True
    ):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


def test_onednn_linear_only_for_fp32_cpu_outside_autocast() -> None:
    w = torch.randn(80, 48)
    assert uses_onednn(torch.randn(64, 48), w)
    assert not uses_onednn(torch.randn(16, 48), w)  # too few rows: MKL's call is cheaper
    assert not uses_onednn(torch.randn(64, 48, dtype=torch.bfloat16), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(torch.randn(64, 48), w)  # autocast's bf16 GEMM instead
        assert linear(torch.randn(64, 48), w).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_rmsnorm_matches_the_written_out_formula(dtype: torch.dtype, autocast: bool) -> None:
    """Fused F.rms_norm == HF's x * rsqrt(mean(x^2) + eps) in fp32, cast back, times the weight:
    outputs and gradients, with and without bf16 autocast."""
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 48) * 4).to(dtype).requires_grad_()
    x_fp32 = x.float()
    want = norm.weight * (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(
        dtype
    )
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = norm(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (x, norm.weight), grad)
    want_grads = torch.autograd.grad(want, (x, norm.weight), grad)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _eager_attention(q_BHSQ, k_BGSQ, v_BGSU, scale, mask_B1ST=None):
    assert mask_B1ST is None, "the reference covers the causal case only"
    H, G, S = q_BHSQ.shape[1], k_BGSQ.shape[1], q_BHSQ.shape[2]
    k_BHSQ = k_BGSQ.repeat_interleave(H // G, dim=1)
    v_BHSU = v_BGSU.repeat_interleave(H // G, dim=1)
    scores = (q_BHSQ.float() @ k_BHSQ.float().transpose(-1, -2)) * scale
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    return (probs @ v_BHSU.float()).to(q_BHSQ.dtype)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "qk_dim", "v_dim"), [(4, 4, 24, 12), (4, 2, 16, 16), (6, 1, 8, 8)]
)
def test_sdpa_core_matches_eager_reference(
    heads: int, kv_heads: int, qk_dim: int, v_dim: int
) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, heads, 10, qk_dim, requires_grad=True)
    k = torch.randn(2, kv_heads, 10, qk_dim, requires_grad=True)
    v = torch.randn(2, kv_heads, 10, v_dim, requires_grad=True)
    out = causal_attention(q, k, v, scale=qk_dim**-0.5)
    ref = _eager_attention(q, k, v, qk_dim**-0.5)
    assert out.shape == (2, heads, 10, v_dim)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # v_dim < qk_dim pads v for the flash kernel: the gradients must not see the padding.
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["moe", "dense", "mla_no_q_lora"])
def test_attention_modules_match_with_eager_core(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(_variant(name)).eval()
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        sdpa = model(ids).logits
        monkeypatch.setattr(attention_mod, "causal_attention", _eager_attention)
        eager = model(ids).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# RoPE


def _rope_at(x_R: torch.Tensor, pos: int, interleaved: bool) -> torch.Tensor:
    cos, sin = rope_cos_sin(pos + 1, x_R.shape[-1], 10000.0)
    return apply_rope(x_R.expand(1, pos + 1, 1, -1), (cos, sin), interleaved=interleaved)[0, pos, 0]


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_is_a_relative_rotation(interleaved: bool) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    for pos in (0, 3, 17):
        torch.testing.assert_close(_rope_at(q, pos, interleaved).norm(), q.norm())
    # q.k depends only on the position difference.
    dots = [_rope_at(q, m, interleaved) @ _rope_at(k, m - 2, interleaved) for m in (2, 5, 30)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), rtol=1e-5, atol=1e-5)
    # ... and it does depend on it.
    other = _rope_at(q, 7, interleaved) @ _rope_at(k, 2, interleaved)
    assert not torch.allclose(other, dots[0])


def test_interleaved_rope_equals_official_complex_rotation() -> None:
    """DeepSeek's inference code: view rope dims as complex pairs (x0+i x1, ...) times e^{i pos f}.
    Ours returns the same numbers, de-interleaved to [real parts, imaginary parts]."""
    torch.manual_seed(0)
    S, R = 12, 8
    x_BSHR = torch.randn(2, S, 3, R)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, R, 2).float() / R))
    freqs_cis = torch.polar(torch.ones(S, R // 2), torch.outer(torch.arange(S).float(), inv_freq))
    official = torch.view_as_real(
        torch.view_as_complex(x_BSHR.view(2, S, 3, R // 2, 2)) * freqs_cis[:, None]
    )
    ours = apply_rope(x_BSHR, rope_cos_sin(S, R, 10000.0), interleaved=True)
    torch.testing.assert_close(ours, torch.cat([official[..., 0], official[..., 1]], dim=-1))


# ---------------------------------------------------------------------------------------------
# MTP


def test_mtp_depth1_at_position_i_is_trained_on_token_i_plus_2() -> None:
    model = _model(debug_config(V, "moe")).eval()
    S = 10
    window = torch.randint(0, V, (2, S + 1))
    input_ids, targets = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        out = model(input_ids, targets)
        # Recompute depth 1 from the module's own parts.
        rope = rope_cos_sin(S, model.config.rope_dim, model.config.rope_theta)
        x = model.embed_tokens(input_ids)
        for layer in model.layers:
            x, _ = layer(x, rope)
        h0 = model.norm(x)
        mtp = model.mtp[0]
        emb = model.embed_tokens(window[:, 1:S])  # Emb(t_{i+1}) for i = 0..S-2
        h = mtp.eh_proj(
            torch.cat([mtp.enorm(emb), mtp.hnorm(h0[:, : S - 1])], dim=-1)
        )  # embedding first
        h, _ = mtp.block(h, (rope[0][: S - 1], rope[1][: S - 1]))
        logits = model.lm_head(mtp.norm(h))
    torch.testing.assert_close(out.mtp_logits[0], logits, rtol=1e-5, atol=1e-5)
    # Position i is scored against window[i + 2]; the last position (no token i+2) is dropped.
    manual_ce = F.cross_entropy(logits.flatten(0, 1), window[:, 2:].flatten())
    torch.testing.assert_close(out.mtp, manual_ce)


def test_mtp_depth2_mean_over_depths_and_ignore_index() -> None:
    cfg = dataclasses.replace(debug_config(V, "dense"), mtp=MTPConfig(depth=2, loss_weight=0.5))
    model = _model(cfg).eval()
    window = torch.randint(0, V, (2, 13))
    input_ids, targets = window[:, :-1], window[:, 1:].clone()
    targets[0, 5] = -100
    with torch.no_grad():
        out = model(input_ids, targets)
    assert [t.shape[1] for t in out.mtp_logits] == [11, 10]
    ces = [
        F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100)
        for k, lg in enumerate(out.mtp_logits, start=1)
    ]
    torch.testing.assert_close(out.mtp, torch.stack(ces).mean())
    torch.testing.assert_close(out.loss, out.ce + 0.5 * out.mtp)
    all_ignored = model(input_ids, torch.full_like(targets, -100))
    assert all_ignored.ce.item() == 0.0 and all_ignored.mtp.item() == 0.0  # no NaN


def test_moe_layers_include_mtp_blocks() -> None:
    model = _model(debug_config(V, "moe"))
    layers = model.moe_layers()
    assert len(layers) == 3 and layers[-1] is model.mtp[0].block.mlp
    assert all(isinstance(m, MoE) for m in layers)
    assert _model(debug_config(V, "dense")).moe_layers() == []


# ---------------------------------------------------------------------------------------------
# training behaviour


def test_overfits_one_batch() -> None:
    model = _model(debug_config(V, "moe"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    window = torch.randint(0, V, (4, 17))
    losses = []
    for _ in range(30):
        out = model(window[:, :-1], window[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_moe_biases(progress=0.0)
        losses.append(out.ce.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())


def test_bf16_autocast_keeps_router_fp32() -> None:
    model = _model(debug_config(V, "moe"))
    seen = []
    hook = model.layers[1].mlp.gate.register_forward_hook(lambda m, i, o: seen.append(o))
    ids = torch.randint(0, V, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    hook.remove()
    _, weights, scores = seen[0]
    assert scores.dtype == torch.float32 and weights.dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# config


def test_config_round_trip_and_name_key() -> None:
    for kind in ("moe", "dense", "dense_mla"):
        cfg = debug_config(V, kind)
        d = cfg.to_dict()
        assert isinstance(d["attention"], dict) and d["attention"]["kind"] in ("mla", "gqa")
        assert ModelConfig.from_dict(d) == cfg
        assert ModelConfig.from_dict({**d, "name": "tiny"}) == cfg
    assert debug_config(V, "dense").to_dict()["moe"] is None


def _set(d: dict, path: str, value: object) -> dict:
    d = copy.deepcopy(d)
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    return d


BASE = debug_config(V, "moe").to_dict()
GQA_BASE = debug_config(V, "dense").to_dict()


@pytest.mark.parametrize(
    ("base", "path", "value", "field"),
    [
        (GQA_BASE, "attention.num_heads", 6, "hidden_size"),  # 64 % 6 with head_dim None
        (GQA_BASE, "attention.num_kv_heads", 3, "num_kv_heads"),
        (GQA_BASE, "attention.head_dim", 7, "head_dim"),
        (BASE, "moe.num_experts_per_tok", 17, "num_experts_per_tok"),
        (BASE, "moe.num_groups", 3, "num_groups"),  # 16 % 3
        (BASE, "moe.num_groups", 16, "num_groups"),  # 1 expert per group
        (BASE, "moe.topk_groups", 5, "topk_groups"),
        (BASE, "moe.num_experts_per_tok", 9, "num_experts_per_tok"),  # > 2 groups * 4 experts
        (BASE, "moe.balance_alpha", "1e-4", "balance_alpha"),  # YAML 1.1 string
        (BASE, "moe.moe_intermediate_size", 0, "moe_intermediate_size"),
        (BASE, "attention.qk_rope_head_dim", 7, "qk_rope_head_dim"),
        (BASE, "attention.q_lora_rank", -1, "q_lora_rank"),
        (BASE, "num_dense_layers", 4, "num_dense_layers"),
        (BASE, "hidden_size", 0, "hidden_size"),
        (BASE, "vocab_size", True, "vocab_size"),
        (BASE, "rms_norm_eps", 0.0, "rms_norm_eps"),
        (BASE, "mtp.loss_weight", -0.1, "loss_weight"),
        (BASE, "mtp.depth", -1, "depth"),
        (BASE, "attention.kind", "mha", "attention.kind"),
    ],
)
def test_bad_config_raises_naming_field(base: dict, path: str, value: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(_set(base, path, value))


@pytest.mark.parametrize(
    ("path", "allowed"), [("foo", "hidden_size"), ("moe.num_expert", "num_experts")]
)
def test_unknown_key_lists_allowed_keys(path: str, allowed: str) -> None:
    key = path.split(".")[-1]
    with pytest.raises(ValueError, match=f"unknown key.*{key}.*allowed keys.*{allowed}"):
        ModelConfig.from_dict(_set(BASE, path, 1))


def test_missing_key_and_direct_construction() -> None:
    d = copy.deepcopy(BASE)
    del d["attention"]["kv_lora_rank"]
    with pytest.raises(ValueError, match="missing key.*kv_lora_rank"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(
            vocab_size=8,
            hidden_size=8,
            num_layers=1,
            intermediate_size=8,
            max_seq_len=8,
            attention={"kind": "mla"},
        )
    cfg = ModelConfig(
        vocab_size=8,
        hidden_size=8,
        num_layers=1,
        intermediate_size=8,
        max_seq_len=8,
        attention=GQAConfig(num_heads=2, num_kv_heads=1),
        moe=MoEConfig(
            num_experts=4, num_shared_experts=0, num_experts_per_tok=2, moe_intermediate_size=4
        ),
    )
    assert cfg.rope_dim == 4 and cfg.mtp.depth == 0
    assert (
        MLAConfig(
            num_heads=1,
            q_lora_rank=0,
            kv_lora_rank=4,
            qk_nope_head_dim=4,
            qk_rope_head_dim=2,
            v_head_dim=4,
        ).kind
        == "mla"
    )
    with pytest.raises(ValueError, match="kind"):
        debug_config(V, "huge")


def test_init_weights_on_submodule() -> None:
    cfg = debug_config(V, "moe")
    moe = MoE(cfg)
    init_weights(moe, cfg)
    assert moe.gate.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
