"""Greedy exact match on held-out problems at every validation (`val/exact_match` beside
`val/bpb`) and on the final weights (`test/exact_match`, `ood/exact_match`).

The problems are fixed for the run (the first `eval.during_training.num_problems` of a held-out
split, balanced over kinds), answered with the batched sampler in fp32 (autocast off, as the
exported weights run), so the curve is comparable across steps and with `tinyreason.evaluate`;
`eval.speculative=true` drafts them with the MTP module (the same completions, and
`val/draft_acceptance`).
Every rank generates the same problems with the same weights: no collective runs inside, so
DDP ranks cannot deadlock, and each logs the same value (under FSDP2 each rank first gathers the
full weights into a plain copy: `LitCausalLM.unsharded_model`).
"""

from __future__ import annotations

import dataclasses
import time

import lightning as L
import torch

from tinyreason.data import synthetic
from tinyreason.evaluation import (
    EvalOptions,
    Item,
    corpus_items,
    eval_sets,
    evaluate_items,
    run_evaluation,
)


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
        model = pl_module.unsharded_model()  # FSDP2: the gathered weights, on every rank
        was_training = model.training
        with torch.no_grad(), torch.autocast(model.lm_head.weight.device.type, enabled=False):
            report, _ = evaluate_items(model, self.tokenizer, self.items, self.options)
        model.train(was_training)
        self.last = report
        metrics = {"val/exact_match": report["exact_match"]}
        metrics |= {f"val/exact_match_{k}": v for k, v in report["by_kind"].items()}
        metrics["val/no_answer"] = report["no_answer"]
        if "speculative" in report:  # eval.speculative: the MTP drafts' acceptance rate
            metrics["val/draft_acceptance"] = report["speculative"]["acceptance_rate"]
        metrics["time/seconds"] = (
            time.perf_counter() - self._start
        )  # since fit began, evals included
        for name, value in metrics.items():
            pl_module.log(name, value, prog_bar=name == "val/exact_match", sync_dist=False)


class FinalEvaluation(L.Callback):
    """`eval.at_end`: exact match of the final weights on `eval.splits` and `eval.files`, logged
    (`test/exact_match`, `ood/exact_match`, ...) while the loggers are open; rank 0 writes
    eval.json and completions.jsonl to the run dir. `metrics` holds the figures for `train()`."""

    def __init__(self, sets: dict[str, list[Item]], tokenizer, options: EvalOptions, out) -> None:
        self.sets, self.tokenizer, self.options, self.out = sets, tokenizer, options, out
        self.metrics: dict[str, float] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.unsharded_model()
        with torch.no_grad(), torch.autocast(model.lm_head.weight.device.type, enabled=False):
            reports = run_evaluation(
                model,
                self.tokenizer,
                self.sets,
                self.options,
                self.out if trainer.is_global_zero else None,
            )
        for name, report in reports.items():
            self.metrics[f"{name}/exact_match"] = report["exact_match"]
            self.metrics |= {f"{name}/exact_match_{k}": v for k, v in report["by_kind"].items()}
            self.metrics[f"{name}/no_answer"] = report["no_answer"]
            self.metrics |= {f"{name}/{k}": v for k, v in report.get("pass_at_k", {}).items()}
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)


def exact_match_callbacks(run, tokenizer) -> list[L.Callback]:
    """ExactMatch at every validation and FinalEvaluation at the end, as `run.eval` asks; on a
    text corpus (no problems) only `eval.files`, at the end."""
    ev, problems = run.eval, run.data.problems
    callbacks: list[L.Callback] = []
    if problems is not None and ev.during_training_problems:
        items = corpus_items(problems, ev.during_training_split, ev.during_training_problems)
        callbacks.append(ExactMatch(items, tokenizer, ev.options))
    if ev.at_end and (problems is not None or ev.files):
        config = ev if problems is not None else dataclasses.replace(ev, splits=())
        sets = eval_sets(config, problems or synthetic.CorpusConfig())
        callbacks.append(FinalEvaluation(sets, tokenizer, ev.options, run.run_dir))
    return callbacks
