"""Greedy exact match on held-out problems at every validation: `val/exact_match` beside `val/bpb`.

The problems are fixed for the run (the first `eval.during_training.num_problems` of a held-out
split, balanced over kinds), answered with the batched sampler in fp32 (autocast off, as the
exported weights run), so the curve is comparable across steps and with `tinyreason.evaluate`.
Every rank generates the same problems with the same weights: no collective runs inside, so
DDP ranks cannot deadlock, and each logs the same value.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from tinyreason.evaluation import EvalOptions, Item, evaluate_items


class ExactMatch(L.Callback):
    def __init__(self, items: list[Item], tokenizer, options: EvalOptions) -> None:
        self.items = items
        self.tokenizer = tokenizer
        self.options = options
        self.last: dict | None = None  # the latest report (train() prints it)
        self._start = time.perf_counter()  # wall clock of the run, for exact match vs time

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Step 0 is skipped: an untrained model writes max_new_tokens of noise for every problem
        # (the most expensive evaluation of the run) to score the 0 it scores by construction.
        if trainer.sanity_checking or not self.items or trainer.global_step == 0:
            return
        model = pl_module.model
        was_training = model.training
        with torch.no_grad(), torch.autocast(model.lm_head.weight.device.type, enabled=False):
            report, _ = evaluate_items(model, self.tokenizer, self.items, self.options)
        model.train(was_training)
        self.last = report
        metrics = {"val/exact_match": report["exact_match"]}
        metrics |= {f"val/exact_match_{k}": v for k, v in report["by_kind"].items()}
        metrics["val/no_answer"] = report["no_answer"]
        metrics["time/seconds"] = (
            time.perf_counter() - self._start
        )  # since fit began, evals included
        for name, value in metrics.items():
            pl_module.log(name, value, prog_bar=name == "val/exact_match", sync_dist=False)
