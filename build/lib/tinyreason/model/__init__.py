"""tinyreason model package: DeepSeek-V3-style (MLA + DeepSeekMoE + MTP) and Llama/Qwen3-style
(GQA, dense) causal LMs in plain PyTorch, with HF parameter names."""

from .config import GQAConfig, MLAConfig, ModelConfig, MoEConfig, MTPConfig, debug_config
from .transformer import CausalLM, ModelOutput, init_weights

__all__ = [
    "CausalLM",
    "GQAConfig",
    "MLAConfig",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "MTPConfig",
    "debug_config",
    "init_weights",
]
