"""Bytes of text per token id (for bits per byte) and the model's padded vocabulary size."""

from __future__ import annotations

import json
import re

import torch
from transformers import PreTrainedTokenizerFast

VOCAB_MULTIPLE = 64


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


def _has_decoder(spec: dict | None, kind: str) -> bool:
    if not spec:
        return False
    if spec.get("type") == "Sequence":
        return any(_has_decoder(d, kind) for d in spec.get("decoders", []))
    return spec.get("type") == kind


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast, size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes of text each token id stands for, [size] int32. Used for bits per byte.

    Byte-level vocabularies (our BPE, the converted tiktoken files, DeepSeek, GPT-2/Llama 3/Qwen
    folders): one alphabet character per byte, exact even for tokens that hold part of a
    multi-byte character. Other vocabularies (SentencePiece / WordPiece): `<0xNN>` byte-fallback
    tokens are 1 byte, `▁` is a space (so a prepended word-boundary `▁` counts one byte), a
    WordPiece `##` prefix is no text, the rest is the token's own UTF-8 text.
    Added/special tokens, tokens a byte-level encoder can never emit, and padding rows past the
    tokenizer are 0, so BPB leaves them out.
    """
    size = size or model_vocab_size(tokenizer)
    lengths = torch.zeros(size, dtype=torch.int32)
    decoder_spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    byte_level = _has_decoder(decoder_spec, "ByteLevel")
    wordpiece = _has_decoder(decoder_spec, "WordPiece")
    alphabet = _byte_decoder()
    added = set(tokenizer.get_added_vocab().values())
    for token, idx in tokenizer.get_vocab().items():
        if idx in added or idx >= size:
            continue
        if byte_level:
            lengths[idx] = len(token) if all(c in alphabet for c in token) else 0
        elif _BYTE_FALLBACK.fullmatch(token):
            lengths[idx] = 1
        else:
            text = token.removeprefix("##") if wordpiece else token
            lengths[idx] = len(text.replace("\u2581", " ").encode("utf-8"))
    return lengths
