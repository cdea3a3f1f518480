"""`python -m tinyreason.train [group=option ...] [key=value ...]` — one run, or a sweep with -m.

`train(cfg)` is the importable function (tests call it); `main` is the Hydra wrapper. The order
is: validate every config section (before any work), build or reuse the tokenizer and the token
shards, build the LightningModule from plain dicts, validate once at step 0, fit, report.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from tinyreason.data import synthetic
from tinyreason.data.datamodule import PretrainDataModule
from tinyreason.data.shards import bytes_per_token, steps_for_bytes
from tinyreason.data.sources import ReasoningCorpus, build_corpus
from tinyreason.evaluate import eval_options, eval_sets, run_evaluation
from tinyreason.evaluation import corpus_items
from tinyreason.export import TOKENIZER_DIR, check_exportable, export_model
from tinyreason.model import ModelConfig
from tinyreason.model.hf import load_weights, read_hf_config
from tinyreason.prepare import packed_window, prepare_data, tokenizer_config
from tinyreason.tokenizers import model_vocab_size, token_byte_lengths
from tinyreason.training.callbacks import MoEBiasUpdate, Throughput
from tinyreason.training.exact_match import ExactMatch
from tinyreason.training.module import LitCausalLM
from tinyreason.training.optim import OptimConfig
from tinyreason.training.precision import PrecisionConfig

log = logging.getLogger(__name__)

LOGGERS = ("wandb", "csv", "none")


def model_dict(cfg: DictConfig, vocab_size: int) -> dict:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("name", None)
    init_from = model.pop("init_from", None)
    if "vocab_size" in model:
        raise ValueError("model.vocab_size is derived from the tokenizer; do not set it")
    if init_from:
        return hf_model_dict(init_from, model, vocab_size, cfg.data.seq_len)
    return {**model, "vocab_size": vocab_size, "max_seq_len": cfg.data.seq_len}


def hf_export_drops_mtp(model: ModelConfig) -> bool:
    """Llama / Qwen3 have no MTP layers: the end-of-run export of a GQA model leaves MTP out."""
    return model.attention.kind == "gqa"


def hf_model_dict(folder: str, group: dict, vocab_size: int, seq_len: int) -> dict:
    """`model.init_from=<HF folder>`: the architecture of its config.json (the vocabulary grows if
    the tokenizer gained our special tokens); training-only knobs (balance loss, bias update speed,
    MTP loss weight) from the model group."""
    model = read_hf_config(folder).to_dict()
    for section, knobs in (
        ("moe", ("balance", "balance_alpha", "bias_update_speed", "bias_update_until")),
        ("mtp", ("loss_weight",)),
    ):
        if model[section] and group.get(section):
            model[section].update({k: group[section][k] for k in knobs if k in group[section]})
    if seq_len > model["max_seq_len"]:
        raise ValueError(
            f"data.seq_len={seq_len} > max_position_embeddings={model['max_seq_len']} of {folder}"
        )
    return {**model, "vocab_size": max(model["vocab_size"], vocab_size)}


def optim_dict(cfg: DictConfig) -> dict:
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim["betas"] = tuple(optim["betas"])
    return {**optim, "total_steps": cfg.trainer.max_steps}


def precision_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.precision, resolve=True)


def validate_config(cfg: DictConfig) -> None:
    """Build every typed config once so bad values fail before data is read or a step runs."""
    build_corpus(cfg.data.name, OmegaConf.to_container(cfg.data.corpus, resolve=True))
    tokenizer_config(cfg)
    packed_window(cfg)
    model = ModelConfig.from_dict(model_dict(cfg, vocab_size=1024))
    if cfg.export.hf:  # fail now, not after training, if transformers has no class for the model
        check_exportable(model, drop_mtp=hf_export_drops_mtp(model))
    OptimConfig(**optim_dict(cfg))
    PrecisionConfig(**precision_dict(cfg))
    if cfg.logger.name not in LOGGERS:
        raise ValueError(f"logger.name={cfg.logger.name!r} is not one of {list(LOGGERS)}")
    t = cfg.trainer
    batches = t.max_steps * t.accumulate_grad_batches
    if batches % t.val_check_interval:
        raise ValueError(
            f"trainer.max_steps x accumulate_grad_batches ({batches}) must be a multiple of "
            f"trainer.val_check_interval ({t.val_check_interval}), so the last step is validated "
            "and checkpointed"
        )
    every = cfg.get("moe_heatmap_every")
    if every is not None and (not isinstance(every, int) or every <= 0):
        raise ValueError(
            f"moe_heatmap_every must be a positive number of steps or null, got {every!r}"
        )
    for key in ("seq_len", "batch_size"):
        if cfg.data[key] <= 0:
            raise ValueError(f"data.{key} must be positive, got {cfg.data[key]}")
    resolve_ckpt(cfg)


def resolve_ckpt(cfg: DictConfig) -> Path | None:
    """`ckpt_path`: null (fresh run), `last` (this run dir's last.ckpt), a run dir, or a file."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        hint = "; to resume a run, pass its folder: hydra.run.dir=<run dir> ckpt_path=last"
    else:
        path = Path(cfg.ckpt_path)
        path = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
        hint = ""
    if not path.is_file():
        raise ValueError(f"ckpt_path={cfg.ckpt_path!r}: no checkpoint at {path}{hint}")
    return path


def apply_byte_budget(cfg: DictConfig, manifest: dict) -> None:
    """`budget.train_bytes`: set trainer.max_steps to read that much training text with this
    run's tokenizer (bytes/token from the shard manifest), with `budget.num_evals` validations."""
    budget = cfg.get("budget")
    if budget is None or budget.train_bytes is None:
        return
    if budget.train_bytes <= 0 or budget.num_evals < 1:
        raise ValueError(f"budget.train_bytes and budget.num_evals must be positive, got {budget}")
    t = cfg.trainer
    world = t.devices if isinstance(t.devices, int) else 1
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * t.accumulate_grad_batches * world
    steps = steps_for_bytes(manifest, budget.train_bytes, tokens_per_step, budget.num_evals)
    t.max_steps = steps
    t.val_check_interval = steps * t.accumulate_grad_batches // budget.num_evals
    log.info(
        "budget of %s training bytes at %.3f bytes/token: %d steps",
        f"{budget.train_bytes:,}",
        bytes_per_token(manifest),
        steps,
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = [] if cfg.logger.name == "none" else [CSVLogger(run_dir, name="csv", version="")]
    if cfg.logger.name == "wandb":
        offline = cfg.logger.offline
        if offline is None:  # offline unless the user has a key
            offline = "WANDB_API_KEY" not in os.environ
        id_file = run_dir / "wandb_id.txt"  # the same W&B run continues on resume
        run_id = id_file.read_text().strip() if id_file.exists() else None
        group, name = _sweep_names()
        wandb = WandbLogger(
            project=cfg.logger.project,
            save_dir=str(run_dir),
            offline=offline,
            id=run_id,
            resume="allow",
            group=group,
            name=name,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        id_file.write_text(wandb.experiment.id)
        wandb.experiment.define_metric("*", step_metric="tokens")  # x-axis: tokens seen
        loggers.append(wandb)
    return loggers


def _finish_wandb(trainer: L.Trainer) -> None:
    # Lightning reuses an active W&B run for the next WandbLogger: finish it so that every job of a
    # multirun (same process) gets its own run.
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def _sweep_names() -> tuple[str | None, str | None]:
    """In a multirun, W&B runs are grouped by sweep and named by their overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    return Path(hc.sweep.dir).name, hc.job.override_dirname or str(hc.job.num)


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    init_from = cfg.model.get("init_from")
    if init_from:  # continue a Hugging Face model: its tokenizer comes from the same folder
        with open_dict(cfg):
            cfg.tokenizer = {"kind": "hf", "path": str(init_from)}
    validate_config(cfg)
    ckpt = resolve_ckpt(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    data = prepare_data(cfg)
    apply_byte_budget(cfg, data.manifest)
    vocab = model_vocab_size(data.tokenizer)
    module = LitCausalLM(
        model_dict(cfg, vocab), optim_dict(cfg), precision_dict(cfg), data.manifest.get("loss_flag")
    )
    module.token_bytes.copy_(token_byte_lengths(data.tokenizer, module.model_config.vocab_size))
    if init_from and ckpt is None:  # a resumed run takes its weights from the checkpoint
        module.configure_model()
        load_weights(module.model, init_from)
    datamodule = PretrainDataModule(
        str(data.shard_root), cfg.data.seq_len, cfg.data.batch_size, cfg.data.num_workers, cfg.seed
    )
    exact_match = exact_match_callback(cfg, data.tokenizer)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-{step}",
        monitor="val/bpb",
        mode="min",
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(
        **trainer_kwargs,
        precision=module.precision_config.lightning,
        default_root_dir=run_dir,
        logger=build_loggers(cfg, run_dir),
        callbacks=[
            checkpoints,
            MoEBiasUpdate(cfg.get("moe_heatmap_every")),
            Throughput(),
            *([exact_match] if exact_match else []),
            *callbacks,
        ],
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        # no_grad, not inference_mode: metric states reset during the step-0 `validate` must
        # stay usable when validation later runs inside `fit`
        inference_mode=False,
    )
    if trainer.is_global_zero:  # what export and generate read; one writer under DDP
        data.tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)
    data_stats = {  # what a vocabulary comparison reads beside val/bpb and perf/tokens_per_s
        "data/bytes_per_token": bytes_per_token(data.manifest),
        "data/vocab_size": float(len(data.tokenizer)),
    }
    for logger in trainer.loggers:
        logger.log_metrics(data_stats, step=0)
    first = None
    if ckpt is None:  # step-0 validation: the reference point of every curve
        first = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/bpb"]
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        seconds = time.perf_counter() - start
        # exact match of the final weights, logged while the W&B run is still open
        final = final_evaluation(cfg, module, data.tokenizer, trainer, run_dir)
        for logger in trainer.loggers:
            if final:
                logger.log_metrics(final, step=trainer.global_step)
    finally:
        _finish_wandb(trainer)
    if cfg.export.hf and trainer.is_global_zero:  # the final weights, as last.ckpt holds them
        export_model(
            module.model,
            data.tokenizer,
            run_dir / "hf",
            overwrite=True,
            drop_mtp=hf_export_drops_mtp(module.model_config),
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["tokens"] = float(module.tokens_seen)
    metrics["fit_seconds"] = seconds
    metrics.update(data_stats)
    if first is not None:
        metrics["val/bpb_first"] = first
    metrics.update(final)
    log.info(
        "done: %d steps, %.0f tokens/s over fit, val/bpb %s -> %.4f%s; run dir %s",
        trainer.global_step,
        metrics["tokens"] / seconds,
        f"{first:.4f}" if first is not None else "(resumed)",
        metrics.get("val/bpb", float("nan")),
        _exact_match_summary(metrics),
        run_dir,
    )
    return metrics


def _eval_corpus(cfg: DictConfig):
    corpus = build_corpus(cfg.data.name, OmegaConf.to_container(cfg.data.corpus, resolve=True))
    return corpus.config if isinstance(corpus, ReasoningCorpus) else None


def exact_match_callback(cfg: DictConfig, tokenizer) -> ExactMatch | None:
    """`eval.during_training.num_problems` held-out problems answered at every validation."""
    during = cfg.eval.during_training
    corpus = _eval_corpus(cfg)
    if corpus is None or not during.num_problems:
        return None
    items = corpus_items(corpus, during.split, during.num_problems)
    return ExactMatch(items, tokenizer, eval_options(cfg.eval))


def final_evaluation(cfg: DictConfig, module, tokenizer, trainer, run_dir: Path) -> dict:
    """`eval.at_end`: exact match of the final weights on `eval.splits` and `eval.files`
    (rank 0 writes eval.json and completions.jsonl to the run dir)."""
    corpus = _eval_corpus(cfg)
    if not cfg.eval.at_end or (corpus is None and not cfg.eval.files):
        return {}
    eval_cfg = cfg.eval if corpus is not None else OmegaConf.merge(cfg.eval, {"splits": []})
    sets = eval_sets(eval_cfg, corpus or synthetic.CorpusConfig())
    model = module.model
    with torch.no_grad(), torch.autocast(model.lm_head.weight.device.type, enabled=False):
        reports = run_evaluation(
            model,
            tokenizer,
            sets,
            eval_options(cfg.eval),
            run_dir if trainer.is_global_zero else None,
        )
    out = {}
    for name, report in reports.items():
        out[f"{name}/exact_match"] = report["exact_match"]
        out |= {f"{name}/exact_match_{k}": v for k, v in report["by_kind"].items()}
        out[f"{name}/no_answer"] = report["no_answer"]
        out |= {f"{name}/{k}": v for k, v in report.get("pass_at_k", {}).items()}
    return out


def _exact_match_summary(metrics: dict) -> str:
    parts = [f"val {metrics['val/exact_match']:.1%}"] if "val/exact_match" in metrics else []
    parts += [
        f"{k.removesuffix('/exact_match')} {v:.1%}"
        for k, v in metrics.items()
        if k.endswith("/exact_match") and not k.startswith("val/")
    ]
    return f", exact match {', '.join(parts)}" if parts else ""


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    logging.getLogger("litdata").setLevel(logging.WARNING)  # one INFO line per dataset otherwise
    metrics = train(cfg)
    return metrics.get("val/bpb")  # the value a sweeper would minimise


def main() -> None:
    # `trainer` and `precision` default to cpu / fp32 in the YAML (a CPU without native bf16 runs
    # bf16 GEMMs ~100x slower than fp32); with CUDA, pick gpu / bf16 unless the user chose.
    if torch.cuda.is_available():
        for group, option in (("trainer", "gpu"), ("precision", "bf16")):
            if not any(a.lstrip("+~").startswith(f"{group}=") for a in sys.argv[1:]):
                sys.argv.append(f"{group}={option}")
    _hydra_main()


if __name__ == "__main__":
    main()
