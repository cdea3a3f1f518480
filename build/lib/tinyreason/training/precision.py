"""The `precision` group: the Lightning precision string, and FP8 training of the linears.

fp32           "32-true"
bf16           "bf16-mixed": fp32 master weights, bf16 autocast
fp8            "bf16-mixed" + torchao float8 training, `recipe` = tensorwise | rowwise |
               rowwise_with_gw_hp
fp8_blockwise  "bf16-mixed" + DeepSeek-V3's recipe (`recipe` = blockwise): E4M3 everywhere,
               1x128 activation tiles, 128x128 weight blocks, fp32 accumulation
Under both FP8 options every large GEMM runs in FP8 (attention projections, dense MLPs, shared and
routed experts, MTP projections); embedding, output head, router, norms and the attention core
stay in high precision (DeepSeek-V3 §3.3.1). Details and kernels: `fp8.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

NAMES = ("fp32", "bf16", "fp8", "fp8_blockwise")
LIGHTNING = {
    "fp32": "32-true",
    "bf16": "bf16-mixed",
    "fp8": "bf16-mixed",
    "fp8_blockwise": "bf16-mixed",
}
# torchao's recipes, and DeepSeek-V3's blockwise one (training/fp8.py, which imports torchao: only
# loaded when an FP8 option is chosen, so other runs start without its warnings)
RECIPES = {"fp8": ("tensorwise", "rowwise", "rowwise_with_gw_hp"), "fp8_blockwise": ("blockwise",)}


@dataclass(frozen=True)
class PrecisionConfig:
    name: str = "bf16"
    recipe: str | None = None  # FP8 options only, see RECIPES
    emulate: bool | None = None  # FP8 only; None = emulate unless the device has FP8 kernels

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"precision.name={self.name!r} is not one of {list(NAMES)}")
        allowed = RECIPES.get(self.name, (None,))
        if self.recipe not in allowed:
            raise ValueError(
                f"precision.recipe={self.recipe!r} is not one of {list(allowed)} for "
                f"precision={self.name}"
            )
        if self.emulate not in (None, True, False):
            raise ValueError(f"precision.emulate must be null, true or false, got {self.emulate!r}")

    @property
    def lightning(self) -> str:
        return LIGHTNING[self.name]

    @property
    def is_fp8(self) -> bool:
        return self.name in RECIPES


def apply_precision(model: nn.Module, cfg: PrecisionConfig) -> list[str]:
    """Convert `model` in place for an FP8 option (no-op otherwise); return the FP8 linears."""
    if not cfg.is_fp8:
        return []
    from tinyreason.training import fp8

    kernels = fp8.kernels_available(cfg.recipe)
    emulate = not kernels if cfg.emulate is None else cfg.emulate
    if not emulate and not kernels:
        raise ValueError(
            f"precision.emulate=false needs FP8 kernels for recipe {cfg.recipe!r} (a CUDA GPU "
            "with compute capability >= 8.9, >= 9.0 for blockwise); use emulate=null or true"
        )
    return fp8.convert(model, cfg.recipe, emulate)
