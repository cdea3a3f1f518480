"""The run config: the composed Hydra config, typed and checked in one pass before any work.

`RunConfig.from_hydra(cfg)` builds every section's dataclass (model, data, tokenizer, optim,
precision, trainer, guard, logger, budget, eval, stage, checkpoint); a bad value fails here with
a message naming the key, before a tokenizer is trained or a shard written; a resume, against the
run config in its checkpoint first (`training/resume.py`). Nothing edits the Hydra config: what
differs from it (a byte budget's step count, the vocabulary of the tokenizer, a Hugging Face
model's architecture) is derived here from the config itself, so the saved
`.hydra/config.yaml` (and the copy in every checkpoint, `composed`) reproduces the run.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from tinyreason.checkpoints import (
    TOKENIZER_DIR,
    check_exportable,
    checkpoint_file,
    checkpoint_model_config,
    resolve_resume,
    run_dir_of,
)
from tinyreason.data import packing, synthetic
from tinyreason.data.shards import steps_for_bytes
from tinyreason.data.sources import Corpus, ReasoningCorpus, build_corpus, dataclass_from_dict
from tinyreason.errors import UserError
from tinyreason.evaluation import EvalConfig
from tinyreason.model import ModelConfig
from tinyreason.model.hf import is_hf_folder, read_hf_config
from tinyreason.tokenizer import TokenizerConfig
from tinyreason.training.optim import OptimConfig
from tinyreason.training.parallel import check_strategy
from tinyreason.training.precision import PrecisionConfig
from tinyreason.training.resume import check_resume

LOGGERS = ("wandb", "csv", "none")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
LIGHTNING_TRAINER_KEYS = {  # TrainerConfig fields passed to lightning.Trainer as they are
    "accelerator", "devices", "strategy", "max_steps", "val_check_interval", "limit_val_batches",
    "gradient_clip_val", "accumulate_grad_batches", "log_every_n_steps", "enable_progress_bar",
    "deterministic", "num_nodes",
}  # fmt: skip
AUTO_CHUNK_VOCAB = 32_768  # trainer.loss_chunk_size=auto chunks the head from this vocabulary on
AUTO_CHUNK_TOKENS = 512  # .. in chunks of this many tokens (bench ce: 0.27x peak at 151,936)
# training-only knobs a Hugging Face start (`model.init_from`) takes from the model group
_HF_TRAINING_KNOBS = {
    "moe": ("balance", "balance_alpha", "bias_update_speed", "bias_update_until"),
    "mtp": ("loss_weight",),
}
MODEL_TRAINING_KEYS = tuple(f"model.{s}.{k}" for s, ks in _HF_TRAINING_KNOBS.items() for k in ks)


@dataclass(frozen=True)
class DataConfig:
    name: str
    corpus: Corpus
    loss_on: str = "all"  # assistant: whole conversations per window, loss on assistant turns
    seq_len: int = 512
    batch_size: int = 8
    num_workers: int = 0
    rebuild_damaged: bool = False  # a damaged shard cache is rebuilt instead of stopping the run

    def __post_init__(self) -> None:
        if not isinstance(self.rebuild_damaged, bool):
            raise ValueError(
                f"data.rebuild_damaged must be true or false, got {self.rebuild_damaged!r}"
            )
        if self.loss_on not in packing.LOSS_ON:
            raise ValueError(f"data.loss_on={self.loss_on!r} is not one of {list(packing.LOSS_ON)}")
        if self.loss_on == "assistant" and not isinstance(self.corpus, ReasoningCorpus):
            raise ValueError(
                f"data.loss_on=assistant needs conversations (data=reasoning); data={self.name} "
                "is plain text: use data.loss_on=all"
            )
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be positive, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(
                f"data.num_workers must be >= 0 (0: load in the main process), got {self.num_workers}"
            )

    @property
    def window(self) -> int | None:
        """Packed windows of seq_len + 1 tokens (loss_on=assistant), or None: the token stream."""
        return self.seq_len + 1 if self.loss_on == "assistant" else None

    @property
    def problems(self) -> synthetic.CorpusConfig | None:
        """The embedded corpus' config, whose held-out problems exact match answers."""
        return self.corpus.config if isinstance(self.corpus, ReasoningCorpus) else None

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        d = dict(d)
        d.pop("paths", None)  # text_files: the `corpus.paths` it interpolates into
        name, corpus = d.pop("name"), d.pop("corpus")
        return dataclass_from_dict(
            cls, {"name": name, "corpus": build_corpus(name, corpus), **d}, "data"
        )


@dataclass(frozen=True)
class TrainerConfig:
    """Keyword arguments of `lightning.Trainer` (precision comes from the precision group)."""

    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    max_steps: int = 400
    val_check_interval: int = 100  # in training batches
    limit_val_batches: int | float = 16
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False
    num_nodes: int = 1
    # Ours, not Lightning's (`lightning_kwargs` leaves them out); training-only, like the rest of
    # `trainer.*`: a resume may change them (README "Scaling out").
    expert_parallel: int = 1  # ranks the routed experts are split over (strategy=fsdp)
    deepspeed_stage: int = 2  # strategy=deepspeed: ZeRO stage 2 or 3
    loss_chunk_size: int | str = "auto"  # tokens per chunk of the output head + CE; 0 = off
    activation_checkpointing: str = "none"  # none | full | selective (per block)
    compile: bool = False  # torch.compile each block

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(
                f"trainer.strategy={self.strategy!r} is not one of {list(STRATEGIES)} "
                "(fsdp: FSDP2 through Lightning's ModelParallelStrategy)"
            )
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise UserError(
                f"trainer.activation_checkpointing={self.activation_checkpointing!r} is not one "
                f"of {list(ACTIVATION_CHECKPOINTING)}"
            )
        chunk = self.loss_chunk_size
        if chunk != "auto" and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
            raise UserError(
                f"trainer.loss_chunk_size must be auto, 0 (off) or a positive number of tokens, "
                f"got {chunk!r}"
            )
        for key in ("expert_parallel", "num_nodes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"trainer.{key} must be a whole number >= 1, got {value!r}")
        if self.deepspeed_stage not in (2, 3):
            raise UserError(f"trainer.deepspeed_stage must be 2 or 3, got {self.deepspeed_stage!r}")
        if self.max_steps <= 0 or self.accumulate_grad_batches <= 0 or self.val_check_interval <= 0:
            raise ValueError(
                "trainer.max_steps, accumulate_grad_batches and val_check_interval must be "
                f"positive, got {self.max_steps}, {self.accumulate_grad_batches}, "
                f"{self.val_check_interval}"
            )
        if self.devices != "auto" and (isinstance(self.devices, str) or self.devices <= 0):
            raise ValueError(
                f"trainer.devices must be a positive number or auto, got {self.devices!r}"
            )
        if self.limit_val_batches <= 0 or self.log_every_n_steps <= 0:
            raise ValueError(
                "trainer.limit_val_batches (a count, or a share in (0, 1]) and log_every_n_steps "
                f"must be positive, got {self.limit_val_batches}, {self.log_every_n_steps}"
            )
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(
                f"trainer.gradient_clip_val must be positive or null (no clipping), got "
                f"{self.gradient_clip_val}"
            )
        batches = self.max_steps * self.accumulate_grad_batches
        if batches % self.val_check_interval:
            raise ValueError(
                f"trainer.max_steps x accumulate_grad_batches ({batches}) must be a multiple of "
                f"trainer.val_check_interval ({self.val_check_interval}), so the last step is "
                "validated and checkpointed"
            )

    @property
    def world_size(self) -> int:
        return (self.devices if isinstance(self.devices, int) else 1) * self.num_nodes

    def lightning_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `lightning.Trainer` (the strategy is built by the caller)."""
        ours = {f.name for f in dataclasses.fields(self)} - LIGHTNING_TRAINER_KEYS
        return {k: v for k, v in vars(self).items() if k not in ours}

    def chunk_size_for(self, vocab_size: int) -> int | None:
        """Tokens per chunk of the chunked head + cross-entropy, or None (full logits):
        `auto` chunks from AUTO_CHUNK_VOCAB tokens of vocabulary on."""
        if self.loss_chunk_size == "auto":
            return AUTO_CHUNK_TOKENS if vocab_size >= AUTO_CHUNK_VOCAB else None
        return self.loss_chunk_size or None


@dataclass(frozen=True)
class GuardConfig:
    """The divergence guard (`training/guard.py`)."""

    max_bad_steps: int = 3  # non-finite steps skipped in a row; one more stops the run (exit 3)

    def __post_init__(self) -> None:
        n = self.max_bad_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise UserError(
                "guard.max_bad_steps must be a whole number >= 0 (0: stop at the first "
                f"non-finite loss or gradient norm), got {n!r}"
            )


@dataclass(frozen=True)
class BudgetConfig:
    """A fixed budget of training text (vocabulary comparisons): `train_bytes` sets the steps from
    the shards' bytes/token, with `num_evals` validations spread evenly over the run."""

    train_bytes: int | None = None
    num_evals: int = 4

    def __post_init__(self) -> None:
        if self.train_bytes is not None and (self.train_bytes <= 0 or self.num_evals < 1):
            raise ValueError(
                "budget.train_bytes and budget.num_evals must be positive, got "
                f"{self.train_bytes}, {self.num_evals}"
            )


@dataclass(frozen=True)
class LoggerConfig:
    name: str = "wandb"  # wandb (+ csv) | csv | none
    project: str = "tinyreason"
    offline: bool | None = None  # wandb: None = offline unless WANDB_API_KEY is set

    def __post_init__(self) -> None:
        if self.name not in LOGGERS:
            raise ValueError(f"logger.name={self.name!r} is not one of {list(LOGGERS)}")


@dataclass(frozen=True)
class StageConfig:
    """`stage`: which LightningModule and LightningDataModule a run builds (import paths); each
    class has `from_run(run, ...)`. A new stage is a new module pair and a YAML, not a branch."""

    name: str = "pretrain"
    module: str = "tinyreason.training.module.LitCausalLM"
    datamodule: str = "tinyreason.data.datamodule.PretrainDataModule"
    options: str | None = None  # the dataclass of the stage's own keys (`<name>.*`), if any

    def classes(self) -> tuple[type, type]:
        return _import(self.module, "stage.module"), _import(self.datamodule, "stage.datamodule")

    def typed_options(self, values: dict | None) -> Any:
        """The `<stage name>.*` section as the stage's options dataclass (None without one)."""
        if self.options is None:
            return None
        return dataclass_from_dict(_import(self.options, "stage.options"), values or {}, self.name)


def _import(path: str, key: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{key}={path!r} is not an importable class ({err})") from err


@dataclass(frozen=True)
class RunConfig:
    stage: StageConfig
    stage_options: Any  # the stage's typed `<stage>.*` keys (StageConfig.options), or None
    model: ModelConfig  # vocab_size None until the tokenizer is known: `model_for(vocab)`
    init_from: Path | None  # an HF folder or a checkpoint whose weights the run starts from
    data: DataConfig
    tokenizer: TokenizerConfig
    optim: OptimConfig
    precision: PrecisionConfig
    trainer: TrainerConfig
    guard: GuardConfig
    logger: LoggerConfig
    budget: BudgetConfig
    eval: EvalConfig
    export_hf: bool
    moe_heatmap_every: int | None
    seed: int
    resume: Path | None  # the checkpoint `ckpt_path` names
    run_dir: Path
    cache_dir: Path
    composed: dict[str, Any] = field(compare=False, repr=False)  # the resolved Hydra config

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> RunConfig:
        try:
            c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:  # a `???` in a YAML the command left unset
            raise ValueError(f"{err.full_key} has no value: pass {err.full_key}=<value>") from err
        c.pop("hydra", None)
        resume = resolve_resume(c["ckpt_path"], c["run_dir"])
        if resume is not None:  # before any other work: a damaged file or another run stops here
            check_resume(resume, c, MODEL_TRAINING_KEYS)
        trainer = dataclass_from_dict(TrainerConfig, c["trainer"], "trainer")
        data = DataConfig.from_dict(c["data"])
        model, init_from, tokenizer = _model_and_tokenizer(c["model"], c["tokenizer"], data)
        if c["export"]["hf"]:  # fail now, not after training, if transformers has no class
            check_exportable(model, drop_mtp=exports_without_mtp(model))
        every = c.get("moe_heatmap_every")
        if every is not None and (not isinstance(every, int) or every <= 0):
            raise ValueError(
                f"moe_heatmap_every must be a positive number of steps or null, got {every!r}"
            )
        optim = {**c["optim"], "betas": tuple(c["optim"]["betas"])}
        stage = dataclass_from_dict(StageConfig, c.get("stage") or {}, "stage")
        run = cls(
            stage=stage,
            stage_options=stage.typed_options(c.get(stage.name)),
            model=model,
            init_from=init_from,
            data=data,
            tokenizer=tokenizer,
            optim=dataclass_from_dict(
                OptimConfig, {**optim, "total_steps": trainer.max_steps}, "optim"
            ),
            precision=dataclass_from_dict(PrecisionConfig, c["precision"], "precision"),
            trainer=trainer,
            guard=dataclass_from_dict(GuardConfig, c.get("guard") or {}, "guard"),
            logger=dataclass_from_dict(LoggerConfig, c["logger"], "logger"),
            budget=dataclass_from_dict(BudgetConfig, c.get("budget") or {}, "budget"),
            eval=EvalConfig.from_dict(c["eval"], model),
            export_hf=bool(c["export"]["hf"]),
            moe_heatmap_every=every,
            seed=_seed(c["seed"]),
            resume=resume,
            run_dir=Path(c["run_dir"]),
            cache_dir=Path(c["cache_dir"]),
            composed=c,
        )
        check_strategy(run)  # fsdp / deepspeed / expert parallelism with what they support
        return run

    @property
    def tokens_per_step(self) -> int:
        t = self.trainer
        return self.data.batch_size * self.data.seq_len * t.accumulate_grad_batches * t.world_size

    def model_for(self, vocab_size: int) -> ModelConfig:
        """The model with the tokenizer's (padded) vocabulary; a Hugging Face start keeps its own
        rows when it has more."""
        return self.model.with_vocab(max(self.model.vocab_size or 0, vocab_size))

    def for_manifest(self, manifest: dict) -> RunConfig:
        """With `budget.train_bytes`: the same run for the steps that read that much training
        text at this tokenizer's bytes/token (shard manifest), `budget.num_evals` validations."""
        b, t = self.budget, self.trainer
        if b.train_bytes is None:
            return self
        steps = steps_for_bytes(manifest, b.train_bytes, self.tokens_per_step, b.num_evals)
        trainer = dataclasses.replace(
            t, max_steps=steps, val_check_interval=steps * t.accumulate_grad_batches // b.num_evals
        )
        optim = dataclasses.replace(self.optim, total_steps=steps)
        return dataclasses.replace(self, trainer=trainer, optim=optim)


def _seed(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"seed must be an int, got {type(value).__name__} {value!r}")
    return value


def exports_without_mtp(model: ModelConfig) -> bool:
    """Llama / Qwen3 have no MTP layers: the end-of-run export of a GQA model leaves MTP out."""
    return model.attention.kind == "gqa"


def _model_and_tokenizer(
    group: dict, tokenizer: dict, data: DataConfig
) -> tuple[ModelConfig, Path | None, TokenizerConfig]:
    """The model group (vocabulary from the tokenizer), or with `model.init_from` the
    architecture and tokenizer of a Hugging Face folder or of a run (its run dir or a `.ckpt`:
    last.ckpt's model, `<run dir>/tokenizer/`), with the group's training-only knobs."""
    group = dict(group)
    group.pop("name", None)
    init_from = group.pop("init_from", None)
    if "vocab_size" in group:
        raise ValueError("model.vocab_size is derived from the tokenizer; do not set it")
    if not init_from:
        model = ModelConfig.from_dict({**group, "vocab_size": None, "max_seq_len": data.seq_len})
        return model, None, dataclass_from_dict(TokenizerConfig, tokenizer, "tokenizer")
    source = Path(init_from)
    if is_hf_folder(source):
        model, tok_dir = read_hf_config(source).to_dict(), source
    else:
        try:
            source = checkpoint_file(source)
        except ValueError as err:
            raise ValueError(
                f"model.init_from={init_from}: neither a Hugging Face folder (config.json) nor a "
                f"run dir / .ckpt ({err})"
            ) from err
        model, tok_dir = (
            checkpoint_model_config(source).to_dict(),
            run_dir_of(source) / TOKENIZER_DIR,
        )
    for section, knobs in _HF_TRAINING_KNOBS.items():
        if model[section] and group.get(section):
            model[section].update({k: group[section][k] for k in knobs if k in group[section]})
    if data.seq_len > model["max_seq_len"]:
        raise ValueError(
            f"data.seq_len={data.seq_len} > the {model['max_seq_len']} positions of {init_from}"
        )
    return ModelConfig.from_dict(model), source, TokenizerConfig(kind="hf", path=str(tok_dir))
