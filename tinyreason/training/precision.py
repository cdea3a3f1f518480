"""The `precision` group: Lightning precision strings, and FP8 training of the eligible linears.

fp32   "32-true"
bf16   "bf16-mixed" (fp32 master weights, bf16 autocast)
fp8    "bf16-mixed" + torchao float8 training (`convert_to_float8_training`) of every nn.Linear
       whose dims a float8 GEMM takes (multiples of 16), except the output head. The embedding,
       router (a plain Parameter, not an nn.Linear), norms and the attention core stay in high
       precision (DeepSeek-V3 §3.3.1). Without an FP8-capable GPU (sm89+) the same numerics run
       emulated (`emulate=True`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

NAMES = ("fp32", "bf16", "fp8")
LIGHTNING = {"fp32": "32-true", "bf16": "bf16-mixed", "fp8": "bf16-mixed"}
# rowwise_with_gw_hp fails in backward under CPU bf16 autocast in torchao 0.18 (dtype mismatch in
# its high-precision grad_weight mm); it comes with the full FP8 issue.
FP8_RECIPES = ("tensorwise", "rowwise")
HIGH_PRECISION = ("lm_head",)  # never converted, whatever their shape


@dataclass(frozen=True)
class PrecisionConfig:
    name: str = "bf16"
    recipe: str = "tensorwise"  # fp8 only
    emulate: bool | None = None  # fp8 only; None = emulate unless a CUDA GPU with sm89+ is present

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"precision.name={self.name!r} is not one of {list(NAMES)}")
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"precision.recipe={self.recipe!r} is not one of {list(FP8_RECIPES)}")

    @property
    def lightning(self) -> str:
        return LIGHTNING[self.name]


def fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def convert_fp8(model: nn.Module, cfg: PrecisionConfig) -> list[str]:
    """Swap eligible nn.Linear modules for torchao Float8Linear in place; return their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    emulate = (not fp8_capable()) if cfg.emulate is None else cfg.emulate
    ao_cfg = dataclasses.replace(Float8LinearConfig.from_recipe_name(cfg.recipe), emulate=emulate)
    converted, skipped = [], []

    def eligible(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn.split(".")[-1] in HIGH_PRECISION:
            return False
        ok = module.in_features % 16 == 0 and module.out_features % 16 == 0
        (converted if ok else skipped).append(fqn)
        return ok

    convert_to_float8_training(model, module_filter_fn=eligible, config=ao_cfg)
    log.info(
        "fp8 (%s, %s): %d linears converted; kept in high precision: lm_head, embedding, router, "
        "norms, attention core%s",
        cfg.recipe,
        "emulated" if emulate else "hardware kernels",
        len(converted),
        f"; dims not multiples of 16: {skipped}" if skipped else "",
    )
    return converted
