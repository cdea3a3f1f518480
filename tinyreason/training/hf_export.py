"""`export.hf=true`: the final weights (as last.ckpt holds them) written to `<run dir>/hf/`, a
folder `AutoModelForCausalLM.from_pretrained` loads, with the run's tokenizer."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from tinyreason.checkpoints import export_model


class HFExport(L.Callback):
    def __init__(self, tokenizer, out: Path, drop_mtp: bool) -> None:
        self.tokenizer, self.out, self.drop_mtp = tokenizer, out, drop_mtp

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.unsharded_model()  # FSDP2: every rank gathers (a collective)
        if trainer.is_global_zero:  # one writer under DDP / FSDP2
            export_model(model, self.tokenizer, self.out, overwrite=True, drop_mtp=self.drop_mtp)
