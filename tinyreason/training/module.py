"""LitCausalLM: the LightningModule around `tinyreason.model.CausalLM`.

It takes plain dicts (saved as hyper-parameters, so `load_from_checkpoint` rebuilds the model on
its own), builds the model in `configure_model`, and logs losses, BPB, perplexity, lr, grad norm
and tokens seen (the x-axis of every dashboard).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from tinyreason.checkpoints import load_init_weights
from tinyreason.data.packing import document_masks, split_flags
from tinyreason.model import CausalLM, ModelConfig, init_weights
from tinyreason.model.transformer import IGNORE_INDEX
from tinyreason.tokenizer import model_vocab_size, token_byte_lengths
from tinyreason.training.metrics import BitsPerByte
from tinyreason.training.optim import OptimConfig, build_optimizer
from tinyreason.training.parallel import clip_grad_norm_, grad_norm, shard_model
from tinyreason.training.precision import PrecisionConfig, apply_precision


class LitCausalLM(L.LightningModule):
    def __init__(
        self,
        model: dict,
        optim: dict,
        precision: dict | None = None,
        loss_flag: int | None = None,
        bos_id: int | None = None,
    ) -> None:
        super().__init__()
        # data.loss_on=assistant: the shards flag supervised tokens by adding this bit (packing.py)
        self.loss_flag = loss_flag
        # set: each conversation packed into a window attends only to itself, its positions
        # counted from its bos, as when it is answered alone (`packing.document_masks`)
        self.bos_id = bos_id
        self.save_hyperparameters()
        self.model_config = ModelConfig.from_dict(model)
        betas = {"betas": tuple(optim["betas"])} if "betas" in optim else {}
        self.optim_config = OptimConfig(**{**optim, **betas})
        self.precision_config = PrecisionConfig(**(precision or {}))
        self.model: CausalLM | None = None
        # UTF-8 bytes of each token id, for BPB; saved with the checkpoint, filled by `train`.
        self.register_buffer(
            "token_bytes", torch.zeros(self.model_config.vocab_size, dtype=torch.int32)
        )
        self.val_bpb = BitsPerByte()
        self.val_ppl = Perplexity(ignore_index=-100)
        self.run_config: dict | None = None  # the composed config, stored in every checkpoint
        # trainer.* (TrainerConfig): strategy, expert_parallel, loss_chunk_size, activation
        # checkpointing, compile; None outside a run (a bare module trains as on one device)
        self.scaling = None
        self._prepared = False  # configure_model has applied `scaling` (once, under the Trainer)
        self._unsharded: tuple[int, CausalLM] | None = None  # (step, full-weight copy) under FSDP2

    @classmethod
    def from_run(cls, run, datamodule, **extra) -> LitCausalLM:
        """The pretraining stage's module for a `RunConfig` and its prepared data: the model
        sized to the tokenizer, BPB's byte table, a Hugging Face start's weights."""
        data = datamodule.prepared
        model = run.model_for(model_vocab_size(data.tokenizer))
        optim = dataclasses.asdict(run.optim)
        if cls.masks_documents and data.manifest.get("loss_flag") is not None:
            extra.setdefault("bos_id", data.tokenizer.bos_token_id)
        module = cls(
            model.to_dict(),
            optim,
            dataclasses.asdict(run.precision),
            data.manifest.get("loss_flag"),
            **extra,
        )
        module.token_bytes.copy_(token_byte_lengths(data.tokenizer, model.vocab_size))
        module.run_config = run.composed
        module.scaling = run.trainer
        if run.init_from is not None and run.resume is None:  # a resume has its own weights
            module.configure_model()
            load_init_weights(module.model, run.init_from)
        return module

    # packed conversations (data.loss_on=assistant) are masked from one another; DPO's windows
    # hold one conversation each
    masks_documents = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["run_config"] = self.run_config

    @property
    def sharded(self) -> bool:
        """trainer.strategy=fsdp: the model's weights are FSDP2 / expert-parallel DTensor shards."""
        return self.scaling is not None and self.scaling.strategy == "fsdp"

    def configure_model(self) -> None:
        """Build the model (on the meta device under FSDP2), then, once a Trainer runs it, the
        run's memory and parallelism options: chunked loss, activation checkpointing, compile,
        FSDP2 / expert-parallel sharding and the meta-device weights' init (`training/parallel.py`).
        `from_run` calls it without a Trainer, to load `model.init_from` weights into the whole
        model first."""
        if self.model is None:
            with (
                torch.device("meta")
                if self.sharded and self._trainer is not None
                else nullcontext()
            ):
                self.model = CausalLM(self.model_config)
            apply_precision(self.model, self.precision_config)  # FP8 options convert the GEMMs
        if self._trainer is None or self._prepared or self.scaling is None:
            return
        s, self._prepared = self.scaling, True
        self.model.loss_chunk_size = s.chunk_size_for(self.model_config.vocab_size)
        if s.activation_checkpointing != "none" or s.compile:
            from tinyreason.training.memory import apply as apply_memory_options

            apply_memory_options(self.model, s.activation_checkpointing, s.compile)
        if self.sharded:
            meta = any(p.is_meta for p in self.model.parameters())
            bf16 = self.precision_config.name == "bf16"
            shard_model(self.model, self.device_mesh["data_parallel"], bf16, s.expert_parallel)
            if meta:  # every full tensor drawn as an eager build draws it, each rank its shard
                self.model.to_empty(device=self.trainer.strategy.root_device)
                init_weights(self.model)

    def unsharded_model(self) -> CausalLM:
        """The model with its full weights on this rank, for generation and export: the model
        itself, or under FSDP2 a plain copy with the gathered weights (a collective: every rank
        calls it at the same point; cached for the step)."""
        if not self.sharded:
            return self.model
        step = self.global_step
        if self._unsharded is None or self._unsharded[0] != step:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            with torch.device("meta"):
                copy = CausalLM(self.model_config)
            copy.load_state_dict(full, assign=True)
            self._unsharded = (step, copy.eval())
        return self._unsharded[1]

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Under FSDP2 / expert parallelism the norm spans every rank and every kind of shard
        (`parallel.clip_grad_norm_`); otherwise Lightning's clipping."""
        if self.sharded and gradient_clip_val:
            clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def tokens_seen(self) -> int:
        return self.global_step * self._tokens_per_step

    @property
    def _tokens_per_step(self) -> int:
        trainer = self.trainer
        batch = trainer.datamodule.batch_size * trainer.datamodule.seq_len
        return batch * trainer.world_size * trainer.accumulate_grad_batches

    def _inputs_targets(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window [B, S+1] -> inputs [B, S], targets [B, S] (IGNORE_INDEX where not supervised)."""
        ids, supervised = split_flags(batch, self.loss_flag)
        targets = ids[:, 1:]
        if supervised is not None:
            targets = targets.masked_fill(~supervised[:, 1:], IGNORE_INDEX)
        return ids[:, :-1], targets

    def _forward(self, batch: torch.Tensor):
        """(model output with losses, targets) of a batch of windows."""
        inputs, targets = self._inputs_targets(batch)
        if self.bos_id is None:
            return self.model(inputs, targets), targets
        positions, mask = document_masks(inputs, self.bos_id)
        return self.model(inputs, targets, position_ids=positions, attn_mask=mask), targets

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out, _ = self._forward(batch)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({"train/ce": out.ce, "train/mtp": out.mtp, "train/balance": out.balance})
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        self.log("tokens", float(self.tokens_seen + self._tokens_per_step))
        return out.loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out, targets = self._forward(batch)
        self._update_val(out.logits, targets, out.ce)

    def _update_val(self, logits: torch.Tensor, targets: torch.Tensor, ce: torch.Tensor) -> None:
        """BPB and perplexity of the supervised targets; val/loss."""
        logits = logits.float()
        nats = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX
        )
        counted = targets != IGNORE_INDEX  # ignored targets count no bytes
        token_bytes = torch.where(counted, self.token_bytes[targets.clamp(min=0)], 0)
        self.val_bpb.update(nats, token_bytes.flatten())
        self.val_ppl.update(logits, targets)
        self.log("val/loss", ce, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/bpb", self.val_bpb.compute(), prog_bar=True)
        self.log("val/ppl", self.val_ppl.compute())
        self.log("tokens", float(self.tokens_seen))
        self.val_bpb.reset()
        self.val_ppl.reset()

    def on_before_optimizer_step(self, optimizer) -> None:
        norm = grad_norm(self.parameters())  # every rank: a collective under FSDP2
        if norm is not None:  # None: the divergence guard dropped this step's gradients (it warns)
            self.log("grad_norm", norm)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.optim_config)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
