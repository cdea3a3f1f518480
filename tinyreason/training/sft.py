"""`stage=sft`: supervised fine-tuning on conversations, loss on the assistant tokens only.

The model, Trainer, precision, MoE bias update, loggers, checkpoints and export are pretraining's;
what differs: a run needs packed conversations, which attend only to themselves (per-conversation
positions and a block-diagonal causal mask from the bos tokens, as in pretraining with
data.loss_on=assistant), so a packed window's loss equals the loss of its conversations run one by
one, and a batch without a supervised token is skipped (all ranks
decide together), never a NaN.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from tinyreason.model.transformer import IGNORE_INDEX
from tinyreason.training.module import LitCausalLM


class SFTModule(LitCausalLM):
    def __init__(
        self,
        model: dict,
        optim: dict,
        precision: dict | None = None,
        loss_flag: int | None = None,
        bos_id: int | None = None,
    ) -> None:
        if loss_flag is None or bos_id is None:
            raise ValueError("stage=sft needs packed conversations (a loss flag) and a bos id")
        super().__init__(model, optim, precision, loss_flag, bos_id)

    @classmethod
    def from_run(cls, run, datamodule, **extra) -> SFTModule:
        extra.setdefault("bos_id", datamodule.prepared.tokenizer.bos_token_id)
        return super().from_run(run, datamodule, **extra)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        _, targets = self._inputs_targets(batch)
        supervised = (targets != IGNORE_INDEX).sum().float()
        total = self.trainer.strategy.reduce(supervised, reduce_op="sum")  # every rank agrees
        if total == 0:
            rank_zero_warn(f"step {self.global_step}: a batch without supervised tokens, skipped")
            return None
        self.log("train/supervised_tokens", supervised)
        return super().training_step(batch, batch_idx)
