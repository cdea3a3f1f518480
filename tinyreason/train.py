"""`python -m tinyreason.train [group=option ...] [key=value ...]` — one run, or a sweep with -m.

`train(cfg)` is the importable function (tests call it); `main` is the Hydra wrapper. A run: type
and check the whole config (`RunConfig`), build the stage's data (tokenizer, shards) and module,
validate once at step 0, fit, report. Exact match of the final weights and the Hugging Face
export are callbacks at the end of fit (`training/exact_match.py`, `training/hf_export.py`).
Checkpoints are written atomically; a run whose loss or gradient norm stays NaN / inf stops with
`TrainingDiverged`, exit status 3 (`training/guard.py`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from tinyreason import errors
from tinyreason.checkpoints import TOKENIZER_DIR
from tinyreason.compose import CONF_DIR
from tinyreason.data.shards import bytes_per_token
from tinyreason.training.callbacks import Checkpoints, MoEBiasUpdate, Throughput
from tinyreason.training.cluster import cluster_plugins
from tinyreason.training.exact_match import FinalEvaluation, exact_match_callbacks
from tinyreason.training.guard import AtomicCheckpointIO, DivergenceGuard, TrainingDiverged
from tinyreason.training.hf_export import HFExport
from tinyreason.training.loggers import build_loggers, finish_wandb
from tinyreason.training.quiet import quiet_start
from tinyreason.training.run_config import RunConfig, exports_without_mtp
from tinyreason.training.strategies import build_strategy

log = logging.getLogger(__name__)


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    run = RunConfig.from_hydra(cfg)  # every bad value fails here, before any work
    run.run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(run.seed, workers=True)
    module_class, datamodule_class = run.stage.classes()
    datamodule = datamodule_class.from_run(run)
    data = datamodule.prepared
    if run.budget.train_bytes is not None:
        run = run.for_manifest(data.manifest)
        log.info(
            "budget of %s training bytes: %d steps",
            f"{run.budget.train_bytes:,}",
            run.trainer.max_steps,
        )
    module = module_class.from_run(run, datamodule)
    end = exact_match_callbacks(run, data.tokenizer)
    if run.export_hf:
        drop_mtp = exports_without_mtp(module.model_config)
        end.append(HFExport(data.tokenizer, run.run_dir / "hf", drop_mtp))
    trainer = build_trainer(run, module, [*end, *callbacks])
    if trainer.is_global_zero:  # what export, generate and evaluate read; one writer under DDP
        data.tokenizer.save_pretrained(run.run_dir / TOKENIZER_DIR)
    data_stats = {  # what a vocabulary comparison reads beside val/bpb and perf/tokens_per_s
        "data/bytes_per_token": bytes_per_token(data.manifest),
        "data/vocab_size": float(len(data.tokenizer)),
    }
    for logger in trainer.loggers:
        logger.log_metrics(data_stats, step=0)
    first = None
    if run.resume is None:  # step-0 validation: the reference point of every curve
        first = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/bpb"]
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=run.resume)
    finally:
        finish_wandb(trainer)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics |= {"tokens": float(module.tokens_seen), "fit_seconds": time.perf_counter() - start}
    metrics |= data_stats | ({"val/bpb_first": first} if first is not None else {})
    for callback in end:
        metrics |= callback.metrics if isinstance(callback, FinalEvaluation) else {}
    log.info(done_line(metrics, trainer.global_step, first, run))
    return metrics


def build_trainer(run: RunConfig, module: L.LightningModule, callbacks: list) -> L.Trainer:
    checkpoints = Checkpoints(
        dirpath=run.run_dir / "checkpoints",
        filename="best-{step}",
        monitor="val/bpb",
        mode="min",
        save_last=True,
        auto_insert_metric_name=False,
    )
    return L.Trainer(
        **run.trainer.lightning_kwargs() | {"strategy": build_strategy(run)},
        precision=module.precision_config.lightning,
        default_root_dir=run.run_dir,
        logger=build_loggers(run),
        callbacks=[
            DivergenceGuard.for_run(run),  # first: it drops a bad step's gradients
            checkpoints,
            MoEBiasUpdate(run.moe_heatmap_every),
            Throughput(),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO(), *cluster_plugins(run.trainer)],  # a submitit job's ranks
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        # no_grad, not inference_mode: metric states reset during the step-0 `validate` must
        # stay usable when validation later runs inside `fit`
        inference_mode=False,
    )


def done_line(metrics: dict, steps: int, first: float | None, run: RunConfig) -> str:
    parts = [f"val {metrics['val/exact_match']:.1%}"] if "val/exact_match" in metrics else []
    parts += [
        f"{k.removesuffix('/exact_match')} {v:.1%}"
        for k, v in metrics.items()
        if k.endswith("/exact_match") and not k.startswith("val/")
    ]
    exact = f", exact match {', '.join(parts)}" if parts else ""
    return (
        f"done: {steps} steps, {metrics['tokens'] / metrics['fit_seconds']:.0f} tokens/s over fit, "
        f"val/bpb {f'{first:.4f}' if first is not None else '(resumed)'} -> "
        f"{metrics.get('val/bpb', float('nan')):.4f}{exact}; run dir {run.run_dir}"
    )


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
@errors.reported
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_start()  # again: a joblib / submitit job runs in a process of its own
    try:
        metrics = train(cfg)
    except TrainingDiverged as err:  # the run stopped itself: its own status, no traceback
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(err.exit_code) from None
    return metrics.get("val/bpb")  # the value a sweeper would minimise


def main() -> None:
    # `trainer` and `precision` default to cpu / fp32 in the YAML (a CPU without native bf16 runs
    # bf16 GEMMs ~100x slower than fp32); with CUDA, pick gpu / bf16 unless the user chose (an
    # experiment pins its precision: a command-line bf16 would override it).
    if torch.cuda.is_available():
        chosen = [a.lstrip("+~").split("=")[0] for a in sys.argv[1:]]
        if "trainer" not in chosen:
            sys.argv.append("trainer=gpu")
        if "precision" not in chosen and "experiment" not in chosen:
            sys.argv.append("precision=bf16")
    quiet_start()
    errors.run(_hydra_main)  # user errors: one line and exit 2 (tinyreason.errors)


if __name__ == "__main__":
    main()
