"""Conversations as training windows: the assistant-token loss mask and best-fit packing.

`data.loss_on=assistant` trains on what the model must produce (the assistant turns, their eos
included) and not on the question, whose digits are unpredictable by construction. Each window
of `window` tokens holds whole conversations (none cut in the middle, so every solution sees its
question), filled by best-fit decreasing and padded with `<|pad|>`; windows are written in a
seeded shuffled order. The mask travels inside the token ids: a supervised token is stored as
`id + loss_flag` (`loss_flag` is a power of two above the vocabulary), so the litdata token
shards, their shuffling and their resumable position stay as they are.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

LOSS_ON = ("all", "assistant")


def loss_flag(vocab_size: int) -> int:
    """The bit that marks a supervised token: 2^15 (uint16 shards) up to 32,768 ids, else 2^30."""
    return 1 << 15 if vocab_size <= 1 << 15 else 1 << 30


def assistant_mask(
    ids: Sequence[int], assistant_id: int, turn_ids: set[int], eos_id: int
) -> list[bool]:
    """True for the tokens of assistant turns (after `<|assistant|>`, through its eos).

    `turn_ids` are the tokens that open a non-assistant turn or a conversation (bos, system,
    user): they and everything up to the next `<|assistant|>` are prompt."""
    mask, inside = [], False
    for t in ids:
        if t == assistant_id:
            mask.append(False)
            inside = True
        elif t in turn_ids:
            mask.append(False)
            inside = False
        else:
            mask.append(inside)
            if t == eos_id:
                inside = False
    return mask


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of items grouped into bins of `capacity` by best-fit decreasing (each item goes to
    the fullest bin it still fits in). Every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([i])
            space, b = capacity - n, len(bins) - 1
        else:
            space, b = free.pop(at)
            bins[b].append(i)
            space -= n
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


def pack(
    docs: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool]],
    window: int,
    pad_id: int,
    flag: int,
    seed: int,
) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Windows [window] of flagged ids and the counts: windows, real / supervised / pad tokens
    and conversations skipped because they are longer than a window."""
    keep = [i for i, d in enumerate(docs) if len(d) <= window]
    bins = best_fit([len(docs[i]) for i in keep], window)
    rng = random.Random(seed)
    rng.shuffle(bins)
    windows, supervised = [], 0
    for b in bins:
        members = [keep[j] for j in b]
        rng.shuffle(members)  # long and short conversations in any order inside a window
        ids = [t + flag * m for i in members for t, m in zip(docs[i], masks[i], strict=True)]
        supervised += sum(sum(masks[i]) for i in members)
        ids += [pad_id] * (window - len(ids))
        windows.append(torch.tensor(ids, dtype=torch.int64))
    real = sum(len(docs[i]) for i in keep)
    stats = {
        "windows": len(windows),
        "tokens": real,
        "supervised_tokens": supervised,
        "pad_tokens": len(windows) * window - real,
        "skipped_too_long": len(docs) - len(keep),
        "longest": max(map(len, docs), default=0),
    }
    return windows, stats


def split_flags(batch: torch.Tensor, flag: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token ids, supervised mask or None) of a batch read from the shards."""
    batch = batch.long()
    if flag is None:
        return batch, None
    return batch % flag, batch >= flag


def document_masks(ids: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention kept inside each packed conversation: (position_ids [B, S], counting from 0 at
    each bos; attn_mask [B, 1, S, S], True where query and key are in the same conversation and
    the key is not later). Padding after the last conversation joins it (never supervised)."""
    B, S = ids.shape
    doc_BS = torch.cumsum(ids == bos_id, dim=1)
    index = torch.arange(S, device=ids.device).expand(B, S)
    start_BS = torch.cummax(torch.where(ids == bos_id, index, 0), dim=1).values  # its bos
    causal = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril()
    same = doc_BS[:, :, None] == doc_BS[:, None, :]
    return index - start_BS, (same & causal)[:, None]
