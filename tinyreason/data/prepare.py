"""Tokenizer + token shards of a corpus: built once, cached by fingerprint, shared by every run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from tinyreason import tokenizer as tokenizers
from tinyreason.data import shards
from tinyreason.data.sources import Corpus


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerFast
    tokenizer_dir: Path
    shard_root: Path  # holds train/ and validation/
    manifest: dict


def prepare_data(
    corpus: Corpus,
    tokenizer: tokenizers.TokenizerConfig,
    cache_dir: str | Path,
    window: int | None = None,
    pairs: bool = False,
    rebuild_damaged: bool = False,
) -> PreparedData:
    """Build or reuse the tokenizer (trained on the corpus for `bpe`) and the shards: the token
    stream, or with `window` whole conversations packed into windows of that many tokens (with
    `pairs`: a preference pair per item, chosen and rejected in a window each). A damaged shard
    cache stops the run (`shards.DamagedShards`), or with `rebuild_damaged` is rebuilt."""
    tok, tok_dir = tokenizers.load_or_train(
        tokenizer, cache_dir, corpus.fingerprint, corpus.tokenizer_texts
    )
    data_dir = Path(cache_dir) / "shards"
    manifest = shards.prepare(
        data_dir=data_dir,
        corpus_fp=corpus.fingerprint,
        tokenizer_fp=tok_dir.name,
        tokenizer_dir=tok_dir,
        vocab_size=len(tok),
        documents=corpus.documents,
        window=window,
        pairs=pairs,
        rebuild_damaged=rebuild_damaged,
    )
    root = shards.shard_dir(data_dir, corpus.fingerprint, tok_dir.name, window, pairs)
    return PreparedData(tok, tok_dir, root, manifest)
