"""Training callbacks: MoE load balancing (aux-loss-free bias update) with its load dashboards,
and throughput."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from tinyreason.model.flops import active_params_per_token, flops_per_token
from tinyreason.model.moe import MoE, load_stats
from tinyreason.training.perf import peak_flops


class Checkpoints(L.pytorch.callbacks.ModelCheckpoint):
    """`best-{step}.ckpt` by the monitored metric, and `last.ckpt` at *every* validation.

    Lightning 2.6's ModelCheckpoint writes `last.ckpt` only when a top-k checkpoint was written at
    the same step, so a validation whose metric did not improve left `last.ckpt` at an older step
    (seen: a 10-step run whose val/bpb rose at step 10 resumed, and started the next stage, from
    step 5). `ckpt_path=last` and `model.init_from=<run dir>` must get the latest state."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class MoEBiasUpdate(L.Callback):
    """DeepSeek-V3's aux-loss-free balancing, once per optimizer step: b += γ·sign(mean − load).

    The load is the count of tokens each expert actually received (post-bias, post-group-limit),
    summed by the MoE layers over every micro-batch of the step (gradient accumulation) and here
    over data-parallel ranks. It runs after `optimizer.step()`, outside forward (arXiv 2412.19437
    §2.1.2); γ comes from `model.moe` (`balance`, `bias_update_speed`, `bias_update_until`).

    Every step it logs per MoE layer (`layer<i>`, `mtp<k>`) the load's MaxVio (max / mean − 1),
    coefficient of variation (std / mean), dead experts (no token) and the bias spread, plus their
    worst / mean over layers. Every `heatmap_every` steps (default: each validation interval) it
    appends the layer × expert load (summed over those steps, divided by its mean) to
    `<run dir>/moe_load.csv` and logs it as a W&B image `moe/load_heatmap`.
    """

    def __init__(self, heatmap_every: int | None = None) -> None:
        self.heatmap_every = heatmap_every
        self._last_step = 0
        self._window: torch.Tensor | None = None  # [L, E] load summed since the last heatmap

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # also right after a resume
        self._window = None
        if self.heatmap_every is None:
            interval = trainer.val_check_interval
            batches = interval if isinstance(interval, int) else trainer.num_training_batches
            self.heatmap_every = max(1, int(batches) // trainer.accumulate_grad_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step yet: still accumulating
            return
        self._last_step = trainer.global_step
        named = moe_layers(pl_module.model)
        if not named or not any(m.tokens_per_expert.any() for m in named.values()):
            return  # no MoE, or a step the divergence guard skipped (its counts dropped)
        # Training progress at the step just taken; 0 when the run has no step budget.
        progress = (trainer.global_step - 1) / trainer.max_steps if trainer.max_steps > 0 else 0.0
        gamma, counts_LE = pl_module.model.update_moe_biases(
            progress,
            lambda t: trainer.strategy.reduce(t, reduce_op="sum"),  # all ranks
        )
        pl_module.log_dict({**self._stats(named), "moe/gamma": gamma}, on_step=True, on_epoch=False)
        window = counts_LE.detach().cpu().double()
        self._window = window if self._window is None else self._window + window
        if trainer.global_step % self.heatmap_every == 0 and trainer.is_global_zero:
            self._heatmap(trainer, list(named), self._window)
            self._window = None

    @staticmethod
    def _stats(named: dict[str, MoE]) -> dict[str, float]:
        stats: dict[str, float] = {}
        per_layer = {name: load_stats(m.last_load) for name, m in named.items()}
        for name, s in per_layer.items():
            bias_E = named[name].gate.e_score_correction_bias
            stats.update({f"moe/{k}_{name}": v for k, v in s.items()})
            stats[f"moe/bias_std_{name}"] = bias_E.std(unbiased=False).item()
            stats[f"moe/bias_range_{name}"] = (bias_E.max() - bias_E.min()).item()
        values = list(per_layer.values())
        stats["moe/max_vio"] = max(s["max_vio"] for s in values)
        stats["moe/cv"] = sum(s["cv"] for s in values) / len(values)
        stats["moe/dead"] = sum(s["dead"] for s in values)
        return stats

    def _heatmap(self, trainer: L.Trainer, names: list[str], load_LE: torch.Tensor) -> None:
        rel_LE = load_LE / load_LE.mean(dim=1, keepdim=True).clamp(min=1e-9)
        path = Path(trainer.default_root_dir) / "moe_load.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "layer", *(f"expert_{e}" for e in range(rel_LE.shape[1]))])
            for name, row in zip(names, rel_LE.tolist(), strict=True):
                writer.writerow([trainer.global_step, name, *(f"{v:.4f}" for v in row)])
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            try:
                image = heatmap_image(
                    rel_LE, names, f"expert load / mean, step {trainer.global_step}"
                )
            except ImportError:  # matplotlib comes with the dev extra
                rank_zero_warn("matplotlib is not installed: no moe/load_heatmap image (CSV only)")
                return
            for lg in wandb_loggers:
                lg.log_image(key="moe/load_heatmap", images=[image], step=trainer.global_step)


def moe_layers(model: torch.nn.Module) -> dict[str, MoE]:
    """MoE FFNs by short name: `layers.3.mlp` -> `layer3`, `mtp.0.block.mlp` -> `mtp0`."""
    named = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            short = name.removesuffix(".mlp").replace(".block", "")
            named[short.replace("layers.", "layer").replace("mtp.", "mtp")] = module
    return named


def heatmap_image(rel_LE: torch.Tensor, names: list[str], title: str):
    """A PIL image of the layer × expert relative load (1 = mean; red over, blue under)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from PIL import Image

    L_, E = rel_LE.shape
    fig = Figure(figsize=(1.5 + 0.45 * E, 1.0 + 0.4 * L_), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(rel_LE.numpy(), cmap="coolwarm", vmin=0.0, vmax=2.0, aspect="auto")
    ax.set(xticks=range(E), yticks=range(L_), yticklabels=names, xlabel="expert", title=title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf)


class Throughput(L.Callback):
    """Tokens per second of each training step (wall clock between consecutive batch ends), and
    MFU: per-device tokens/s x training FLOPs per token (`flops.flops_per_token`, PaLM
    convention) / `peak_flops` in the run's compute dtype (bf16 for bf16 and FP8 runs)."""

    def __init__(self) -> None:
        self._t = None
        self._flops_per_token = 0.0
        self._peak = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._flops_per_token = flops_per_token(pl_module.model, trainer.datamodule.seq_len)
        dtype = (
            torch.float32 if pl_module.precision_config.lightning == "32-true" else torch.bfloat16
        )
        self._peak = peak_flops(pl_module.device, dtype)
        pl_module.print(
            f"MFU against {self._peak / 1e12:.3g} TFLOP/s ({dtype}, {pl_module.device.type}); "
            f"{self._flops_per_token / 1e6:.3g} MFLOP per token"
        )
        model = pl_module.model
        sizes = {  # what a compute-matched comparison (dense vs MoE) reads
            "model/params": float(model.num_params()),
            "model/active_params": float(active_params_per_token(model)),
            "model/flops_per_token": float(self._flops_per_token),
        }
        for logger in trainer.loggers:
            logger.log_metrics(sizes, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t is not None:
            # this device's; a stage whose batch is not windows (grpo: prompt indices) says
            if hasattr(pl_module, "last_step_tokens"):
                tokens = pl_module.last_step_tokens
            else:
                tokens = batch.shape[0] * (batch.shape[1] - 1)
            tokens_per_s = tokens / (now - self._t)
            pl_module.log("perf/tokens_per_s", tokens_per_s * trainer.world_size, prog_bar=True)
            pl_module.log("perf/mfu", tokens_per_s * self._flops_per_token / self._peak)
        self._t = now

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t = None  # do not count evaluation time as a training step
