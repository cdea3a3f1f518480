"""Corpora behind the `data` config group. Each gives a fingerprint, documents per split (what the
shards hold), plain texts per split (for tokenizer training and the compression report) and the
texts a tokenizer is trained on (training split only).

    reasoning    the embedded synthetic bilingual reasoning corpus (`tinyreason.data.synthetic`)
    text_files   local .txt / .jsonl / .parquet files, each optionally .gz or .zst compressed
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tinyreason.data import synthetic
from tinyreason.tokenizer import BOS, EOS, chat_document

NAMES = ("reasoning", "text_files")
SPLITS = ("train", "validation")
FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")
_TEXT_FILES_VERSION = 2  # bump when reading or splitting changes what a fingerprint stands for


def dataclass_from_dict(cls, values: dict, where: str):
    """Build a config dataclass, turning unknown keys into a ValueError that lists the allowed."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {allowed}")
    # YAML gives lists where the dataclasses hold tuples (hashable, stable fingerprints)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def hash_share(text: str, salt: str = "") -> float:
    """A text's deterministic place in [0, 1) (sha256): which split, which share of examples."""
    return int(hashlib.sha256((salt + text).encode()).hexdigest()[:8], 16) / 16**8


def derived_fingerprint(prefix: str, config: object, base: Corpus | None, files: tuple) -> str:
    """Fingerprint of a corpus built from a config, an optional base corpus and files (their
    bytes, so an edited file makes new shards)."""
    h = hashlib.sha256(repr(config).encode())
    h.update((base.fingerprint if base else "-").encode())
    for path in files:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return f"{prefix}-{h.hexdigest()[:16]}"


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def language_of(text: str) -> str:
    """ "zh" when CJK ideographs are at least 30% of the letters, else "en" (for reports only)."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    return "zh" if cjk >= 0.3 * max(cjk + latin, 1) else "en"


@dataclass(frozen=True)
class ReasoningCorpus:
    config: synthetic.CorpusConfig

    @property
    def fingerprint(self) -> str:
        return f"reasoning-{self.config.fingerprint()}"

    def documents(self, split: str) -> list[str]:
        """Each problem as one chat conversation: user question, assistant <think> + answer."""
        return [
            chat_document(p.question, solution(p)) for p in synthetic.generate(self.config, split)
        ]

    def texts(self, split: str) -> list[str]:
        return [synthetic.format_text(p) for p in synthetic.generate(self.config, split)]

    def tokenizer_texts(self) -> Iterator[str]:
        yield from self.texts("train")


def solution(problem: synthetic.Problem) -> str:
    """The assistant's part of `format_text`: the <think> block and the answer line."""
    return synthetic.format_text(problem).removeprefix(problem.question + "\n")


@dataclass(frozen=True)
class TextFilesConfig:
    paths: tuple[str, ...] = ()
    text_key: str = "text"  # .jsonl / .parquet: the field that holds a document's text
    doc_chars: int = 4000  # .txt: consecutive lines are packed into documents of about this size
    val_fraction: float = 0.02  # share of documents in validation, chosen by a hash of the text

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("data.paths is empty: pass data.paths=[a.txt,b.jsonl.gz,...]")
        for path in self.paths:
            if _format(path) is None:
                raise ValueError(
                    f"data.paths: {path!r} is not one of {list(FORMATS)}, optionally followed by "
                    f"{[c for c in COMPRESSIONS if c]}"
                )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.corpus.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.doc_chars < 1:
            raise ValueError(f"data.doc_chars={self.doc_chars} must be positive")


def _format(path: str) -> tuple[str, str] | None:
    """(format, compression) from the file name: "a.jsonl.zst" -> (".jsonl", ".zst")."""
    for fmt in FORMATS:
        for comp in COMPRESSIONS:
            if path.endswith(fmt + comp):
                return fmt, comp
    return None


def _read_bytes(path: Path, compression: str) -> bytes:
    raw = path.read_bytes()
    if compression == ".gz":
        return gzip.decompress(raw)
    if compression == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return raw


def _pack_lines(text: str, doc_chars: int) -> list[str]:
    docs, current, size = [], [], 0
    for line in text.split("\n"):
        current.append(line)
        size += len(line) + 1
        if size >= doc_chars:
            docs.append("\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n".join(current))
    return [d for d in docs if d.strip()]


@dataclass(frozen=True)
class TextFilesCorpus:
    config: TextFilesConfig

    def _files(self) -> list[Path]:
        files = [Path(p) for p in self.config.paths]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"data.paths: no such file(s) {missing} (relative to {Path.cwd()})")
        return files

    @functools.cached_property
    def fingerprint(self) -> str:
        fields = {**dataclasses.asdict(self.config), "version": _TEXT_FILES_VERSION}
        h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        for path in self._files():
            h.update(hashlib.sha256(path.read_bytes()).digest())
        return f"text-{h.hexdigest()[:16]}"

    @functools.cached_property
    def _split_texts(self) -> dict[str, list[str]]:
        """Documents by split, each split in the order of the documents' hashes: files are
        interleaved, so every stretch of the shards (and every short run) mixes all sources."""
        keyed = {s: [] for s in SPLITS}
        threshold = int(self.config.val_fraction * 10_000)
        for path in self._files():
            fmt, comp = _format(str(path))
            for text in self._read(path, fmt, comp):
                key = hashlib.sha256(text.encode()).hexdigest()
                split = "validation" if int(key[:8], 16) % 10_000 < threshold else "train"
                keyed[split].append((key, text))
        if not keyed["validation"]:  # a small corpus: the document of the lowest hash
            if len(keyed["train"]) < 2:
                raise ValueError(
                    f"data.corpus: {len(keyed['train'])} document(s) in {list(self.config.paths)}: "
                    "a run needs at least two (one for validation, data.corpus.val_fraction of "
                    "them); a .txt file splits into documents of data.corpus.doc_chars characters"
                )
            keyed["validation"].append(min(keyed["train"]))
            keyed["train"].remove(keyed["validation"][0])
        return {s: [text for _, text in sorted(pairs)] for s, pairs in keyed.items()}

    def _read(self, path: Path, fmt: str, comp: str) -> list[str]:
        data = _read_bytes(path, comp)
        key = self.config.text_key
        try:
            if fmt == ".txt":
                # universal newlines, as open() in text mode: CRLF and CR become "\n"
                text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read()
                return _pack_lines(text, self.config.doc_chars)
            if fmt == ".jsonl":
                rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
                return [r[key] for r in rows if r[key]]
            import pyarrow.parquet as pq

            column = pq.read_table(io.BytesIO(data), columns=[key]).column(key).to_pylist()
            return [t for t in column if t]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"cannot read documents from {path} (text_key={key!r}): {e}") from e

    def texts(self, split: str) -> list[str]:
        return self._split_texts[split]

    def documents(self, split: str) -> list[str]:
        return [BOS + t + EOS for t in self.texts(split)]

    def tokenizer_texts(self) -> Iterator[str]:
        yield from self.texts("train")


Corpus = ReasoningCorpus | TextFilesCorpus


def build_corpus(name: str, corpus: dict) -> Corpus:
    if name not in NAMES:
        raise ValueError(f"data.name={name!r} is not one of {list(NAMES)}")
    if name == "text_files":
        return TextFilesCorpus(dataclass_from_dict(TextFilesConfig, dict(corpus), "data.corpus"))
    return ReasoningCorpus(dataclass_from_dict(synthetic.CorpusConfig, dict(corpus), "data.corpus"))
