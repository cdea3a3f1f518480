"""What keeps a run's state on disk good: the divergence guard and the atomic checkpoint writer.

`DivergenceGuard`: a step whose loss or gradient norm is not finite is skipped (its gradients
and MoE routing counts dropped before the optimizer runs: no weight, AdamW moment or step count
changes; its batch and learning-rate slot are spent), up to `guard.max_bad_steps` in a row; one
more stops the run with `TrainingDiverged` (the entry point exits with status 3). Under DDP the
ranks all-reduce the verdict, so they skip or stop together. A checkpoint whose weights are not
finite is never written; stopping runs no `on_train_end`, so nothing is exported or evaluated:
`last.ckpt` and `hf/` keep the last good state.

`AtomicCheckpointIO`: Lightning writes and reads checkpoints through `checkpoints.write_atomic`
(temp file, fsync, rename) and `checkpoints.read_checkpoint` (a damaged file named as such).
Tests inject faults into the write of `last.ckpt` at one step with `TINYREASON_FAULT`:
`hold:<step>` writes half the bytes and sleeps (a SIGKILL lands mid-write), `enospc:<step>`
writes half and fails as a full disk would.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor

from tinyreason.checkpoints import read_checkpoint, write_atomic
from tinyreason.model.moe import MoE
from tinyreason.training.parallel import grad_norm

log = logging.getLogger(__name__)

FAULT_ENV = "TINYREASON_FAULT"


class TrainingDiverged(RuntimeError):
    """The run stopped itself: the loss or gradient norm stayed non-finite, or the weights are."""

    exit_code = 3


def non_finite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state_dict.items()}
    return [k for k, v in local.items() if v.is_floating_point() and not torch.isfinite(v).all()]


class DivergenceGuard(L.Callback):
    def __init__(self, max_bad_steps: int, advice: str) -> None:
        self.max_bad_steps, self.advice = max_bad_steps, advice
        self.in_a_row = 0  # non-finite steps in a row, skipped
        self._losses: list[torch.Tensor] = []  # this step's micro-batch losses
        self._saved_step: int | None = None

    @classmethod
    def for_run(cls, run) -> DivergenceGuard:
        clip, precision = run.trainer.gradient_clip_val, run.precision.name
        options = [
            f"a lower optim.lr (now {run.optim.lr:g})",
            f"a lower trainer.gradient_clip_val (now {clip})"
            if clip
            else "gradient clipping (trainer.gradient_clip_val=1.0, now off)",
        ]
        if precision != "fp32":
            options.append(f"precision=fp32 (now {precision})")
        return cls(run.guard.max_bad_steps, f"Try {', '.join(options[:-1])} or {options[-1]}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step if trainer.ckpt_path else None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        zero = torch.zeros((), device=pl_module.device)
        norm = grad_norm(pl_module.parameters())  # plain, FSDP2 or expert-parallel gradients
        norm = zero if norm is None else norm.to(zero.device)
        loss = torch.stack(self._losses).mean().to(zero.device) if self._losses else zero
        self._losses = []
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        if trainer.strategy.reduce(bad.float(), reduce_op="sum").item() == 0:
            self.in_a_row = 0
            return
        step, self.in_a_row = trainer.global_step, self.in_a_row + 1
        what = f"step {step}: the loss is {loss.item():.4g} and the gradient norm {norm.item():.4g}"
        if self.in_a_row > self.max_bad_steps:
            raise TrainingDiverged(
                f"{what}, {self.in_a_row} non-finite steps in a row (more than guard."
                f"max_bad_steps={self.max_bad_steps}): the run stops; {self._kept(trainer)}"
            )
        for p in pl_module.parameters():  # AdamW leaves a parameter without a gradient alone
            p.grad = None
        for m in pl_module.modules():  # nor do the MoE router biases move for this step
            if isinstance(m, MoE):
                m.tokens_per_expert.zero_()
        rank_zero_warn(
            f"{what}: step skipped, no update ({self.in_a_row} of guard.max_bad_steps="
            f"{self.max_bad_steps} in a row)"
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = non_finite(checkpoint["state_dict"])  # this rank's shards under FSDP2 ..
        count = torch.tensor(float(len(bad)), device=pl_module.device)
        any_bad = trainer.strategy.reduce(count, reduce_op="sum")
        if any_bad.item():  # .. all ranks stop together
            names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") or "on another rank"
            raise TrainingDiverged(
                f"step {trainer.global_step}: the weights hold non-finite values ({names}), so no "
                f"checkpoint is written: the run stops; {self._kept(trainer)}"
            )
        self._saved_step = trainer.global_step

    def _kept(self, trainer: L.Trainer) -> str:
        """Where the last good state is, and what to try (the message's second line)."""
        last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        if self._saved_step is None or not last:
            return f"no checkpoint was written before it.\n{self.advice}, and start again."
        return (
            f"{last} (step {self._saved_step}) keeps the last good weights.\n{self.advice}, "
            "then resume with ckpt_path=last."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fault = _fault(path, checkpoint.get("global_step"))
        if fault is None:
            write_atomic(path, lambda f: torch.save(checkpoint, f))
        else:
            write_atomic(path, lambda f: _faulty_write(checkpoint, f, fault, path))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(Path(path))


def _fault(path: Path, step: int | None) -> str | None:
    kind, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    hit = kind in ("hold", "enospc") and at.isdigit() and int(at) == step
    return kind if hit and path.name == "last.ckpt" else None


def _faulty_write(checkpoint: dict, f, fault: str, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    if fault == "hold":  # the test SIGKILLs the process now; a stray one ends in 10 minutes
        log.warning("%s=hold: %s half written, holding", FAULT_ENV, path)
        time.sleep(600)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
