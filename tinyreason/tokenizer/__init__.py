"""Tokenizers: every `tokenizer` option yields a `PreTrainedTokenizerFast` with one set of special
tokens and one chat template, so models, exports and BPB are comparable across vocabularies.

    special  the special tokens, the chat template, `chat_document` (a leaf module)
    build    TokenizerConfig, BPE training, packaged vocabularies, the fingerprinted cache
    bytes    bytes per token id (bits per byte), the model's padded vocabulary size

The model's vocabulary is never typed by hand: `model_vocab_size(tokenizer)` pads `len(tokenizer)`
to a multiple of 64 (matmul-friendly rows in the embedding and head).
"""

from .build import DIGIT_MODES, KINDS, TokenizerConfig, load, load_or_train, train_bpe
from .bytes import VOCAB_MULTIPLE, model_vocab_size, token_byte_lengths
from .special import (
    ADDED_TOKENS,
    BOS,
    CHAT_TEMPLATE,
    EMPTY_THINK,
    EOS,
    PAD,
    ROLES,
    SPECIAL_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    chat_document,
    chat_prompt,
    without_think,
)

__all__ = [
    "ADDED_TOKENS",
    "BOS",
    "CHAT_TEMPLATE",
    "DIGIT_MODES",
    "EOS",
    "KINDS",
    "PAD",
    "ROLES",
    "SPECIAL_TOKENS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "TokenizerConfig",
    "VOCAB_MULTIPLE",
    "EMPTY_THINK",
    "chat_document",
    "chat_prompt",
    "without_think",
    "load",
    "load_or_train",
    "model_vocab_size",
    "token_byte_lengths",
    "train_bpe",
]
