"""Hugging Face configs: our `ModelConfig` <-> the `transformers` config of a class that computes it
natively (no `trust_remote_code`), and back.

    MLA attention, dense or MoE FFNs   -> DeepseekV3ForCausalLM  (first_k_dense_replace = dense layers)
    GQA attention, dense FFNs           -> LlamaForCausalLM, or Qwen3ForCausalLM with QK-norm
    GQA + MoE, GQA + MTP                -> refused: no transformers class computes them
                                           (export.py drop_mtp=true exports GQA without MTP)

The weights and folders are in hf.py. Spec and pitfalls: ../shared/design/deepseek_v3.md §3, §7.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import GQAConfig, MLAConfig, ModelConfig, MoEConfig, MTPConfig

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def target(config: ModelConfig) -> str:
    """The HF `model_type` that computes `config` exactly; ValueError naming the combination if none."""
    a = config.attention
    if isinstance(a, MLAConfig):
        if (
            config.moe is not None
            and config.num_dense_layers >= config.num_layers
            and config.mtp.depth
        ):
            raise ValueError(
                "unsupported combination for a Hugging Face export: MoE only in the MTP blocks "
                f"(num_dense_layers={config.num_dense_layers} >= num_layers={config.num_layers}); "
                "DeepseekV3's config cannot say whether its MTP layer is MoE"
            )
        return "deepseek_v3"
    if config.moe is not None:
        raise ValueError(
            "unsupported combination for a Hugging Face export: GQA attention + MoE FFNs "
            "(Llama / Qwen3 are dense; DeepseekV3 needs MLA). Use attention.kind=mla or moe=null"
        )
    if config.mtp.depth:
        raise ValueError(
            f"unsupported combination for a Hugging Face export: GQA attention + MTP (depth "
            f"{config.mtp.depth}); Llama / Qwen3 have no MTP layers. Pass drop_mtp=true to export "
            "the main model only (its logits do not depend on MTP)"
        )
    return "qwen3" if a.qk_norm else "llama"


def to_hf_config(config: ModelConfig, special_ids: Mapping[str, int | None] | None = None):
    """A `transformers` config (DeepseekV3Config, LlamaConfig or Qwen3Config) for `config`.

    `special_ids`: bos_token_id / eos_token_id / pad_token_id of the tokenizer.
    """
    from transformers import DeepseekV3Config, LlamaConfig, Qwen3Config

    model_type = target(config)
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        hidden_act="silu",
        attention_bias=False,
        architectures=[ARCHITECTURES[model_type]],
        dtype=torch.float32,
        **dict(special_ids or {}),
    )
    a = config.attention
    if model_type in ("llama", "qwen3"):  # Qwen3 = Llama + QK-norm; both default to no biases
        return (LlamaConfig if model_type == "llama" else Qwen3Config)(
            num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_kv_heads,
            head_dim=a.resolved_head_dim(config.hidden_size),
            **common,
        )
    moe = config.moe
    moe_fields = {}
    if moe is not None:
        moe_fields = dict(
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts,
            num_experts_per_tok=moe.num_experts_per_tok,
            moe_intermediate_size=moe.moe_intermediate_size,
            n_group=moe.num_groups,
            topk_group=moe.topk_groups,
            routed_scaling_factor=float(moe.routed_scaling_factor),
        )
    return DeepseekV3Config(
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_heads,  # MLA expands K/V per head
        q_lora_rank=a.q_lora_rank or None,
        kv_lora_rank=a.kv_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        first_k_dense_replace=config.num_dense_layers if moe is not None else config.num_layers,
        norm_topk_prob=True,
        rope_interleave=True,
        num_nextn_predict_layers=config.mtp.depth,
        **moe_fields,
        **common,
    )


def _refuse(hf, what: str) -> None:
    raise ValueError(f"cannot import {hf.model_type} config: {what}")


def from_hf_config(hf, mtp_depth: int | None = None) -> ModelConfig:
    """Our `ModelConfig` for a DeepseekV3 / Llama / Qwen3 `transformers` config.

    Training-only knobs (balance loss, bias update speed, MTP loss weight) get their defaults.
    `mtp_depth`: MTP modules to build (default: the config's `num_nextn_predict_layers`).
    """
    model_type = getattr(hf, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"cannot import model_type={model_type!r}: supported are {sorted(ARCHITECTURES)}"
        )
    rope = hf.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    if rope.get("rope_type", "default") != "default":
        _refuse(hf, f"rope_type={rope['rope_type']!r} (only plain RoPE is implemented)")
    if hf.hidden_act != "silu":
        _refuse(hf, f"hidden_act={hf.hidden_act!r} (SwiGLU needs silu)")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        _refuse(hf, "linear biases (attention_bias / mlp_bias) are not implemented")
    if getattr(hf, "quantization_config", None):
        _refuse(hf, "quantized weights (quantization_config); dequantize to bf16/fp32 first")
    common = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        intermediate_size=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.rms_norm_eps),
        init_std=float(hf.initializer_range),
        tie_word_embeddings=bool(hf.tie_word_embeddings),
    )
    if model_type in ("llama", "qwen3"):
        if getattr(hf, "use_sliding_window", False):
            _refuse(hf, "use_sliding_window=true (sliding-window attention is not implemented)")
        head_dim = getattr(hf, "head_dim", None)
        attention = GQAConfig(
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            # None when it is hidden_size / num_heads, as our configs write it
            head_dim=None if head_dim == hf.hidden_size // hf.num_attention_heads else head_dim,
            qk_norm=model_type == "qwen3",
        )
        if mtp_depth:
            _refuse(hf, f"{mtp_depth} MTP layers (Llama / Qwen3 have none)")
        return ModelConfig(attention=attention, **common)

    if not hf.rope_interleave:
        _refuse(hf, "rope_interleave=false (we rotate interleaved pairs, as DeepSeek released)")
    if hf.num_key_value_heads != hf.num_attention_heads:
        _refuse(hf, "num_key_value_heads != num_attention_heads")
    if not hf.norm_topk_prob:
        _refuse(hf, "norm_topk_prob=false (the router always normalises its top-k weights)")
    attention = MLAConfig(
        num_heads=hf.num_attention_heads,
        q_lora_rank=hf.q_lora_rank or 0,
        kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
    )
    moe = None
    if hf.first_k_dense_replace < hf.num_hidden_layers:
        moe = MoEConfig(
            num_experts=hf.n_routed_experts,
            num_shared_experts=hf.n_shared_experts,
            num_experts_per_tok=hf.num_experts_per_tok,
            moe_intermediate_size=hf.moe_intermediate_size,
            num_groups=hf.n_group,
            topk_groups=hf.topk_group,
            routed_scaling_factor=float(hf.routed_scaling_factor),
        )
    depth = hf.num_nextn_predict_layers if mtp_depth is None else mtp_depth
    return ModelConfig(
        attention=attention,
        moe=moe,
        num_dense_layers=min(hf.first_k_dense_replace, hf.num_hidden_layers) if moe else 0,
        mtp=MTPConfig(depth=depth),
        **common,
    )
