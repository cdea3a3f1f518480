"""Bits per byte (BPB): a tokenizer-independent validation metric.

    BPB = sum over target tokens of CE(token) in nats / (ln 2 * sum of the tokens' UTF-8 bytes)

Tokens that stand for no text (special and added tokens: bos, eos, roles, think tags; byte length
0) are left out of both sums, as in nanochat, so vocabularies that share those tokens compare on
exactly the same bytes of text.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class BitsPerByte(Metric):
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, token_nats: torch.Tensor, token_bytes: torch.Tensor) -> None:
        """token_nats: per-target-token cross-entropy (any shape); token_bytes: same shape."""
        counted = token_bytes > 0
        self.nats += token_nats.double()[counted].sum()
        self.bytes += token_bytes[counted].sum().long()

    def compute(self) -> torch.Tensor:
        return self.nats / (math.log(2) * self.bytes.clamp(min=1))
