"""Bits per byte by hand on one conversation under two tokenizers: the bytes each target token
covers (a Chinese character may be split over tokens), special tokens count zero, and the same
per-token loss gives a lower BPB to the tokenizer that needs fewer tokens for the same text."""

import math

import pytest
import torch

from tinyreason import tokenizer as tk
from tinyreason.tokenizer import build as tkb
from tinyreason.training.metrics import BitsPerByte

TRAIN = [
    "Tom buys 3 apples at 12 dollars each. How much does he pay?",
    "小明买了3个苹果，每个12元。他一共付了多少钱？",
    "<think>\nunits: 7 + 5 = 12, write 2 carry 1\n</think>\nAnswer: 36",
    "答案：36",
] * 50

DOC = tk.chat_document("12元?", "<think>\n好\n</think>\nAnswer: 12")
TEXT_BYTES = len("12元?\n好\n\nAnswer: 12".encode())  # 22: the text between the special tokens

# Bytes each token of DOC stands for, worked out by hand from the two vocabularies:
# a 300-token BPE trained on TRAIN knows "元" only as the pieces E5 85 + 83 (2 + 1 bytes), and
# "好" (E5 A5 BD) not at all (3 single bytes); cl100k has both as one token and "Answer" whole.
EXPECTED = {
    "bpe": [0, 0, 1, 1, 2, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 2, 1, 1, 2, 1, 1, 1, 1, 0],
    "cl100k": [0, 0, 2, 3, 1, 0, 0, 1, 3, 1, 0, 1, 6, 1, 1, 2, 0],
}


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bpe": tk.train_bpe(iter(TRAIN), tk.TokenizerConfig(vocab_size=300, digits="individual")),
        "cl100k": tkb.from_tiktoken(*tkb.tiktoken_source(tk.TokenizerConfig(kind="cl100k"))),
    }


@pytest.mark.parametrize("name", ["bpe", "cl100k"])
def test_bytes_each_target_token_covers(tokenizers, name):
    tok = tokenizers[name]
    ids = tok(DOC, add_special_tokens=False)["input_ids"]
    lengths = tk.token_byte_lengths(tok)
    assert lengths[ids].tolist() == EXPECTED[name]
    assert sum(EXPECTED[name]) == TEXT_BYTES


@pytest.mark.parametrize("name, bpb", [("bpe", 2 * 19 / 22), ("cl100k", 2 * 11 / 22)])
def test_bpb_by_hand(tokenizers, name, bpb):
    # Every text token costs 2 bits; special targets (user, assistant, think tags, eos) cost
    # 50 nats that must not count. bpe: 19 text tokens -> 38 bits / 22 bytes; cl100k: 11 -> 22 / 22.
    tok = tokenizers[name]
    ids = torch.tensor(tok(DOC, add_special_tokens=False)["input_ids"])
    targets = ids[1:]
    token_bytes = tk.token_byte_lengths(tok)[targets]
    nats = torch.where(token_bytes > 0, 2 * math.log(2), 50.0)
    metric = BitsPerByte()
    metric.update(nats, token_bytes)
    assert metric.compute().item() == pytest.approx(bpb)
    assert int((token_bytes > 0).sum()) == {"bpe": 19, "cl100k": 11}[name]
