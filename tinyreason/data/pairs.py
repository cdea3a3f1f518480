"""Preference pairs for `stage=dpo`: the embedded corpus' correct solution against a plausible
wrong one, and pairs read from jsonl (`prompt`, `chosen`, `rejected`).

A rejected solution of the corpus is one of (seeded by the problem's key, each checked wrong by
the corpus' own answer checker, else the next one is tried):
    wrong_operand  a coherent solution of the question (in the corpus' format) with one operand
                   digit miscopied
                   (add, sub, mul)
    dropped_carry  the sum written without its carries (add with a carry)
    off_by_one     the final answer one off (a number), or the relation flipped (compare)
Each pair is stored as the two chat documents (prompt + chosen, prompt + rejected).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tinyreason.data import solutions, synthetic
from tinyreason.data.sources import ReasoningCorpus, derived_fingerprint, hash_share, solution
from tinyreason.tokenizer import chat_document

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
LOSS_TYPES = ("sigmoid", "ipo")
_NUMBER = re.compile(r"-?\d+")
_BUILD = {"add": solutions.build_add, "sub": solutions.build_sub, "mul": solutions.build_mul}


@dataclass(frozen=True)
class DPOConfig:
    """The `dpo.*` keys of `stage=dpo`."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (squared, length-normalised as in TRL)
    files: tuple[str, ...] = ()  # jsonl of {"prompt", "chosen", "rejected"}
    corpus: bool = True  # pairs from the data group's embedded corpus
    precompute_ref: bool = False  # reference log-probs computed once (saved in the run dir)
    val_fraction: float = 0.05  # of the files' pairs

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type={self.loss_type!r} is not one of {list(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta={self.beta} must be positive")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"dpo.val_fraction={self.val_fraction} must be in (0, 1)")
        for path in self.files:
            if not Path(path).is_file() or not path.endswith(".jsonl"):
                raise ValueError(f"dpo.files: {path} is not a .jsonl file")


def _with_answer(p: synthetic.Problem, answer: str) -> synthetic.Problem:
    """The same solution ending in another answer (the last step's mention changed too)."""
    steps = [*p.steps[:-1], p.steps[-1].replace(p.answer, answer)] if p.steps else []
    return replace(p, steps=steps, answer=answer)


def wrong_operand(
    p: synthetic.Problem, rng: random.Random, fmt: str = "local"
) -> synthetic.Problem | None:
    if p.kind not in _BUILD:
        return None
    a, b = (int(n) for n in _NUMBER.findall(p.question)[:2])
    digits = list(str(abs(a)))
    i = rng.randrange(len(digits))
    lowest = 1 if i == 0 and len(digits) > 1 else 0  # keep the operand's length
    digits[i] = rng.choice([str(d) for d in range(lowest, 10) if str(d) != digits[i]])
    try:
        build = functools.partial(_BUILD[p.kind], int("".join(digits)), b)
        _, steps, answer = synthetic.build_problem(build, p.lang, rng, fmt)
    except (IndexError, ValueError):  # an operand the builder does not take (e.g. 0 x b)
        return None
    return replace(p, steps=steps, answer=answer)


def dropped_carry(
    p: synthetic.Problem, rng: random.Random, fmt: str = "local"
) -> synthetic.Problem | None:
    if p.kind != "add":
        return None
    a, b = (int(n) for n in _NUMBER.findall(p.question)[:2])
    width = max(len(str(a)), len(str(b)))
    no_carry = sum(((a // 10**i % 10 + b // 10**i % 10) % 10) * 10**i for i in range(width))
    return _with_answer(p, str(no_carry))


def off_by_one(
    p: synthetic.Problem, rng: random.Random, fmt: str = "local"
) -> synthetic.Problem | None:
    if p.kind == "compare":
        flipped = {">": "<", "<": ">", "=": ">"}
        left, rel, right = p.answer.split(" ")
        return _with_answer(p, f"{left} {flipped[rel]} {right}")
    numbers = list(_NUMBER.finditer(p.answer))
    if not numbers:
        return None
    last = numbers[-1]
    value = int(last.group()) + rng.choice((-1, 1))
    return _with_answer(p, p.answer[: last.start()] + str(value) + p.answer[last.end() :])


CORRUPTIONS = {
    "wrong_operand": wrong_operand,
    "dropped_carry": dropped_carry,
    "off_by_one": off_by_one,
}


def rejected_solution(p: synthetic.Problem, fmt: str = "local") -> tuple[str, str]:
    """(a wrong solution of p, how it is wrong): the corruptions in a seeded order, the first
    that the checker finds wrong; worked in the corpus' format (`data.corpus.format`)."""
    rng = random.Random(int(hashlib.sha256(p.key.encode()).hexdigest()[:8], 16))
    names = list(CORRUPTIONS)
    rng.shuffle(names)
    for name in [*names, "off_by_one"]:
        bad = CORRUPTIONS[name](p, rng, fmt)
        if bad is not None and not synthetic.check(p, solution(bad)):
            return solution(bad), name
    raise ValueError(f"no wrong solution found for {p.key}")  # off_by_one always is one


def read_pairs(path: str) -> tuple[list[tuple[str, str]], int]:
    """(pairs of chat documents from a jsonl file, pairs skipped for identical sides)."""
    pairs, skipped = [], 0
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            prompt, chosen, rejected = r["prompt"], r["chosen"], r["rejected"]
            if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
                raise TypeError("prompt, chosen and rejected must be strings")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{n}: not a prompt / chosen / rejected record ({err})"
            ) from err
        if chosen == rejected:
            skipped += 1
            continue
        pairs.append((chat_document(prompt, chosen), chat_document(prompt, rejected)))
    return pairs, skipped


@dataclass(frozen=True)
class PairsCorpus:
    """The Corpus protocol over pairs: `documents(split)` gives [chosen, rejected, chosen, ...]
    (chat documents, one pair after another); `pairs(split)` the pairs themselves."""

    config: DPOConfig
    base: ReasoningCorpus | None = None

    @property
    def fingerprint(self) -> str:
        return derived_fingerprint("dpo", self.config, self.base, self.config.files)

    @functools.cached_property
    def _pairs(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
        if self.base is not None:
            for split in SPLITS:
                for p in synthetic.generate(self.base.config, split):
                    chosen = chat_document(p.question, solution(p))
                    rejected = rejected_solution(p, self.base.config.format)[0]
                    out[split].append((chosen, chat_document(p.question, rejected)))
        for path in self.config.files:
            pairs, skipped = read_pairs(path)
            if skipped:
                log.warning(
                    "%s: %d pair(s) with identical chosen and rejected skipped", path, skipped
                )
            for pair in pairs:
                val = hash_share(pair[0], "split") < self.config.val_fraction
                out["validation" if val else "train"].append(pair)
        return out

    def pairs(self, split: str) -> list[tuple[str, str]]:
        return self._pairs[split]

    def documents(self, split: str) -> list[str]:
        return [doc for pair in self._pairs[split] for doc in pair]

    def texts(self, split: str) -> list[str]:
        return self.documents(split)

    def tokenizer_texts(self) -> Iterator[str]:
        yield from self.texts("train")
