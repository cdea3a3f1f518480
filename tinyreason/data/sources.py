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
import types
import typing
from collections.abc import Iterator, Mapping
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
    """Build a config dataclass, turning unknown keys and values of the wrong type ("abc" for an
    int: a TypeError deep in `__post_init__` otherwise) into a ValueError naming the key."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {allowed}")
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # an annotation only imported for type checkers: left to the class
        hints = {}
    for key, value in values.items():
        hint = hints.get(key)
        if hint is not None and not _takes(hint, value):
            raise ValueError(
                f"{where}.{key}={value!r} is a {type(value).__name__}; it must be "
                f"{_type_name(hint)}"
            )
    # YAML gives lists where the dataclasses hold tuples (hashable, stable fingerprints)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _takes(hint, value) -> bool:
    """Whether a field annotated `hint` takes a YAML value (lists for tuples; an int for a float;
    a bool for neither: `true` for a size is a typo). Other classes are checked by their owner."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_takes(h, value) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) in (tuple, list):
        return "a list"
    return {
        type(None): "null",
        int: "an int",
        float: "a number",
        str: "a string",
        bool: "true or false",
    }.get(hint, str(hint))


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
    try:
        if compression == ".gz":
            return gzip.decompress(raw)
        if compression == ".zst":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    except Exception as e:  # BadGzipFile, EOFError (truncated), zlib.error, ZstdError
        raise ValueError(f"data.paths: {path} is not a readable {compression} file ({e})") from e
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


def _jsonl_texts(path: Path, text: str, key: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.paths: {path} line {number} is not JSON ({e})") from e
        if not isinstance(row, dict) or key not in row:
            fields = list(row)[:8] if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"data.paths: {path} line {number} has no field text_key={key!r} (it has "
                f"{fields}); set data.corpus.text_key"
            )
        if row[key] and not isinstance(row[key], str):
            raise ValueError(f"data.paths: {path} line {number}: {key!r} is not a string")
        docs += [row[key]] if row[key] else []
    return docs


def _parquet_texts(path: Path, data: bytes, key: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(io.BytesIO(data), columns=[key]).column(key).to_pylist()
    except (pa.ArrowException, KeyError) as e:
        raise ValueError(
            f"data.paths: {path} is not a parquet file with a text_key={key!r} column ({e})"
        ) from e
    if any(t and not isinstance(t, str) for t in column):
        raise ValueError(f"data.paths: {path}: column {key!r} is not text")
    return [t for t in column if t]


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
        """A file's documents; a file that is binary, not UTF-8, malformed or without text is
        refused, naming the file (and the line of a .jsonl)."""
        data = _read_bytes(path, comp)
        if fmt == ".parquet":
            docs = _parquet_texts(path, data, self.config.text_key)
        elif b"\0" in data:
            raise ValueError(f"data.paths: {path} is binary (it has NUL bytes), not {fmt} text")
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"data.paths: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                    f"{e.start}); convert it, e.g. `iconv -f latin1 -t utf-8 {path}`"
                ) from e
            # universal newlines, as open() in text mode: CRLF and CR become "\n"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if fmt == ".txt":
                docs = _pack_lines(text, self.config.doc_chars)
            else:
                docs = _jsonl_texts(path, text, self.config.text_key)
        if not docs:
            raise ValueError(f"data.paths: {path} holds no text; remove it from data.paths")
        return docs

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
    try:
        config = dataclass_from_dict(synthetic.CorpusConfig, dict(corpus), "data.corpus")
    except ValueError as err:  # CorpusConfig names its fields bare: say where they are
        message = str(err)
        raise ValueError(
            message if message.startswith("data.") else f"data.corpus.{message}"
        ) from err
    return ReasoningCorpus(config)
