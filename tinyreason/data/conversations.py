"""Conversations for supervised fine-tuning (`stage=sft`): the embedded corpus, chat jsonl and
GSM8K-style jsonl, as one corpus of chat documents (our template's exact text).

    chat jsonl   {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
    GSM8K jsonl  {"question": ..., "answer": "...<<48/2=24>>24 ...\\n#### 72"}: the lines become
                 <think> steps (each `<<a/b=c>>` annotation a computation step "48 / 2 = 24"),
                 the `#### N` the answer line "Answer: N"

A record is put in train or validation by a hash of its text (`sft.val_fraction`); the embedded
corpus keeps its own splits. `sft.drop_think` empties the think block of that share of examples
(by hash), as Qwen3's `enable_thinking=False` prompts expect. Records without an assistant turn
are skipped with a count; a record without the needed fields is an error naming file and line.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tinyreason.data.sources import Corpus, derived_fingerprint, hash_share
from tinyreason.tokenizer import BOS, EOS, ROLES, chat_document, without_think

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_OPERATOR = re.compile(r"\s*([+\-*/×÷])\s*")


@dataclass(frozen=True)
class SFTConfig:
    """The `sft.*` keys of `stage=sft`."""

    files: tuple[str, ...] = ()  # chat or GSM8K jsonl, by their fields
    corpus: bool = True  # also the data group's embedded-corpus conversations (data=reasoning)
    drop_think: float = 0.0  # share of examples whose think block is emptied
    val_fraction: float = 0.05  # of the files' records

    def __post_init__(self) -> None:
        if not 0 <= self.drop_think <= 1:
            raise ValueError(f"sft.drop_think={self.drop_think} must be in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"sft.val_fraction={self.val_fraction} must be in (0, 1)")
        for path in self.files:
            if not Path(path).is_file() or not path.endswith(".jsonl"):
                raise ValueError(f"sft.files: {path} is not a .jsonl file")


def render(messages: list[dict]) -> str:
    """A conversation as our chat template renders it (thinking on)."""
    text = BOS
    for m in messages:
        text += ROLES[m["role"]] + m["content"] + (EOS if m["role"] == "assistant" else "")
    return text


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """A GSM8K answer -> (our assistant text: <think> steps + answer line, the final number)."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '#### <answer>' line")
    final = final.strip().replace(",", "")
    steps = []
    for line in body.strip().splitlines():
        prose = _ANNOTATION.sub("", line).strip()
        steps += [prose] if prose else []
        for lhs, rhs in _ANNOTATION.findall(line):
            spaced = _OPERATOR.sub(r" \1 ", lhs.strip()).strip()
            steps.append(f"{spaced} = {rhs.strip()}")
    return "<think>\n" + "\n".join(steps) + "\n</think>\nAnswer: " + final, final


def read_conversations(path: str) -> tuple[list[str], int]:
    """(chat documents of a jsonl file, records skipped for having no assistant turn)."""
    docs, skipped = [], 0
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "messages" in record:
                messages = record["messages"]
                bad = [m.get("role") for m in messages if m.get("role") not in ROLES]
                if bad or any(not isinstance(m.get("content"), str) for m in messages):
                    raise ValueError(f"roles must be {list(ROLES)} with string content, got {bad}")
                if not any(m["role"] == "assistant" for m in messages):
                    skipped += 1
                    continue
                docs.append(render(messages))
            else:
                docs.append(chat_document(record["question"], gsm8k_solution(record["answer"])[0]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(
                f"{path}:{n}: not a chat record (messages) nor a question/answer record ({err})"
            ) from err
    return docs, skipped


@dataclass(frozen=True)
class ConversationsCorpus:
    """The Corpus protocol (fingerprint, documents, texts, tokenizer_texts) over conversations."""

    config: SFTConfig
    base: Corpus | None = None  # the embedded corpus, when sft.corpus

    @property
    def fingerprint(self) -> str:
        return derived_fingerprint("sft", self.config, self.base, self.config.files)

    @functools.cached_property
    def _splits(self) -> dict[str, list[str]]:
        out = {s: list(self.base.documents(s)) if self.base else [] for s in SPLITS}
        for path in self.config.files:
            docs, skipped = read_conversations(path)
            if skipped:
                log.warning("%s: %d record(s) without an assistant turn skipped", path, skipped)
            for doc in docs:
                val = hash_share(doc, "split") < self.config.val_fraction
                out["validation" if val else "train"].append(doc)
        drop = self.config.drop_think
        return {
            s: [without_think(d) if hash_share(d, "think") < drop else d for d in docs]
            for s, docs in out.items()
        }

    def documents(self, split: str) -> list[str]:
        return self._splits[split]

    def texts(self, split: str) -> list[str]:
        return self._splits[split]

    def tokenizer_texts(self) -> Iterator[str]:
        yield from self.texts("train")
