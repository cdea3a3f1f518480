"""Corpora behind the `data` config group. Each gives a fingerprint, documents per split, and the
texts a tokenizer is trained on (training split only).

    reasoning   the embedded synthetic bilingual reasoning corpus (`tinyreason.data.synthetic`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from tinyreason.data import synthetic
from tinyreason.tokenizers import chat_document

NAMES = ("reasoning",)


def dataclass_from_dict(cls, values: dict, where: str):
    """Build a config dataclass, turning unknown keys into a ValueError that lists the allowed."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {allowed}")
    # YAML gives lists where the dataclasses hold tuples (hashable, stable fingerprints)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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

    def tokenizer_texts(self) -> Iterator[str]:
        for p in synthetic.generate(self.config, "train"):
            yield synthetic.format_text(p)


def solution(problem: synthetic.Problem) -> str:
    """The assistant's part of `format_text`: the <think> block and the answer line."""
    return synthetic.format_text(problem).removeprefix(problem.question + "\n")


def build_corpus(name: str, corpus: dict) -> ReasoningCorpus:
    if name not in NAMES:
        raise ValueError(f"data.name={name!r} is not one of {list(NAMES)}")
    return ReasoningCorpus(dataclass_from_dict(synthetic.CorpusConfig, dict(corpus), "data.corpus"))
