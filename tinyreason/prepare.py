"""`python -m tinyreason.prepare [overrides]`: build the tokenizer and token shards of a config.

`tinyreason.train` calls `prepare_data` itself; this entry point only does the data part, e.g. to
warm the cache before a sweep. Both are idempotent and safe to run in parallel (file locks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerFast

from tinyreason import tokenizers
from tinyreason.data import packing, shards
from tinyreason.data.sources import build_corpus, dataclass_from_dict

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerFast
    tokenizer_dir: Path
    shard_root: Path
    manifest: dict


def tokenizer_config(cfg: DictConfig) -> tokenizers.TokenizerConfig:
    return dataclass_from_dict(
        tokenizers.TokenizerConfig, OmegaConf.to_container(cfg.tokenizer, resolve=True), "tokenizer"
    )


def packed_window(cfg: DictConfig) -> int | None:
    """`data.loss_on`: all -> the token stream (None); assistant -> conversations packed into
    windows of seq_len + 1 tokens, loss on the assistant turns only."""
    loss_on = cfg.data.get("loss_on", "all")
    if loss_on not in packing.LOSS_ON:
        raise ValueError(f"data.loss_on={loss_on!r} is not one of {list(packing.LOSS_ON)}")
    if loss_on == "all":
        return None
    if cfg.data.name != "reasoning":
        raise ValueError(
            f"data.loss_on=assistant needs conversations (data=reasoning); data={cfg.data.name} "
            "is plain text: use data.loss_on=all"
        )
    return cfg.data.seq_len + 1


def prepare_data(cfg: DictConfig) -> PreparedData:
    corpus = build_corpus(cfg.data.name, OmegaConf.to_container(cfg.data.corpus, resolve=True))
    tok_cfg = tokenizer_config(cfg)
    tokenizer, tok_dir = tokenizers.load_or_train(
        tok_cfg, cfg.cache_dir, corpus.fingerprint, corpus.tokenizer_texts
    )
    tok_fp = tok_dir.name
    window = packed_window(cfg)
    manifest = shards.prepare(
        data_dir=Path(cfg.cache_dir) / "shards",
        corpus_fp=corpus.fingerprint,
        tokenizer_fp=tok_fp,
        tokenizer_dir=tok_dir,
        vocab_size=len(tokenizer),
        documents=corpus.documents,
        window=window,
    )
    root = shards.shard_dir(Path(cfg.cache_dir) / "shards", corpus.fingerprint, tok_fp, window)
    return PreparedData(tokenizer, tok_dir, root, manifest)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    data = prepare_data(cfg)
    splits = ", ".join(
        f"{k}: {v['tokens']:,} tokens, {v['bytes'] / v['tokens']:.2f} bytes/token"
        for k, v in data.manifest["splits"].items()
    )
    log.info(
        "tokenizer %s (%d tokens); shards %s (%s)",
        data.tokenizer_dir,
        len(data.tokenizer),
        data.shard_root,
        splits,
    )


if __name__ == "__main__":
    main()
