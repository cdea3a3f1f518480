"""Deterministic bilingual (en/zh) reasoning problems with worked, step-by-step solutions.

The default pre-training corpus, SFT set and reasoning eval, so nothing is downloaded at run time.
Every problem has a language-independent ``key`` (kind, variant, operands); a hash of the key alone
picks its split, so train / validation / test never share a problem, whatever the seed.

    add / sub      column arithmetic with carries / borrows (negative differences too)
    mul            partial products by place value
    compare        number of digits first, then digit by digit from the highest place
    gcd            Euclidean algorithm
    price          total cost, change from a payment, unit price
    rate           distance = speed x time, time = distance / speed, two workers together
    unit           km/m, kg/g, h/min, both directions
    linear         a*x + b = c with an integer solution, plus a check

Here: the config, the samplers (operands and key of each kind), the splits and the text format. The
builders that write each solution are in solutions.py, the column working of +, -, × in working.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from . import drills as drill_problems
from . import local
from .solutions import (
    Solution,
    build_add,
    build_compare,
    build_gcd,
    build_linear,
    build_mul,
    build_price,
    build_rate,
    build_sub,
    build_unit,
)
from .templates import UNITS

FORMATS = ("local", "column")

KINDS = ("add", "sub", "mul", "compare", "gcd", "price", "rate", "unit", "linear")
LANGS = ("en", "zh")
SPLITS = ("train", "validation", "test")
# Bump whenever a sampler, a builder (solutions.py, working.py) or a template (templates.py)
# changes: cached corpora are keyed by fingerprint().
# 2: column working for every multi-digit +, -, × (`working.working`); 3: local working
# (`local.py`, `format=local`) and digit drills (`drills`)
GENERATOR_VERSION = 3
# Candidates drawn for one slot before giving up; a split keeps ~5-90% of keys, so this only
# trips when the problem space is exhausted (tiny difficulty knobs, huge split sizes).
_MAX_TRIES = 2000


@dataclass(frozen=True)
class Problem:
    kind: str
    lang: str
    question: str
    steps: list[str]  # reasoning lines, the body of <think>...</think>
    answer: str  # canonical final answer: "543", "-17", "x = 5", "4521 > 987"
    key: str  # "add:65:478", "price:change:12:4:100": language-independent, decides the split


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0
    num_train: int = 20000
    num_val: int = 500
    num_test: int = 500
    kinds: tuple[str, ...] = KINDS
    langs: tuple[str, ...] = LANGS
    # operands of add/sub/compare/gcd and mul's first factor; unit amounts get one digit less
    max_digits: int = 4
    max_multiplier_digits: int = 2  # mul's second factor = number of partial products
    max_quantity: int = 20  # word problems: item counts and hours
    max_rate: int = 100  # word problems: unit prices, speeds, work rates
    max_coef: int = 12  # a*x + b = c: 2 <= |a| <= max_coef, |x| <= max_coef, |b| <= 10*max_coef
    # Out of distribution: every number gets exactly one digit more than the knob above allows
    # (max_digits + 1, max_multiplier_digits + 1), quantities / rates / coefficients are drawn
    # from (limit, 2 * limit]: nothing a model trained at ood=false has seen (`ood_config`).
    ood: bool = False
    # How a solution is worked: local (every copy local: `local.py`) | column (generator v2: one
    # line per place, naming it; `working.py`). The questions and answers are the same.
    format: str = "local"
    # Share of the *training* split given to digit drills (copy, drop the last digit, the last
    # digit, reverse, one column step: `drills.py`); validation / test / OOD hold none.
    drills: float = 0.0

    def __post_init__(self) -> None:
        # YAML/Hydra hand over lists; tuples keep the config hashable and the fingerprint stable
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "langs", tuple(self.langs))
        for name, allowed in (("kinds", KINDS), ("langs", LANGS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                raise ValueError(
                    f"{name}={list(values)} must be a non-empty list of distinct values from {list(allowed)}"
                )
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        # 9 digits keep every column (sums have one more) inside the named places below
        for name, lo, hi in (("max_digits", 1, 9), ("max_multiplier_digits", 1, 9)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name}={getattr(self, name)} must be in [{lo}, {hi}]")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} must be one of {list(FORMATS)}")
        if isinstance(self.drills, bool) or not isinstance(self.drills, (int, float)):
            raise ValueError(f"drills={self.drills!r} must be a number in [0, 1)")
        if not 0 <= self.drills < 1:
            raise ValueError(
                f"drills={self.drills} must be in [0, 1): the share of the training split"
            )
        for name in ("max_quantity", "max_rate", "max_coef"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 2")

    def fingerprint(self) -> str:
        fields = {**dataclasses.asdict(self), "version": GENERATOR_VERSION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def split_size(self, split: str) -> int:
        _check_split(split)
        return {"train": self.num_train, "validation": self.num_val, "test": self.num_test}[split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")


def _hash_int(text: str) -> int:
    # hashlib, not hash(): str hashes are salted per process
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(key: str) -> str:
    """The split a problem belongs to: sha256(key) mod 100, <90 train, 90-94 validation, else test."""
    bucket = _hash_int(key) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


Builder = Callable[[str, random.Random], Solution]  # (lang, rng for surface choices) -> Solution
Draw = tuple[str, Builder]  # key, builder

# ---------------------------------------------------------------------------------------------
# Samplers: draw operands within the difficulty knobs, return (key, builder). Keys sort the
# operands of symmetric problems so that 65 + 478 and 478 + 65 land in the same split.


def _number(rng: random.Random, max_digits: int, low: int = 0, ood: bool = False) -> int:
    """Pick the digit count uniformly first, so short and long operands are equally common.
    ood: exactly max_digits + 1 digits."""
    k = max_digits + 1 if ood else rng.randint(1, max_digits)
    return rng.randint(max(low, 10 ** (k - 1) if k > 1 else 0), 10**k - 1)


def _limit(rng: random.Random, low: int, limit: int, ood: bool) -> int:
    """An integer in [low, limit], or above the limit, in (limit, 2 * limit], out of distribution."""
    return rng.randint(limit + 1, 2 * limit) if ood else rng.randint(low, limit)


def ood_config(config: CorpusConfig) -> CorpusConfig:
    """The same kinds, languages and sizes with every operand beyond the training limits."""
    return dataclasses.replace(config, ood=True)


def _sorted_key(kind: str, a: int, b: int) -> str:
    return f"{kind}:{min(a, b)}:{max(a, b)}"


def _sample_add(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a, b = _number(rng, cfg.max_digits, ood=cfg.ood), _number(rng, cfg.max_digits, ood=cfg.ood)
    return _sorted_key("add", a, b), partial(build_add, a, b)


def _sample_sub(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a, b = _number(rng, cfg.max_digits, ood=cfg.ood), _number(rng, cfg.max_digits, ood=cfg.ood)
    return f"sub:{a}:{b}", partial(build_sub, a, b)


def _sample_mul(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a = _number(rng, cfg.max_digits, low=2, ood=cfg.ood)
    b = _number(rng, cfg.max_multiplier_digits, low=2, ood=cfg.ood)
    return _sorted_key("mul", a, b), partial(build_mul, a, b)


def _sample_compare(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a = _number(rng, cfg.max_digits, ood=cfg.ood)
    u = rng.random()
    if u < 0.05:
        b = a
    elif u < 0.55:  # same length, shared prefix: exercises the digit-by-digit comparison
        digits = list(str(a))
        i = rng.randrange(len(digits))
        lowest = 1 if i == 0 and len(digits) > 1 else 0
        digits[i] = str(rng.choice([d for d in range(lowest, 10) if d != int(digits[i])]))
        digits[i + 1 :] = [str(rng.randint(0, 9)) for _ in digits[i + 1 :]]
        b = int("".join(digits))
    else:
        b = _number(rng, cfg.max_digits, ood=cfg.ood)
    return _sorted_key("compare", a, b), partial(build_compare, a, b)


def _sample_gcd(rng: random.Random, cfg: CorpusConfig) -> Draw:
    # a common factor g makes the answer non-trivial far more often than two random numbers
    hi = 10 ** (cfg.max_digits + cfg.ood) - 1
    g = rng.randint(1, math.isqrt(hi))
    lo = (
        10**cfg.max_digits // g + 1 if cfg.ood else 1
    )  # ood: both numbers have max_digits + 1 digits
    m, n = rng.sample(range(lo, hi // g + 1), 2)
    a, b = g * m, g * n
    return _sorted_key("gcd", a, b), partial(build_gcd, a, b)


def _sample_price(rng: random.Random, cfg: CorpusConfig) -> Draw:
    variant = rng.choice(("total", "change", "unit"))
    price = _limit(rng, 1, cfg.max_rate, cfg.ood)
    qty = _limit(rng, 2, cfg.max_quantity, cfg.ood)
    paid = 0
    if variant == "change":  # pay with the next banknote above the total, sometimes the one after
        notes = [m * 10**e for e in range(12) for m in (1, 2, 5)]
        above = [v for v in notes if v > price * qty]
        paid = above[rng.random() < 0.3]
    return f"price:{variant}:{price}:{qty}:{paid}", partial(build_price, variant, price, qty, paid)


def _sample_rate(rng: random.Random, cfg: CorpusConfig) -> Draw:
    variant = rng.choice(("distance", "time", "work"))
    r1 = _limit(rng, 2, cfg.max_rate, cfg.ood)
    hours = _limit(rng, 1, cfg.max_quantity, cfg.ood)
    r2 = _limit(rng, 2, cfg.max_rate, cfg.ood) if variant == "work" else 0
    key_rates = f"{min(r1, r2)}:{max(r1, r2)}" if variant == "work" else f"{r1}:{r2}"
    return f"rate:{variant}:{key_rates}:{hours}", partial(build_rate, variant, r1, r2, hours)


def _sample_unit(rng: random.Random, cfg: CorpusConfig) -> Draw:
    pair = rng.choice(tuple(UNITS))
    to_small = rng.random() < 0.5
    digits = max(1, cfg.max_digits - 1)
    big = _number(rng, digits, low=1, ood=True) if cfg.ood else rng.randint(1, 10**digits - 1)
    rest = rng.randint(0, UNITS[pair][0] - 1) if to_small else 0
    direction = "to_small" if to_small else "to_big"
    return f"unit:{pair}:{direction}:{big}:{rest}", partial(build_unit, pair, to_small, big, rest)


def _sample_linear(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a = rng.choice((-1, 1)) * _limit(rng, 2, cfg.max_coef, cfg.ood)
    if cfg.ood:  # |x| and |b| beyond their training limits too
        x = rng.choice((-1, 1)) * _limit(rng, 0, cfg.max_coef, True)
        b = rng.choice((-1, 1)) * _limit(rng, 0, 10 * cfg.max_coef, True)
    else:
        x = rng.randint(-cfg.max_coef, cfg.max_coef)
        b = rng.randint(-10 * cfg.max_coef, 10 * cfg.max_coef)
    c = a * x + b
    return f"linear:{a}:{b}:{c}", partial(build_linear, a, b, c)


_SAMPLERS: dict[str, Callable[[random.Random, CorpusConfig], Draw]] = {
    "add": _sample_add,
    "sub": _sample_sub,
    "mul": _sample_mul,
    "compare": _sample_compare,
    "gcd": _sample_gcd,
    "price": _sample_price,
    "rate": _sample_rate,
    "unit": _sample_unit,
    "linear": _sample_linear,
}
assert set(_SAMPLERS) == set(KINDS)

# The local working of each builder's problem, from the builder's own arguments (+ lang)
_LOCAL_STEPS: dict[Callable, Callable[..., list[str]]] = {
    build_add: local.steps_add,
    build_sub: local.steps_sub,
    build_mul: local.steps_mul,
    build_compare: local.steps_compare,
    build_gcd: local.steps_gcd,
    build_price: local.steps_price,
    build_rate: local.steps_rate,
    build_unit: local.steps_unit,
    build_linear: local.steps_linear,
}


def build_problem(build: partial, lang: str, rng: random.Random, fmt: str) -> Solution:
    """(question, steps, answer) of a sampler's builder, the steps worked in `fmt`. The column
    builder always runs: it takes the surface choices (names, phrasing) from rng, so the draws,
    and with them every split's questions, are the same in both formats."""
    question, steps, answer = build(lang, rng)
    if fmt == "local":
        steps = _LOCAL_STEPS[build.func](*build.args, lang)
    return question, steps, answer


# ---------------------------------------------------------------------------------------------
# Public API


def generate(config: CorpusConfig, split: str) -> list[Problem]:
    """The split's problems, round-robin over kinds then languages, so every prefix is balanced.

    Candidates whose key hashes to another split, or that repeat a key already taken, are
    skipped; rejection happens on the key, before any text is built.
    """
    num = config.split_size(split)
    num_drills = round(num * config.drills) if split == "train" else 0
    num -= num_drills
    rng = random.Random(_hash_int(f"tinyreason-synthetic:{config.seed}:{split}"))
    seen: set[str] = set()
    problems = []
    num_kinds = len(config.kinds)
    for slot in range(num):
        kind = config.kinds[slot % num_kinds]
        lang = config.langs[(slot // num_kinds) % len(config.langs)]
        sample = _SAMPLERS[kind]
        for _ in range(_MAX_TRIES):
            key, build = sample(rng, config)
            if key not in seen and split_of(key) == split:
                break
        else:
            raise ValueError(
                f"ran out of distinct {kind!r} problems for split {split!r} after {len(problems)} "
                f"problems; lower the split size or raise max_digits / max_quantity / max_rate / max_coef"
            )
        seen.add(key)
        question, steps, answer = build_problem(build, lang, rng, config.format)
        problems.append(Problem(kind, lang, question, steps, answer, key))
    if num_drills:  # their own rng: the problems above are the same with drills on or off
        drng = random.Random(_hash_int(f"tinyreason-drills:{config.seed}"))
        drills = [
            Problem("drill", *drill)
            for drill in drill_problems.generate(drng, num_drills, config.langs, config.max_digits)
        ]
        problems = _interleave(problems, drills)
    return problems


def _interleave(a: list, b: list) -> list:
    """b spread evenly through a (a's order kept), so every prefix holds its share of b."""
    total = len(a) + len(b)
    out, i, j = [], 0, 0
    for n in range(total):
        if j < len(b) and (i >= len(a) or (j + 1) * total <= (n + 1) * len(b)):
            out.append(b[j])
            j += 1
        else:
            out.append(a[i])
            i += 1
    return out


_ANSWER_PREFIX = {"en": "Answer: ", "zh": "答案："}
ANSWER_LINE = re.compile(r"^[ \t]*(?:Answer|答案)[ \t]*[:：][ \t]*(.*?)[ \t]*$", re.MULTILINE)


def format_text(problem: Problem) -> str:
    steps = "\n".join(problem.steps)
    answer = _ANSWER_PREFIX[problem.lang] + problem.answer
    return f"{problem.question}\n<think>\n{steps}\n</think>\n{answer}"


def parse_answer(text: str) -> str | None:
    """The last "Answer:" / "答案：" line after the last </think> (anywhere if there is none)."""
    _, _, tail = text.rpartition("</think>")
    matches = ANSWER_LINE.findall(tail)
    if not matches:
        return None
    answer = matches[-1].rstrip("。.").strip()
    return answer or None


def _normalise(answer: str) -> str:
    # answers are numbers and relations, so spacing carries no meaning: "x=5" == "x = 5"
    return "".join(answer.split())


def check(problem: Problem, completion: str) -> bool:
    answer = parse_answer(completion)
    return answer is not None and _normalise(answer) == _normalise(problem.answer)
