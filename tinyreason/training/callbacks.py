"""Training callbacks: the MoE bias update (aux-loss-free balancing) and throughput."""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.distributed as dist


class MoEBiasUpdate(L.Callback):
    """DeepSeek-V3's aux-loss-free balancing: once per optimizer step, b += γ·sign(mean − load).

    The load is the count of tokens each expert actually received (post-bias, post-group-limit),
    summed by the MoE layers over every micro-batch since the last step and over data-parallel
    ranks here. It runs after `optimizer.step()`, outside forward (arXiv 2412.19437 §2.1.2).
    """

    def __init__(self) -> None:
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # still accumulating gradients
            return
        self._last_step = trainer.global_step
        layers = pl_module.model.moe_layers()
        if not layers:
            return
        gamma = pl_module.model.config.moe.bias_update_speed
        if dist.is_available() and dist.is_initialized():
            counts = torch.stack([m.tokens_per_expert for m in layers])
            dist.all_reduce(counts)
            for m, c in zip(layers, counts, strict=True):
                m.tokens_per_expert.copy_(c)
        stats = {}
        for i, m in enumerate(layers):
            m.update_bias(gamma)
            load = m.last_load
            stats[f"moe/max_vio_{i}"] = (load.max() / load.mean().clamp(min=1) - 1).item()
        stats["moe/max_vio"] = max(stats.values())
        pl_module.log_dict(stats, on_step=True, on_epoch=False)


class Throughput(L.Callback):
    """Tokens per second of each training step (wall clock between consecutive batch ends)."""

    def __init__(self) -> None:
        self._t = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t is not None:
            tokens = batch.shape[0] * (batch.shape[1] - 1) * trainer.world_size
            pl_module.log("perf/tokens_per_s", tokens / (now - self._t), prog_bar=True)
        self._t = now

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t = None  # do not count evaluation time as a training step
