"""Tokenize a corpus once into litdata token chunks, cached by (corpus, tokenizer) fingerprint.

Layout:  <data_dir>/<corpus fingerprint>/<tokenizer fingerprint>/
             manifest.json            per split: documents, tokens, UTF-8 bytes and characters of
                                      text (special tokens excluded); dtype, vocab size, both
                                      fingerprints and the sha256 of the tokenizer.json used;
                                      the size and sha256 of every file below (`files`)
             train/  validation/      litdata token chunks (index.json + chunk-*.bin), as
                                      `litdata.optimize()` writes them

Documents are concatenated (each already starts with bos and ends with eos) into one token stream
per split; `StreamingDataset(item_loader=TokensLoader(block_size))` then serves fixed windows.
A file lock lets parallel sweep jobs share the work: the first writes, the others wait and reuse.
Shards whose manifest names another corpus, tokenizer or vocabulary than the run's are refused.
Opening a cache checks every file's size and sha256 against the manifest (~600 MB/s: 30 ms for the
default 16 MB cache, ~2 s for 1 GB, against minutes of tokenizing it), so a truncated, missing or
overwritten chunk is named before any step (`DamagedShards`), not met as litdata's timeout waiting
for a "download"; `rebuild_damaged` rebuilds such a cache instead. Format-2 caches (no `files`
record) are checked by size against litdata's index.json only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from filelock import FileLock
from litdata import TokensLoader
from litdata.streaming.writer import BinaryWriter

from tinyreason.data import packing
from tinyreason.tokenizer import BOS, EOS, PAD, ROLES

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: `files`, each file's size and sha256
SIZES_ONLY_VERSION = 2  # still read: sizes checked against litdata's index.json
_DOCS_PER_ITEM = 256  # documents tokenized per item (one batch call of the tokenizer)
_CHUNK_TOKENS = 1 << 18  # tokens per chunk file (0.5 MiB at uint16)


def shard_dir(
    data_dir: str | os.PathLike,
    corpus_fp: str,
    tokenizer_fp: str,
    window: int | None = None,
    pairs: bool = False,
) -> Path:
    """The stream layout at <corpus>/<tokenizer>; packed conversations at <tokenizer>-packed<W>,
    preference pairs at <tokenizer>-pairs<W>."""
    suffix = f"-{'pairs' if pairs else 'packed'}{window}" if window else ""
    return Path(data_dir) / corpus_fp / (tokenizer_fp + suffix)


def token_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


@functools.lru_cache(maxsize=2)
def _load_tokenizer(folder: str):
    from tinyreason.tokenizer import load

    return load(folder)


def tokenizer_sha(tokenizer_dir: str | os.PathLike) -> str:
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()


class DamagedShards(ValueError):
    """A shard cache whose files are missing, truncated or changed since they were written."""

    def __init__(self, root: Path, problem: str) -> None:
        super().__init__(
            f"shard cache {root} is damaged: {problem}; rebuild it with data.rebuild_damaged=true, "
            f"or remove {root} and run `{_prepare_command()}`"
        )
        self.root, self.problem = root, problem


def _prepare_command() -> str:
    """`python -m tinyreason.prepare` with this job's overrides (inside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "python -m tinyreason.prepare <this run's overrides>"
    task = [o for o in HydraConfig.get().overrides.task if "rebuild_damaged" not in o]
    return shlex.join(["python", "-m", "tinyreason.prepare", *task])


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file of the splits (index.json, chunk-*.bin), by relative path."""
    return {
        f"{split}/{p.name}": {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for split in SPLITS
        for p in sorted((root / split).iterdir())
        if p.is_file()
    }


def damage(root: Path, manifest: dict) -> str | None:
    """What is wrong with a cache's files, or None: the first file missing, of another size or
    (format 3) another sha256 than the manifest records."""
    if manifest.get("format_version") == SIZES_ONLY_VERSION:
        return _damage_by_index(root)
    for name, record in manifest["files"].items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{name} has {size:,} bytes, the manifest says {record['bytes']:,}"
        if _sha256(path) != record["sha256"]:
            return f"{name} has the recorded size but another sha256 (overwritten or corrupted)"
    return None


def _damage_by_index(root: Path) -> str | None:
    for split in SPLITS:
        try:
            chunks = json.loads((root / split / "index.json").read_text())["chunks"]
        except (OSError, ValueError, KeyError) as e:
            return f"{split}/index.json is unreadable ({e})"
        for chunk in chunks:
            path, expected = root / split / chunk["filename"], chunk["chunk_bytes"]
            if not path.is_file():
                return f"{split}/{chunk['filename']} is missing"
            if path.stat().st_size != expected:
                return (
                    f"{split}/{chunk['filename']} has {path.stat().st_size:,} bytes, "
                    f"litdata's index says {expected:,}"
                )
    return None


def text_size(docs: Sequence[str], added_tokens: Sequence[str]) -> tuple[int, int]:
    """(UTF-8 bytes, characters) of the documents' text without the added/special token strings:
    the bytes the tokens' byte lengths add up to, i.e. the denominator of bits per byte."""
    special = re.compile(
        "|".join(re.escape(t) for t in sorted(added_tokens, key=len, reverse=True))
    )
    texts = [special.sub("", d) if added_tokens else d for d in docs]
    return sum(len(t.encode("utf-8")) for t in texts), sum(len(t) for t in texts)


def _write_tokens(out: Path, docs: Sequence[str], tokenizer_dir: str, dtype: torch.dtype) -> int:
    """Tokenize documents into litdata token chunks at `out`; returns the number of tokens.

    litdata's `BinaryWriter` in this process writes exactly what `optimize()` writes, without
    `optimize()`'s spawned worker (seconds of imports per split)."""
    tokenizer = _load_tokenizer(tokenizer_dir)
    writer = BinaryWriter(str(out), chunk_size=_CHUNK_TOKENS, item_loader=TokensLoader())
    num_tokens = 0
    for index, start in enumerate(range(0, len(docs), _DOCS_PER_ITEM)):
        ids = tokenizer(list(docs[start : start + _DOCS_PER_ITEM]), add_special_tokens=False)
        flat = torch.tensor([t for doc in ids["input_ids"] for t in doc], dtype=torch.int64)
        writer.add_item(index, flat.to(dtype))
        num_tokens += len(flat)
    writer.done()
    writer.merge()
    return num_tokens


def _turn_ids(tokenizer) -> dict:
    """`packing.assistant_mask`'s keyword arguments for this tokenizer."""
    ids_of = tokenizer.convert_tokens_to_ids
    return {
        "assistant_id": ids_of(ROLES["assistant"]),
        "turn_ids": {ids_of(t) for t in (BOS, ROLES["system"], ROLES["user"])},
        "eos_id": ids_of(EOS),
    }


def _write_packed(
    out: Path, docs: Sequence[str], tokenizer_dir: str, window: int, seed: int
) -> dict[str, int]:
    """Whole conversations packed into windows of `window` tokens, assistant tokens flagged
    (`packing.pack`); one window per litdata item and a whole number of windows per chunk, so
    `TokensLoader(block_size=window)` reads back exactly these windows."""
    tokenizer = _load_tokenizer(tokenizer_dir)
    special = _turn_ids(tokenizer)
    pad = tokenizer.convert_tokens_to_ids(PAD)
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    masks = [packing.assistant_mask(d, **special) for d in ids]
    flag = packing.loss_flag(len(tokenizer))
    windows, stats = packing.pack(ids, masks, window, pad, flag, seed)
    if not windows:
        raise ValueError(f"no conversation fits in a window of {window} tokens: raise data.seq_len")
    if stats["skipped_too_long"]:
        log.warning(
            "%d of %d conversations are longer than a window of %d tokens and are left out "
            "(raise data.seq_len to keep them)",
            stats["skipped_too_long"],
            len(docs),
            window,
        )
    dtype = torch.uint16 if flag == 1 << 15 else torch.int32
    per_chunk = max(1, _CHUNK_TOKENS // window) * window
    writer = BinaryWriter(str(out), chunk_size=per_chunk, item_loader=TokensLoader())
    for index, w in enumerate(windows):
        writer.add_item(index, w.to(dtype))
    writer.done()
    writer.merge()
    return {**stats, "loss_flag": flag}


def _write_pairs(out: Path, docs: Sequence[str], tokenizer_dir: str, window: int) -> dict[str, int]:
    """Preference pairs (docs = chosen, rejected, chosen, ...): one litdata item of 2 x `window`
    tokens per pair, [chosen | rejected], each padded to `window`, assistant tokens flagged."""
    tokenizer = _load_tokenizer(tokenizer_dir)
    special = _turn_ids(tokenizer)
    pad = tokenizer.convert_tokens_to_ids(PAD)
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    flag = packing.loss_flag(len(tokenizer))
    dtype = torch.uint16 if flag == 1 << 15 else torch.int32
    writer = BinaryWriter(
        str(out),
        chunk_size=max(1, _CHUNK_TOKENS // (2 * window)) * 2 * window,
        item_loader=TokensLoader(),
    )
    kept = supervised = 0
    for i in range(0, len(ids), 2):
        pair = ids[i : i + 2]
        if max(map(len, pair)) > window:
            continue
        item = []
        for doc in pair:
            mask = packing.assistant_mask(doc, **special)
            supervised += sum(mask)
            item += [t + flag * m for t, m in zip(doc, mask, strict=True)] + [pad] * (
                window - len(doc)
            )
        writer.add_item(kept, torch.tensor(item, dtype=torch.int64).to(dtype))
        kept += 1
    if not kept:
        raise ValueError(
            f"no preference pair fits in windows of {window} tokens: raise data.seq_len"
        )
    writer.done()
    writer.merge()
    skipped = len(ids) // 2 - kept
    if skipped:
        log.warning(
            "%d of %d pairs are longer than a window of %d tokens and are left out",
            skipped,
            len(ids) // 2,
            window,
        )
    return {
        "windows": kept,
        "tokens": sum(map(len, ids)),
        "supervised_tokens": supervised,
        "skipped_too_long": skipped,
        "loss_flag": flag,
    }


def prepare(
    data_dir: str | os.PathLike,
    corpus_fp: str,
    tokenizer_fp: str,
    tokenizer_dir: str | os.PathLike,
    vocab_size: int,
    documents: Callable[[str], list[str]],
    window: int | None = None,
    seed: int = 0,
    pairs: bool = False,
    rebuild_damaged: bool = False,
) -> dict:
    """Write the shards if absent and return the manifest. `documents(split)` gives the texts.
    A damaged cache raises `DamagedShards`, or with `rebuild_damaged` is removed and rebuilt.

    `window=None`: documents concatenated into one token stream per split (loss on every token).
    `window=W`: whole conversations packed into windows of W tokens, assistant tokens flagged
    (`data.loss_on=assistant`); the manifest's `loss_flag` tells the reader how to split them."""
    root = shard_dir(data_dir, corpus_fp, tokenizer_fp, window, pairs)
    root.parent.mkdir(parents=True, exist_ok=True)
    sha = tokenizer_sha(tokenizer_dir)
    with FileLock(str(root) + ".lock"):
        if root.exists():
            try:
                return read_manifest(root, corpus_fp, tokenizer_fp, vocab_size, sha)
            except DamagedShards as err:
                if not rebuild_damaged:
                    raise
                log.warning("shard cache %s is damaged (%s): rebuilding it", root, err.problem)
                shutil.rmtree(root)
        added = list(_load_tokenizer(str(tokenizer_dir)).get_added_vocab())
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dtype = token_dtype(vocab_size)
        splits = {}
        for split in SPLITS:
            docs = documents(split)
            if not docs:
                raise ValueError(f"the corpus has no documents in split {split!r}")
            out = tmp / split
            log.info("tokenizing %d %s documents -> %s", len(docs), split, out)
            if window is None:
                packed = {"tokens": _write_tokens(out, docs, str(tokenizer_dir), dtype)}
            elif pairs:
                packed = _write_pairs(out, docs, str(tokenizer_dir), window)
            else:
                packed = _write_packed(out, docs, str(tokenizer_dir), window, seed)
            num_bytes, num_chars = text_size(docs, added)
            splits[split] = {
                "documents": len(docs),
                **packed,
                "bytes": num_bytes,
                "chars": num_chars,
            }
        manifest = {
            "format_version": FORMAT_VERSION,
            "corpus_fingerprint": corpus_fp,
            "tokenizer_fingerprint": tokenizer_fp,
            "tokenizer_sha256": sha,
            "vocab_size": vocab_size,
            "dtype": str(dtype).removeprefix("torch."),
            "window": window,
            "loss_flag": splits["train"].get("loss_flag"),
            "splits": splits,
            "files": file_records(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        tmp.rename(root)
        return manifest


def read_manifest(
    root: Path, corpus_fp: str, tokenizer_fp: str, vocab_size: int, sha: str | None = None
) -> dict:
    """Load a shard manifest and refuse shards made from another corpus or tokenizer (by
    fingerprint, vocabulary size and, when given, the sha256 of the tokenizer.json), and
    damaged ones (`DamagedShards`: an unreadable manifest, a missing or changed file)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise DamagedShards(root, f"{MANIFEST} is missing") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DamagedShards(root, f"{MANIFEST} is unreadable ({e})") from e
    if manifest.get("format_version") not in (FORMAT_VERSION, SIZES_ONLY_VERSION):
        version = manifest.get("format_version")
        raise DamagedShards(root, f"{MANIFEST} has format {version!r}, not {FORMAT_VERSION}")
    expected = {
        "corpus_fingerprint": corpus_fp,
        "tokenizer_fingerprint": tokenizer_fp,
        "vocab_size": vocab_size,
    }
    if sha is not None:
        expected["tokenizer_sha256"] = sha
    wrong = {k: (manifest.get(k), v) for k, v in expected.items() if manifest.get(k) != v}
    if wrong:
        detail = ", ".join(
            f"{k}: shards have {a!r}, run needs {b!r}" for k, (a, b) in wrong.items()
        )
        raise ValueError(f"shards at {root} do not match this run ({detail}); delete {root}")
    problem = damage(root, manifest)
    if problem is not None:
        raise DamagedShards(root, problem)
    return manifest


def bytes_per_token(manifest: dict, split: str = "train") -> float:
    """Mean UTF-8 bytes of text per token of a split (special tokens count as tokens)."""
    stats = manifest["splits"][split]
    return stats["bytes"] / stats["tokens"]


def steps_for_bytes(manifest: dict, train_bytes: int, tokens_per_step: int, multiple: int) -> int:
    """Optimizer steps that read about `train_bytes` of training text, rounded to a multiple of
    `multiple` (at least one): a fixed budget of bytes gives fewer steps to a tokenizer that
    packs more bytes into each token."""
    steps = train_bytes / (bytes_per_token(manifest) * tokens_per_step)
    return max(multiple, round(steps / multiple) * multiple)
