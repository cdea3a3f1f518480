"""Typed, validated model configuration.

Architecture only: optimisation and data live in their own configs. Names follow the HF
`DeepseekV3Config` fields where one exists (HF name in brackets), so the exporter is a plain mapping.
Every config is a frozen dataclass validated in `__post_init__`; bad values raise `ValueError`
naming the field, because they usually come from a YAML file a person edited.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


def _fail(owner: object, name: str, message: str) -> None:
    raise ValueError(f"{type(owner).__name__}.{name} {message}")


def _check_int(owner: object, name: str, minimum: int) -> None:
    value = getattr(owner, name)
    # bool is an int subclass; `True` for a size is a typo, not a size.
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(owner, name, f"must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        _fail(owner, name, f"must be >= {minimum}, got {value}")


def _check_float(owner: object, name: str, *, positive: bool) -> None:
    value = getattr(owner, name)
    # YAML 1.1 reads `1e-4` as a string; catch that here rather than deep in a forward pass.
    if not isinstance(value, int | float) or isinstance(value, bool):
        _fail(owner, name, f"must be a number, got {type(value).__name__} {value!r}")
    if value < 0 or (positive and value == 0):
        _fail(owner, name, f"must be {'> 0' if positive else '>= 0'}, got {value}")


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head Latent Attention, DeepSeek-V2/V3 (arXiv 2412.19437 eqs. 1-11)."""

    kind: Literal["mla"] = "mla"
    num_heads: int
    q_lora_rank: int  # d'_c; 0 = no query compression (a single q_proj)
    kv_lora_rank: int  # d_c, the cached latent
    qk_nope_head_dim: int  # d_h
    qk_rope_head_dim: int  # d_h^R, shared decoupled key; interleaved pairs, so even
    v_head_dim: int

    def __post_init__(self) -> None:
        if self.kind != "mla":
            _fail(self, "kind", f"must be 'mla', got {self.kind!r}")
        for name in (
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            _check_int(self, name, 1)
        _check_int(self, "q_lora_rank", 0)
        if self.qk_rope_head_dim % 2:
            _fail(
                self,
                "qk_rope_head_dim",
                f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}",
            )


@dataclass(frozen=True, kw_only=True)
class GQAConfig:
    """Grouped-query attention as in Llama / Qwen3 (half-split RoPE)."""

    kind: Literal["gqa"] = "gqa"
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE

    def __post_init__(self) -> None:
        if self.kind != "gqa":
            _fail(self, "kind", f"must be 'gqa', got {self.kind!r}")
        _check_int(self, "num_heads", 1)
        _check_int(self, "num_kv_heads", 1)
        if self.num_heads % self.num_kv_heads:
            _fail(
                self,
                "num_kv_heads",
                f"({self.num_kv_heads}) must divide num_heads ({self.num_heads})",
            )
        if self.head_dim is not None:
            _check_int(self, "head_dim", 1)
            if self.head_dim % 2:
                _fail(self, "head_dim", f"must be even (RoPE rotates pairs), got {self.head_dim}")
        if not isinstance(self.qk_norm, bool):
            _fail(self, "qk_norm", f"must be a bool, got {self.qk_norm!r}")

    def resolved_head_dim(self, hidden_size: int) -> int:
        return self.head_dim if self.head_dim is not None else hidden_size // self.num_heads


BALANCE_MODES = ("both", "aux_free", "aux_loss", "none")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """DeepSeekMoE with sigmoid, group-limited routing and aux-loss-free balancing (eqs. 12-20)."""

    num_experts: int  # routed experts N_r [n_routed_experts]
    num_shared_experts: int  # N_s, fused into one MLP of width N_s * moe_intermediate_size
    num_experts_per_tok: int  # K_r
    moe_intermediate_size: int
    num_groups: int = 1  # [n_group]; 1 = no group-limited routing
    topk_groups: int = 1  # [topk_group]
    routed_scaling_factor: float = 2.5
    # Load balancing: "aux_free" = bias update only, "aux_loss" = sequence-wise loss only,
    # "both" = DeepSeek-V3 (bias update + a small loss), "none" = neither (load is still logged).
    balance: str = "both"
    balance_alpha: float = 1e-4  # alpha of the sequence-wise balance loss (aux_loss, both)
    bias_update_speed: float = 1e-3  # gamma of the bias update (aux_free, both)
    # Fraction of the optimizer steps after which gamma is 0 (DeepSeek-V3: 14.3T of 14.8T tokens).
    bias_update_until: float = 1.0

    @property
    def loss_alpha(self) -> float:
        """The balance loss weight in effect: alpha if the mode has the loss, else 0."""
        return self.balance_alpha if self.balance in ("aux_loss", "both") else 0.0

    def bias_gamma(self, progress: float) -> float:
        """gamma in effect after `progress` (0..1) of training: 0 without the bias update."""
        on = self.balance in ("aux_free", "both") and progress < self.bias_update_until
        return self.bias_update_speed if on else 0.0

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            _fail(self, "balance", f"must be one of {list(BALANCE_MODES)}, got {self.balance!r}")
        for name in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "num_groups",
            "topk_groups",
        ):
            _check_int(self, name, 1)
        _check_int(self, "num_shared_experts", 0)
        _check_float(self, "routed_scaling_factor", positive=True)
        _check_float(self, "balance_alpha", positive=False)
        _check_float(self, "bias_update_speed", positive=False)
        _check_float(self, "bias_update_until", positive=False)
        if self.bias_update_until > 1:
            _fail(self, "bias_update_until", f"must be <= 1, got {self.bias_update_until}")
        e, k, g = self.num_experts, self.num_experts_per_tok, self.num_groups
        if k > e:
            _fail(self, "num_experts_per_tok", f"({k}) must be <= num_experts ({e})")
        if e % g:
            _fail(self, "num_groups", f"({g}) must divide num_experts ({e})")
        if g > 1 and e // g < 2:
            # The group score sums the top-2 experts of a group (HF always takes topk(2)).
            _fail(self, "num_groups", f"({g}) leaves {e // g} expert per group; need >= 2")
        if self.topk_groups > g:
            _fail(self, "topk_groups", f"({self.topk_groups}) must be <= num_groups ({g})")
        if k > self.topk_groups * (e // g):
            _fail(
                self,
                "num_experts_per_tok",
                f"({k}) must be <= topk_groups * experts per group ({self.topk_groups * (e // g)})",
            )


@dataclass(frozen=True, kw_only=True)
class MTPConfig:
    """Multi-token prediction, DeepSeek-V3 §2.2 (eqs. 21-25)."""

    depth: int = 0  # D sequential modules; 0 = off [num_nextn_predict_layers]
    loss_weight: float = 0.3  # lambda

    def __post_init__(self) -> None:
        _check_int(self, "depth", 0)
        _check_float(self, "loss_weight", positive=False)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int | None  # None until a tokenizer is chosen: `with_vocab` sets it
    hidden_size: int
    num_layers: int
    intermediate_size: int  # dense SwiGLU width
    attention: MLAConfig | GQAConfig
    max_seq_len: int
    moe: MoEConfig | None = None  # None = every FFN dense
    num_dense_layers: int = 0  # [first_k_dense_replace]: first k layers dense; only used with moe
    mtp: MTPConfig = field(default_factory=MTPConfig)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.vocab_size is not None:
            _check_int(self, "vocab_size", 1)
        for name in ("hidden_size", "num_layers", "intermediate_size", "max_seq_len"):
            _check_int(self, name, 1)
        _check_int(self, "num_dense_layers", 0)
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            _check_float(self, name, positive=True)
        if not isinstance(self.attention, MLAConfig | GQAConfig):
            _fail(
                self,
                "attention",
                f"must be MLAConfig or GQAConfig, got {type(self.attention).__name__}",
            )
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            _fail(self, "moe", f"must be MoEConfig or None, got {type(self.moe).__name__}")
        if not isinstance(self.mtp, MTPConfig):
            _fail(self, "mtp", f"must be MTPConfig, got {type(self.mtp).__name__}")
        if not isinstance(self.tie_word_embeddings, bool):
            _fail(self, "tie_word_embeddings", f"must be a bool, got {self.tie_word_embeddings!r}")
        if self.num_dense_layers > self.num_layers:
            _fail(
                self,
                "num_dense_layers",
                f"({self.num_dense_layers}) must be <= num_layers ({self.num_layers})",
            )
        attn = self.attention
        if isinstance(attn, GQAConfig) and attn.head_dim is None:
            if self.hidden_size % attn.num_heads:
                _fail(
                    self,
                    "hidden_size",
                    f"({self.hidden_size}) must be divisible by attention.num_heads ({attn.num_heads}) when head_dim is None",
                )
            if attn.resolved_head_dim(self.hidden_size) % 2:
                _fail(
                    self, "hidden_size", "/ attention.num_heads must be even (RoPE rotates pairs)"
                )

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(self, vocab_size=vocab_size)

    @property
    def rope_dim(self) -> int:
        """Number of rotated dims per q/k head."""
        a = self.attention
        if isinstance(a, MLAConfig):
            return a.qk_rope_head_dim
        return a.resolved_head_dim(self.hidden_size)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from plain (or OmegaConf) mappings; a top-level `name` key is ignored."""
        d = dict(_as_mapping(d, "model config"))
        d.pop("name", None)
        if "attention" in d:
            d["attention"] = _attention_from(d["attention"])
        if d.get("moe") is not None:
            d["moe"] = _build(MoEConfig, d["moe"], "moe")
        if "mtp" in d:
            d["mtp"] = _build(MTPConfig, d["mtp"], "mtp")
        return _build(cls, d, "model config")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; `from_dict(cfg.to_dict()) == cfg`."""
        return dataclasses.asdict(self)


def _as_mapping(d: Any, section: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{section} must be a mapping, got {type(d).__name__}")
    return d


def _build(cls: type, d: Any, section: str) -> Any:
    if isinstance(d, cls):
        return d
    d = _as_mapping(d, section)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {section}; allowed keys: {allowed}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"missing key(s) {missing} in {section}; required keys: {required}")
    return cls(**d)


def _attention_from(d: Any) -> MLAConfig | GQAConfig:
    if isinstance(d, MLAConfig | GQAConfig):
        return d
    kinds = {"mla": MLAConfig, "gqa": GQAConfig}
    kind = _as_mapping(d, "attention").get("kind")
    if kind not in kinds:
        raise ValueError(f"attention.kind must be one of {sorted(kinds)}, got {kind!r}")
    return _build(kinds[kind], d, f"attention ({kind})")


DebugKind = Literal["moe", "dense", "dense_mla"]


def debug_config(vocab_size: int = 512, kind: DebugKind = "moe") -> ModelConfig:
    """Tiny configs of spec §6 that exercise every code path in CPU tests (MTP depth 1 in all).

    moe: MLA + DeepSeekMoE (v_head_dim != qk_nope_head_dim exercises the splits);
    dense: GQA with qk_norm (Qwen3-like); dense_mla: MLA with dense FFNs.
    """
    mla = MLAConfig(
        num_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
    )
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=3,
        intermediate_size=128,
        max_seq_len=128,
        mtp=MTPConfig(depth=1),
    )
    if kind == "moe":
        moe = MoEConfig(
            num_experts=16,
            num_shared_experts=2,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            num_groups=4,
            topk_groups=2,
        )
        return ModelConfig(attention=mla, moe=moe, num_dense_layers=1, **common)
    if kind == "dense":
        gqa = GQAConfig(num_heads=4, num_kv_heads=2, qk_norm=True)
        return ModelConfig(attention=gqa, **common)
    if kind == "dense_mla":
        return ModelConfig(attention=mla, **common)
    raise ValueError(f"kind must be one of ['moe', 'dense', 'dense_mla'], got {kind!r}")
