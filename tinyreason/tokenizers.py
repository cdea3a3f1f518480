"""Tokenizers: the registry behind the `tokenizer` config group, BPE training, the chat template.

Every option yields a `transformers.PreTrainedTokenizerFast` that shares one set of special tokens
and one chat template, so models, exports and BPB are comparable across vocabularies.

    bpe   byte-level BPE trained with `tokenizers` on the training split, cached by fingerprint

The model's vocabulary is never typed by hand: `model_vocab_size(tokenizer)` pads `len(tokenizer)`
to a multiple of 64 (matmul-friendly rows in the embedding and head).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Ids 0.. in this order for every tokenizer we train. The think tags are "added" but not
# "special": they survive `decode(skip_special_tokens=True)`, since they are part of an answer.
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLES.values()]
ADDED_TOKENS = [THINK_OPEN, THINK_CLOSE]

# One chat template for every vocabulary. A turn is its role token followed by the content; an
# assistant turn ends with eos. Generation prompts end in "<|assistant|>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

KINDS = ("bpe",)
DIGIT_MODES = ("individual", "none")
VOCAB_MULTIPLE = 64
_VERSION = 1  # bump when training code changes what a fingerprint produces


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "bpe"
    vocab_size: int = 4096  # bpe only: target size including special tokens
    digits: str = "individual"  # bpe only: split numbers into single digits before merging
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tokenizer.kind={self.kind!r} is not one of {list(KINDS)}")
        if self.digits not in DIGIT_MODES:
            raise ValueError(f"tokenizer.digits={self.digits!r} is not one of {list(DIGIT_MODES)}")
        floor = 256 + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
        if self.vocab_size < floor:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} is too small: a byte-level BPE needs at "
                f"least {floor} (256 bytes + {len(SPECIAL_TOKENS) + len(ADDED_TOKENS)} special tokens)"
            )

    def fingerprint(self, corpus_fingerprint: str) -> str:
        blob = json.dumps({**asdict(self), "corpus": corpus_fingerprint, "v": _VERSION})
        return f"{self.kind}-{self.vocab_size}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def chat_document(question: str, answer: str, system: str | None = None) -> str:
    """The text of one conversation exactly as `apply_chat_template` renders it (ends with eos)."""
    turns = ([ROLES["system"] + system] if system else []) + [
        ROLES["user"] + question,
        ROLES["assistant"] + answer + EOS,
    ]
    return BOS + "".join(turns)


def train_bpe(texts: Iterable[str], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with optional single-digit pre-splitting (as Llama 3 / DeepSeek)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if config.digits == "individual":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=SPECIAL_TOKENS + ADDED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLES.values()),
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(ADDED_TOKENS, special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_or_train(
    config: TokenizerConfig,
    cache_dir: str | os.PathLike,
    corpus_fingerprint: str,
    train_texts: Callable[[], Iterable[str]],
) -> tuple[PreTrainedTokenizerFast, Path]:
    """Load the tokenizer for (config, corpus) from the cache, training it first if absent.

    A file lock makes parallel sweep jobs train it once; the folder appears atomically.
    """
    folder = Path(cache_dir) / "tokenizers" / config.fingerprint(corpus_fingerprint)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "tokenizer.json").exists():
            log.info("training %s tokenizer -> %s", config.kind, folder)
            tokenizer = train_bpe(train_texts(), config)
            tmp = folder.with_name(folder.name + ".tmp")
            tokenizer.save_pretrained(tmp)
            tmp.rename(folder)
    return load(folder), folder


def load(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} is not a tokenizer folder: it has no tokenizer.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    missing = [
        t for t in SPECIAL_TOKENS + ADDED_TOKENS if tokenizer.convert_tokens_to_ids(t) is None
    ]
    if missing:
        raise ValueError(f"tokenizer at {folder} lacks the special tokens {missing}")
    return tokenizer


def model_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible map from the 256 bytes to printable characters (byte-level BPE alphabet).
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast, size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes of text each token id stands for, [size] int32; 0 for added/special tokens
    and for padding rows past the tokenizer. Used for bits per byte."""
    size = size or model_vocab_size(tokenizer)
    lengths = torch.zeros(size, dtype=torch.int32)
    decoder = _byte_decoder()
    added = set(tokenizer.get_added_vocab().values())
    for token, idx in tokenizer.get_vocab().items():
        if idx in added or idx >= size:
            continue
        if all(c in decoder for c in token):
            lengths[idx] = len(token)  # byte-level: one character per byte
        else:
            lengths[idx] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return lengths
