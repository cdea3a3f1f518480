"""Conversations as training windows: the assistant mask is the assistant text, best-fit packing
places every conversation whole in one window, the flags survive the uint16 shards, litdata
reads back exactly the packed windows, and the loss sees exactly the assistant targets."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from litdata import StreamingDataset, TokensLoader

from tinyreason.data import packing, shards, synthetic
from tinyreason.data.sources import ReasoningCorpus, solution
from tinyreason.model import debug_config
from tinyreason.model.transformer import IGNORE_INDEX
from tinyreason.tokenizer import (
    BOS,
    EOS,
    PAD,
    ROLES,
    TokenizerConfig,
    chat_document,
    load,
    train_bpe,
)
from tinyreason.train import train
from tinyreason.training.module import LitCausalLM

CONFIG = synthetic.CorpusConfig(num_train=72, num_val=36, num_test=0)
W = 257  # seq_len 256 + 1, as data.loss_on=assistant packs them


@pytest.fixture(scope="module")
def corpus() -> ReasoningCorpus:
    return ReasoningCorpus(CONFIG)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    folder = tmp_path_factory.mktemp("packing") / "tokenizer"
    train_bpe(corpus.documents("train"), TokenizerConfig(vocab_size=400)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load(tokenizer_dir)


def special(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return {
        "assistant_id": ids(ROLES["assistant"]),
        "turn_ids": {ids(t) for t in (BOS, ROLES["system"], ROLES["user"])},
        "eos_id": ids(EOS),
    }


def encode(tok, docs: list[str]) -> list[list[int]]:
    return tok(docs, add_special_tokens=False)["input_ids"]


def masked(ids, mask) -> list[int]:
    return [t for t, m in zip(ids, mask, strict=True) if m]


# --- the assistant mask ----------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "validation"])
def test_assistant_mask_is_exactly_the_assistant_text_and_eos(corpus, tok, split):
    problems = synthetic.generate(CONFIG, split)
    docs = corpus.documents(split)
    assert {p.lang for p in problems} == {"en", "zh"} and len({p.kind for p in problems}) == 9
    for p, ids in zip(problems, encode(tok, docs), strict=True):
        mask = packing.assistant_mask(ids, **special(tok))
        assert tok.decode(masked(ids, mask)) == solution(p) + EOS
        prompt = masked(ids, [not m for m in mask])
        assert tok.decode(prompt) == BOS + ROLES["user"] + p.question + ROLES["assistant"]
        # one contiguous run, from just after <|assistant|> through the final eos
        start = ids.index(special(tok)["assistant_id"]) + 1
        assert mask == [False] * start + [True] * (len(ids) - start)


def test_assistant_mask_of_system_and_multi_turn_conversations(tok):
    system = chat_document("What is 2 + 3?", "Answer: 5", system="Be brief.")
    ids = encode(tok, [system])[0]
    mask = packing.assistant_mask(ids, **special(tok))
    assert tok.decode(masked(ids, mask)) == "Answer: 5" + EOS
    r = ROLES
    turns = (
        f"{BOS}{r['system']}Be brief.{r['user']}What is 2 + 3?{r['assistant']}5{EOS}"
        f"{r['user']}And 4 + 4?{r['assistant']}8{EOS}trailing text{r['user']}Bye"
    )
    ids = encode(tok, [turns])[0]
    mask = packing.assistant_mask(ids, **special(tok))
    # both assistant turns with their eos; nothing after an eos until the next <|assistant|>
    assert tok.decode(masked(ids, mask)) == f"5{EOS}8{EOS}"


# --- best-fit decreasing ---------------------------------------------------------------------


def best_fit_reference(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing by brute force: each item, longest first (ties by index), into the
    bin with the least free space that still holds it (ties: the earliest bin), else a new bin."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def first_fit(lengths: list[int], capacity: int) -> int:
    """Bins used by first fit in the given order."""
    free: list[int] = []
    for n in lengths:
        for b, space in enumerate(free):
            if space >= n:
                free[b] -= n
                break
        else:
            free.append(capacity - n)
    return len(free)


def random_instances():
    rng = random.Random(0)
    for trial in range(300):
        capacity = rng.choice([10, 64, 257, 1000])
        n = rng.randint(1, 60)
        if trial % 3 == 0:  # long and short mixed, as conversations are
            lengths = [
                rng.choice([rng.randint(1, capacity // 4), rng.randint(capacity // 2, capacity)])
                for _ in range(n)
            ]
        else:
            lengths = [rng.randint(1, capacity) for _ in range(n)]
        yield lengths, capacity


def test_best_fit_is_best_fit_decreasing_within_capacity_and_places_every_item_once():
    for lengths, capacity in random_instances():
        bins = packing.best_fit(lengths, capacity)
        assert bins == best_fit_reference(lengths, capacity), (lengths, capacity)
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert -(-sum(lengths) // capacity) <= len(bins) <= first_fit(lengths, capacity)


def test_best_fit_edges():
    assert packing.best_fit([], 10) == []
    assert packing.best_fit([10, 10, 10], 10) == [[0], [1], [2]]  # exactly full bins
    assert packing.best_fit([1] * 10, 10) == [list(range(10))]
    # longest first; 4 fills the 6's bin exactly, 3 joins the 5
    assert packing.best_fit([3, 6, 4, 5], 10) == [[1, 2], [3, 0]]


# --- packing conversations into windows ------------------------------------------------------


def unflag(window: torch.Tensor, flag: int) -> tuple[list[int], list[bool]]:
    ids, mask = packing.split_flags(window[None], flag)
    return ids[0].tolist(), mask[0].tolist()


def pieces(ids: list[int], bos: int, pad: int) -> list[list[int]]:
    """A window's conversations: strip the trailing pad, split before every bos."""
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    starts = [i for i, t in enumerate(ids) if t == bos]
    assert starts and starts[0] == 0, "a window starts with a conversation"
    return [ids[a:b] for a, b in zip(starts, starts[1:] + [len(ids)], strict=True)]


def test_pack_keeps_every_conversation_whole_in_one_window(corpus, tok):
    docs = corpus.documents("train")
    ids = encode(tok, docs)
    masks = [packing.assistant_mask(d, **special(tok)) for d in ids]
    bos, pad = tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids(PAD)
    flag = packing.loss_flag(len(tok))
    too_long = [i for i, d in enumerate(ids) if len(d) > W]
    assert too_long and len(too_long) < len(ids), "the corpus must have conversations of both kinds"
    windows, stats = packing.pack(ids, masks, W, pad, flag, seed=0)

    found = Counter()
    for w in windows:
        assert w.shape == (W,) and w.dtype == torch.int64
        window_ids, window_mask = unflag(w, flag)
        text = tok.decode(window_ids).removesuffix(PAD * window_ids.count(pad))
        assert PAD not in text, "pad only after the last conversation"
        assert text.startswith(BOS)
        assert all(BOS + piece in docs for piece in text.split(BOS)[1:])
        offset = 0
        for piece in pieces(window_ids, bos, pad):
            found[tuple(piece)] += 1
            doc = ids.index(piece)  # it is one of the input conversations ...
            assert window_mask[offset : offset + len(piece)] == masks[doc]  # ... with its mask
            offset += len(piece)
        assert not any(window_mask[offset:]), "pad is never supervised"
    kept = Counter(tuple(d) for i, d in enumerate(ids) if i not in too_long)
    assert found == kept  # every conversation that fits, exactly once; the others skipped

    real = sum(len(ids[i]) for i in range(len(ids)) if i not in too_long)
    assert stats == {
        "windows": len(windows),
        "tokens": real,
        "supervised_tokens": sum(sum(m) for i, m in enumerate(masks) if i not in too_long),
        "pad_tokens": len(windows) * W - real,
        "skipped_too_long": len(too_long),
        "longest": max(map(len, ids)),  # the refusal of a window too short names it
    }
    fitting = [len(d) for i, d in enumerate(ids) if i not in too_long]
    assert len(windows) == len(packing.best_fit(fitting, W))
    # the seed orders windows and the conversations inside them, and nothing else
    again, _ = packing.pack(ids, masks, W, pad, flag, seed=0)
    assert [w.tolist() for w in again] == [w.tolist() for w in windows]
    other, other_stats = packing.pack(ids, masks, W, pad, flag, seed=1)
    assert other_stats == stats and len(windows) > 1
    assert [w.tolist() for w in other] != [w.tolist() for w in windows]
    other_pieces = Counter(
        tuple(piece) for w in other for piece in pieces(unflag(w, flag)[0], bos, pad)
    )
    assert other_pieces == kept


def test_pack_skips_everything_longer_than_the_window():
    docs, masks = [[0, 5, 6, 7], [0, 8, 9]], [[False, True, True, True], [False, False, True]]
    windows, stats = packing.pack(docs, masks, 3, pad_id=2, flag=1 << 15, seed=0)
    assert [w.tolist() for w in windows] == [[0, 8, 9 + (1 << 15)]]
    assert stats["skipped_too_long"] == 1 and stats["pad_tokens"] == 0 and stats["longest"] == 4
    windows, stats = packing.pack(docs, masks, 2, pad_id=2, flag=1 << 15, seed=0)
    assert windows == [] and stats["skipped_too_long"] == 2


# --- the flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocab, dtype", [(400, torch.uint16), (1 << 15, torch.uint16), ((1 << 15) + 1, torch.int32)]
)
def test_split_flags_round_trips_through_the_shard_dtype(vocab, dtype):
    flag = packing.loss_flag(vocab)
    assert flag == (1 << 15 if vocab <= 1 << 15 else 1 << 30) and flag >= vocab
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 33), generator=g)
    ids[0, :2] = torch.tensor([0, vocab - 1])  # the extreme ids
    mask = torch.rand(4, 33, generator=g) < 0.5
    stored = (ids + flag * mask).to(dtype)  # what the shards hold
    assert torch.equal(stored.long() - flag * mask, ids), "the dtype holds every flagged id"
    back_ids, back_mask = packing.split_flags(stored, flag)
    assert back_ids.dtype == torch.int64
    assert torch.equal(back_ids, ids) and torch.equal(back_mask, mask)
    plain, none = packing.split_flags(ids.to(torch.int32), None)
    assert torch.equal(plain, ids) and none is None


# --- shards: litdata reads back exactly the packed windows --------------------------------------


@pytest.mark.parametrize(
    "chunk_tokens", [None, 3 * W + 5, W - 1], ids=["default", "3-windows", "1-window"]
)
def test_prepare_window_shards_read_back_as_the_packed_windows(
    corpus, tok, tokenizer_dir, tmp_path, monkeypatch, chunk_tokens
):
    if chunk_tokens is not None:  # more windows than fit one chunk
        monkeypatch.setattr(shards, "_CHUNK_TOKENS", chunk_tokens)
    chunk_tokens = shards._CHUNK_TOKENS
    manifest = shards.prepare(
        tmp_path, "c", "t", tokenizer_dir, len(tok), corpus.documents, window=W, seed=0
    )
    root = shards.shard_dir(tmp_path, "c", "t", W)
    assert root.name == "t-packed257" and manifest["window"] == W
    flag = packing.loss_flag(len(tok))
    assert manifest["loss_flag"] == flag and manifest["dtype"] == "uint16"
    pad = tok.convert_tokens_to_ids(PAD)
    for split in shards.SPLITS:
        ids = encode(tok, corpus.documents(split))
        masks = [packing.assistant_mask(d, **special(tok)) for d in ids]
        expected, stats = packing.pack(ids, masks, W, pad, flag, seed=0)
        assert {k: manifest["splits"][split][k] for k in stats} == stats
        dataset = StreamingDataset(
            str(root / split), item_loader=TokensLoader(block_size=W), shuffle=False
        )
        read = [dataset[i] for i in range(len(dataset))]
        assert len(read) == len(expected) == stats["windows"]
        assert Counter(tuple(w.long().tolist()) for w in read) == Counter(
            tuple(w.tolist()) for w in expected
        )
        chunks = json.loads((root / split / "index.json").read_text())["chunks"]
        per_chunk = max(1, chunk_tokens // W)
        assert len(chunks) == -(-len(expected) // per_chunk)
        assert sum(c["chunk_size"] for c in chunks) == len(expected)  # whole windows per chunk
        if chunk_tokens < 1 << 18:
            assert len(chunks) > 1, "the small chunk size must split the windows"


# --- the loss targets --------------------------------------------------------------------------


def test_inputs_targets_mask_exactly_the_non_assistant_targets(corpus, tok):
    docs = corpus.documents("validation")
    ids = encode(tok, docs)
    masks = [packing.assistant_mask(d, **special(tok)) for d in ids]
    pad = tok.convert_tokens_to_ids(PAD)
    flag = packing.loss_flag(len(tok))
    windows, _ = packing.pack(ids, masks, W, pad, flag, seed=0)
    batch = torch.stack(windows[:6]).to(torch.uint16)  # as the loader hands them over
    model = debug_config(512, "dense").to_dict()
    module = LitCausalLM(model, {"total_steps": 10}, loss_flag=flag)
    inputs, targets = module._inputs_targets(batch)
    plain_ids, mask = packing.split_flags(batch, flag)
    assert torch.equal(inputs, plain_ids[:, :-1])
    for b in range(batch.shape[0]):
        for t in range(W - 1):
            expected = plain_ids[b, t + 1].item() if mask[b, t + 1] else IGNORE_INDEX
            assert targets[b, t].item() == expected
    # the supervised targets are the assistant texts, each with its eos
    for b in range(batch.shape[0]):
        learned = [t for t in targets[b].tolist() if t != IGNORE_INDEX]
        window_docs = pieces(plain_ids[b].tolist(), tok.convert_tokens_to_ids(BOS), pad)
        assert learned == [t for d in window_docs for t in masked(d, masks[ids.index(d)])]
    assert (targets != IGNORE_INDEX).sum() == mask[:, 1:].sum()
    # without a flag (data.loss_on=all) every next token is a target
    plain = LitCausalLM(model, {"total_steps": 10}, loss_flag=None)
    inputs, targets = plain._inputs_targets(plain_ids)
    assert torch.equal(targets, plain_ids[:, 1:]) and torch.equal(inputs, plain_ids[:, :-1])


# --- a whole debug run reports exact match ------------------------------------------------------


@pytest.mark.slow
def test_debug_run_reports_exact_match(make_cfg, tmp_path):
    run = tmp_path / "run"
    metrics = train(make_cfg("debug=fast", "logger=none", "precision=fp32", run_dir=run))
    for key in ("val/exact_match", "test/exact_match", "ood/exact_match"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    reports = json.loads((run / "eval.json").read_text())
    assert set(reports) == {"test", "ood"}
    for split in ("test", "ood"):
        assert reports[split]["num_problems"] == 4  # debug: eval.num_problems
        assert metrics[f"{split}/exact_match"] == reports[split]["exact_match"]
    lines = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert [x["split"] for x in lines] == ["test"] * 4 + ["ood"] * 4
    debug_corpus = synthetic.CorpusConfig(  # debug/data/fast_reasoning.yaml
        num_test=4, max_digits=2, max_quantity=9, max_rate=20, max_coef=9
    )
    ood_items = synthetic.generate(synthetic.ood_config(debug_corpus), "test")
    assert [x["question"] for x in lines[4:]] == [p.question for p in ood_items]
    for split in ("test", "ood"):
        rows = [x for x in lines if x["split"] == split]
        assert reports[split]["exact_match"] == sum(x["correct"] for x in rows) / 4
