"""The `logger` group: CSV metrics in the run dir, plus W&B (offline unless you have a key)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from tinyreason.training.run_config import RunConfig


def build_loggers(run: RunConfig) -> list:
    """CSV for `csv` and `wandb`; a W&B run that continues on resume (its id is kept in the run
    dir), its x-axis the tokens seen, grouped by sweep and named by overrides in a multirun."""
    cfg, run_dir = run.logger, run.run_dir
    loggers = [] if cfg.name == "none" else [CSVLogger(run_dir, name="csv", version="")]
    if cfg.name == "wandb":
        offline = "WANDB_API_KEY" not in os.environ if cfg.offline is None else cfg.offline
        id_file = run_dir / "wandb_id.txt"
        group, name = sweep_names()
        wandb = WandbLogger(
            project=cfg.project,
            save_dir=str(run_dir),
            offline=offline,
            id=id_file.read_text().strip() if id_file.exists() else None,
            resume="allow",
            group=group,
            name=name,
            config=run.composed,
        )
        id_file.write_text(wandb.experiment.id)
        wandb.experiment.define_metric("*", step_metric="tokens")
        loggers.append(wandb)
    return loggers


def finish_wandb(trainer: L.Trainer) -> None:
    """Lightning reuses an active W&B run for the next WandbLogger: finish it, so that every job
    of a multirun (one process) gets its own run."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def sweep_names() -> tuple[str | None, str | None]:
    """In a multirun: (the sweep folder's name, the job's overrides); else (None, None)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    return Path(hc.sweep.dir).name, hc.job.override_dirname or str(hc.job.num)
