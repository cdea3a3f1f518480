"""What both benchmarks share: the clocks, and the model a training config composes to."""

from __future__ import annotations

import dataclasses
import time

from tinyreason.compose import compose
from tinyreason.model import MTPConfig
from tinyreason.tokenizer import load_or_train, model_vocab_size
from tinyreason.training.run_config import RunConfig

# Wall clock by default; `--clock cpu` times this process's CPU seconds (all threads), which
# other users' load distorts far less than wall time (with --threads 1 it is the step's work).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def compose_model(overrides: list[str]):
    """(model config with MTP off, tokenizer, composed training config): the vocabulary is the
    config's tokenizer's, trained and cached as by `tinyreason.prepare` if needed."""
    cfg = compose("train", overrides)
    run = RunConfig.from_hydra(cfg)
    tokenizer, _ = load_or_train(
        run.tokenizer, run.cache_dir, run.data.corpus.fingerprint, run.data.corpus.tokenizer_texts
    )
    model = run.model_for(model_vocab_size(tokenizer))
    return dataclasses.replace(model, mtp=MTPConfig(depth=0)), tokenizer, cfg
