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

from .templates import ITEMS, NAMES, PLACES, TEXT, UNITS, VEHICLES, WORD, WORKS

KINDS = ("add", "sub", "mul", "compare", "gcd", "price", "rate", "unit", "linear")
LANGS = ("en", "zh")
SPLITS = ("train", "validation", "test")
# Bump whenever a sampler or a template (templates.py) changes: cached corpora are keyed by
# fingerprint().
GENERATOR_VERSION = 2  # 2: column working for every multi-digit +, -, × (`_working`)
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


Solution = tuple[str, list[str], str]  # question, steps, answer
Builder = Callable[[str, random.Random], Solution]  # (lang, rng for surface choices) -> Solution
Draw = tuple[str, Builder]  # key, builder


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _digits(n: int) -> list[int]:
    """Decimal digits, units first."""
    return [int(c) for c in reversed(str(n))]


def _place_parts(n: int) -> list[int]:
    """Non-zero place-value parts, highest first: 4025 -> [4000, 20, 5]."""
    return [d * 10**i for i, d in reversed(list(enumerate(_digits(n)))) if d]


def _paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def _word(lang: str, template: str, answer: int, **fields: object) -> Solution:
    question, *steps = (t.format(answer=answer, **fields) for t in WORD[lang][template])
    worked = [line for step in steps[:-1] for line in (*_working(step, lang), step)]
    return question, [*worked, steps[-1]], str(answer)


# ---------------------------------------------------------------------------------------------
# Arithmetic with written-out columns


def _add_columns(a: int, b: int, lang: str) -> list[str]:
    """Column addition a + b (a, b >= 0) from the units, one line per column."""
    t, places = TEXT[lang], PLACES[lang]
    da, db = _digits(a), _digits(b)
    steps = []
    carry, width = 0, max(len(da), len(db))
    for i in range(width):
        col = [d[i] for d in (da, db) if i < len(d)]
        if len(col) == 1 and not carry:
            steps.append(t["only"].format(place=places[i], d=col[0]))
            continue
        total = sum(col) + carry
        expr = " + ".join(map(str, col)) + (t["add.carried"] if carry else "")
        carry = total // 10
        line = t["add.col"].format(place=places[i], expr=expr, total=total, digit=total % 10)
        steps.append(line + (t["add.carry"] if carry else ""))
    if carry:
        steps.append(t["add.last"].format(place=places[width]))
    return steps


def _build_add(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    steps = [t["add.intro"], *_add_columns(a, b, lang)]
    steps.append(t["so"].format(fact=f"{a} + {b} = {a + b}"))
    return t[rng.choice(("add.q", "add.q2"))].format(a=a, b=b), steps, str(a + b)


def _mul_digit_columns(a: int, d: int, lang: str) -> list[str]:
    """a × d (one digit) from the units, one line per digit of a; the last writes all it has."""
    t, places = TEXT[lang], PLACES[lang]
    lines, carry = [t["mul.by"].format(a=a, d=d)], 0
    digits = _digits(a)
    for i, x in enumerate(digits):
        total = x * d + carry
        expr = f"{x} × {d}" + (t["mul.carried"].format(c=carry) if carry else "")
        last = i == len(digits) - 1
        digit = total if last else total % 10
        carry = 0 if last else total // 10
        line = t["mul.col"].format(place=places[i], expr=expr, total=total, digit=digit)
        lines.append(line + (t["mul.carry"].format(c=carry) if carry else ""))
    return lines


def _long_multiplication(a: int, b: int, lang: str) -> list[str]:
    """Working for a × b (a, b >= 2): b's digits one by one, then the partial products added."""
    t = TEXT[lang]
    if b < 10:
        return _mul_digit_columns(a, b, lang)
    lines = [t["mul.partial"].format(a=a, b=b)]
    partials = []
    for k, d in enumerate(_digits(b)):
        if d == 0:
            continue
        if d > 1:
            lines += _mul_digit_columns(a, d, lang)
        fact = f"{a} × {d} = {a * d}"
        if k:
            left = f"{a} × {d * 10**k}"
            lines.append(t["mul.shift"].format(fact=fact, left=left, product=a * d * 10**k))
        else:
            lines.append(fact)
        partials.append(a * d * 10**k)
    total = partials[0]
    for p in partials[1:]:
        lines.append(t["add.sum"].format(a=total, b=p))
        lines += _add_columns(total, p, lang)
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    return lines


_FACT = re.compile(r"(?<![\d.(-])(\d+) ([×+-]) (\d+) = (-?\d+)(?![\d.])")


def _working(step: str, lang: str) -> list[str]:
    """The column working that derives the multi-digit +, -, × facts written in a step, so that
    every line of a solution is one digit-level operation or a copy (none done "in the head").
    Facts that do not hold as written (parts of longer expressions) are left alone; × by 10^k is
    a shift and needs no working."""
    t, lines = TEXT[lang], []
    for a, op, b, c in _FACT.findall(step):
        a, b, c = int(a), int(b), int(c)
        if op == "+" and a + b == c and min(a, b) >= 10:
            lines += [t["add.sum"].format(a=a, b=b), *_add_columns(a, b, lang)]
        elif op == "-" and a - b == c and min(a, b) >= 10:  # a < b: the working of b - a
            top, bottom = max(a, b), min(a, b)
            lines += [t["sub.diff"].format(a=top, b=bottom), *_sub_columns(top, bottom, lang)]
        elif op == "×" and a * b == c and min(a, b) >= 2 and max(a, b) >= 10:
            if "1" in (str(a).rstrip("0"), str(b).rstrip("0")):
                continue  # × 10, × 100, × 1000: a shift
            big, small = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
            lines += _long_multiplication(big, small, lang)
    return lines


def _sub_columns(top: int, bottom: int, lang: str) -> list[str]:
    """Column subtraction top - bottom (top >= bottom >= 0), borrowing from the next place."""
    t, places = TEXT[lang], PLACES[lang]
    dt, db = _digits(top), _digits(bottom)
    lines, borrow = [], 0
    for i, d in enumerate(dt):
        low = d - borrow  # -1 when a 0 has lent; -1 + 10 = 9 is still right
        sub = db[i] if i < len(db) else None
        parts = [t["sub.lent"].format(d=d, low=low)] if borrow else []
        if low < (sub or 0):
            assert i + 1 < len(dt), "top >= bottom, so the highest column never borrows"
            sub, high = sub or 0, low + 10
            fields = dict(low=low, sub=sub, next=places[i + 1], high=high, diff=high - sub)
            parts.append(t["sub.borrow"].format(**fields))
            digit, borrow = high - sub, 1
        else:
            if sub is not None:
                parts.append(f"{low} - {sub} = {low - sub}")
            digit, borrow = low - (sub or 0), 0
        if parts:
            lines.append(
                t["sub.col"].format(place=places[i], body=t["sub.sep"].join(parts), digit=digit)
            )
        else:
            lines.append(t["only"].format(place=places[i], d=d))
    return lines


def _build_sub(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    steps = [t["sub.neg"].format(a=a, b=b)] if a < b else []
    steps.append(t["sub.intro"])
    steps += _sub_columns(max(a, b), min(a, b), lang)
    if a < b:
        steps.append(t["sub.negso"].format(fact=f"{b} - {a} = {b - a}", a=a, b=b, diff=a - b))
    else:
        steps.append(t["so"].format(fact=f"{a} - {b} = {a - b}"))
    return t[rng.choice(("sub.q", "sub.q2"))].format(a=a, b=b), steps, str(a - b)


def _build_mul(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    """a × b by partial products: split b by place value, or a when b is a single digit."""
    t = TEXT[lang]
    split, other = (a, b) if b < 10 else (b, a)
    parts = _place_parts(split)
    steps = []
    if len(parts) > 1:
        steps.append(t["mul.split"].format(n=split, parts=" + ".join(map(str, parts))))
    for part in parts:
        if split == a:
            if b > 1 and part >= 10 and str(part).rstrip("0") != "1":
                lead = int(str(part)[0])  # 4000 × 7: 4 × 7, then shift
                steps.append(
                    t["mul.shift"].format(
                        fact=f"{lead} × {b} = {lead * b}", left=f"{part} × {b}", product=part * b
                    )
                )
            else:
                steps.append(f"{part} × {b} = {part * b}")
        elif part < 10:
            steps += _mul_digit_columns(a, part, lang) if part > 1 else []
            steps.append(f"{a} × {part} = {a * part}")
        else:  # a × 30: a × 3, then shift one place
            digit = int(str(part)[0])
            steps += _mul_digit_columns(a, digit, lang) if digit > 1 else []
            fact = f"{a} × {digit} = {a * digit}"
            steps.append(t["mul.shift"].format(fact=fact, left=f"{a} × {part}", product=a * part))
    products = [part * other for part in parts]
    total = products[0]
    for p in products[1:]:  # the partial products, added column by column
        steps.append(t["add.sum"].format(a=total, b=p))
        steps += _add_columns(total, p, lang)
        steps.append(f"{total} + {p} = {total + p}")
        total += p
    steps.append(t["so"].format(fact=f"{a} × {b} = {a * b}"))
    return t[rng.choice(("mul.q", "mul.q2"))].format(a=a, b=b), steps, str(a * b)


def _build_compare(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    rel = ">" if a > b else "<" if a < b else "="
    answer = f"{a} {rel} {b}"
    sa, sb = str(a), str(b)
    la, lb = (t["cmp.digit"] if len(s) == 1 else t["cmp.digits"].format(n=len(s)) for s in (sa, sb))
    if len(sa) != len(sb):
        steps = [t["cmp.len"].format(a=a, b=b, la=la, lb=lb), t["cmp.more"].format(answer=answer)]
        return t["cmp.q"].format(a=a, b=b), steps, answer
    steps = [t["cmp.same"].format(la=la)]
    for i, (x, y) in enumerate(zip(sa, sb, strict=True)):
        place = PLACES[lang][len(sa) - 1 - i]
        if x != y:
            r = ">" if x > y else "<"
            steps.append(t["cmp.diff"].format(place=place, x=x, y=y, r=r, answer=answer))
            break
        steps.append(t["cmp.eq"].format(place=place, x=x, y=y))
    else:
        steps.append(t["cmp.all"].format(answer=answer))
    return t["cmp.q"].format(a=a, b=b), steps, answer


def _build_gcd(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    steps = [t["gcd.intro"]]
    x, y = max(a, b), min(a, b)
    while y:
        q, r = divmod(x, y)
        steps.append(t["gcd.step"].format(x=x, y=y, q=q, r=r))
        x, y = y, r
    steps.append(t["gcd.done"].format(g=x))
    return t["gcd.q"].format(a=a, b=b), steps, str(x)


def _build_linear(a: int, b: int, c: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    x = (c - b) // a
    assert a * x + b == c, "the sampler only makes integer solutions"
    plus_b = f" + {b}" if b > 0 else f" - {-b}" if b < 0 else ""
    steps = []
    if b > 0:
        steps.append(t["lin.sub"].format(b=b, fact=f"{a}x = {c} - {b} = {c - b}"))
    elif b < 0:
        steps.append(t["lin.add"].format(b=-b, fact=f"{a}x = {c} + {-b} = {c - b}"))
    steps.append(t["lin.div"].format(a=a, fact=f"x = {c - b} ÷ {_paren(a)} = {x}"))
    steps.append(t["lin.check"].format(fact=f"{a} × {_paren(x)}{plus_b} = {c}"))
    return t["lin.q"].format(lhs=f"{a}x{plus_b}", c=c), steps, f"x = {x}"


# ---------------------------------------------------------------------------------------------
# Word problems: surface choices (names, items) come from rng, the numbers from the key


def _build_price(
    variant: str, price: int, qty: int, paid: int, lang: str, rng: random.Random
) -> Solution:
    one, many, noun, mw = rng.choice(ITEMS)
    total = price * qty
    answer = {"total": total, "change": paid - total, "unit": price}[variant]
    amounts = dict(price=price, qty=qty, total=total, paid=paid, change=paid - total)
    dollars = {f"{k}_d": _count(v, "dollar", "dollars") for k, v in amounts.items()}
    names = dict(one=one, many=many, noun=noun, mw=mw, name=rng.choice(NAMES[lang]))
    return _word(lang, f"price.{variant}", answer, **amounts, **dollars, **names)


def _build_rate(
    variant: str, r1: int, r2: int, hours: int, lang: str, rng: random.Random
) -> Solution:
    """distance / time: speed r1 for `hours`; work: rates r1 and r2 together for `hours`."""
    fields: dict[str, object] = dict(hours=hours, hours_d=_count(hours, "hour", "hours"))
    if variant == "work":
        verb, things, verb_zh, noun, mw = rng.choice(WORKS)
        name, name2 = rng.sample(NAMES[lang], 2)
        fields |= dict(
            verb=verb, things=things, verb_zh=verb_zh, noun=noun, mw=mw, name=name, name2=name2
        )
        fields |= dict(r1=r1, r2=r2, both=r1 + r2, job=(r1 + r2) * hours)
        return _word(lang, "rate.work", hours, **fields)
    vehicle, vehicle_zh = rng.choice(VEHICLES)
    fields |= dict(vehicle=vehicle, vehicle_zh=vehicle_zh, speed=r1, dist=r1 * hours)
    return _word(lang, f"rate.{variant}", r1 * hours if variant == "distance" else hours, **fields)


def _build_unit(
    pair: str, to_small: bool, big: int, rest: int, lang: str, rng: random.Random
) -> Solution:
    """to_small: `big` big units and `rest` small ones -> small units; else big * factor small -> big."""
    factor, big1, bigs, small1, smalls, big_zh, small_zh = UNITS[pair]
    small = big * factor
    big_d = _count(big, big1, bigs)
    amount = big_d + (f" {_count(rest, small1, smalls)}" if rest else "")
    amount_zh = f"{big} {big_zh}" + (f" {rest} {small_zh}" if rest else "")
    fields = dict(
        factor=factor, big1=big1, bigs=bigs, smalls=smalls, big_zh=big_zh, small_zh=small_zh
    )
    fields |= dict(big=big, big_d=big_d, small=small, rest=rest, amount=amount, amount_zh=amount_zh)
    if not to_small:
        return _word(lang, "unit.to_big", big, **fields)
    return _word(lang, "unit.to_small" if rest else "unit.to_small_whole", small + rest, **fields)


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
    return _sorted_key("add", a, b), partial(_build_add, a, b)


def _sample_sub(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a, b = _number(rng, cfg.max_digits, ood=cfg.ood), _number(rng, cfg.max_digits, ood=cfg.ood)
    return f"sub:{a}:{b}", partial(_build_sub, a, b)


def _sample_mul(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a = _number(rng, cfg.max_digits, low=2, ood=cfg.ood)
    b = _number(rng, cfg.max_multiplier_digits, low=2, ood=cfg.ood)
    return _sorted_key("mul", a, b), partial(_build_mul, a, b)


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
    return _sorted_key("compare", a, b), partial(_build_compare, a, b)


def _sample_gcd(rng: random.Random, cfg: CorpusConfig) -> Draw:
    # a common factor g makes the answer non-trivial far more often than two random numbers
    hi = 10 ** (cfg.max_digits + cfg.ood) - 1
    g = rng.randint(1, math.isqrt(hi))
    lo = (
        10**cfg.max_digits // g + 1 if cfg.ood else 1
    )  # ood: both numbers have max_digits + 1 digits
    m, n = rng.sample(range(lo, hi // g + 1), 2)
    a, b = g * m, g * n
    return _sorted_key("gcd", a, b), partial(_build_gcd, a, b)


def _sample_price(rng: random.Random, cfg: CorpusConfig) -> Draw:
    variant = rng.choice(("total", "change", "unit"))
    price = _limit(rng, 1, cfg.max_rate, cfg.ood)
    qty = _limit(rng, 2, cfg.max_quantity, cfg.ood)
    paid = 0
    if variant == "change":  # pay with the next banknote above the total, sometimes the one after
        notes = [m * 10**e for e in range(12) for m in (1, 2, 5)]
        above = [v for v in notes if v > price * qty]
        paid = above[rng.random() < 0.3]
    return f"price:{variant}:{price}:{qty}:{paid}", partial(_build_price, variant, price, qty, paid)


def _sample_rate(rng: random.Random, cfg: CorpusConfig) -> Draw:
    variant = rng.choice(("distance", "time", "work"))
    r1 = _limit(rng, 2, cfg.max_rate, cfg.ood)
    hours = _limit(rng, 1, cfg.max_quantity, cfg.ood)
    r2 = _limit(rng, 2, cfg.max_rate, cfg.ood) if variant == "work" else 0
    key_rates = f"{min(r1, r2)}:{max(r1, r2)}" if variant == "work" else f"{r1}:{r2}"
    return f"rate:{variant}:{key_rates}:{hours}", partial(_build_rate, variant, r1, r2, hours)


def _sample_unit(rng: random.Random, cfg: CorpusConfig) -> Draw:
    pair = rng.choice(tuple(UNITS))
    to_small = rng.random() < 0.5
    digits = max(1, cfg.max_digits - 1)
    big = _number(rng, digits, low=1, ood=True) if cfg.ood else rng.randint(1, 10**digits - 1)
    rest = rng.randint(0, UNITS[pair][0] - 1) if to_small else 0
    direction = "to_small" if to_small else "to_big"
    return f"unit:{pair}:{direction}:{big}:{rest}", partial(_build_unit, pair, to_small, big, rest)


def _sample_linear(rng: random.Random, cfg: CorpusConfig) -> Draw:
    a = rng.choice((-1, 1)) * _limit(rng, 2, cfg.max_coef, cfg.ood)
    if cfg.ood:  # |x| and |b| beyond their training limits too
        x = rng.choice((-1, 1)) * _limit(rng, 0, cfg.max_coef, True)
        b = rng.choice((-1, 1)) * _limit(rng, 0, 10 * cfg.max_coef, True)
    else:
        x = rng.randint(-cfg.max_coef, cfg.max_coef)
        b = rng.randint(-10 * cfg.max_coef, 10 * cfg.max_coef)
    c = a * x + b
    return f"linear:{a}:{b}:{c}", partial(_build_linear, a, b, c)


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


# ---------------------------------------------------------------------------------------------
# Public API


def generate(config: CorpusConfig, split: str) -> list[Problem]:
    """The split's problems, round-robin over kinds then languages, so every prefix is balanced.

    Candidates whose key hashes to another split, or that repeat a key already taken, are
    skipped; rejection happens on the key, before any text is built.
    """
    num = config.split_size(split)
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
        question, steps, answer = build(lang, rng)
        problems.append(Problem(kind, lang, question, steps, answer, key))
    return problems


_ANSWER_PREFIX = {"en": "Answer: ", "zh": "答案："}
_ANSWER_LINE = re.compile(r"^[ \t]*(?:Answer|答案)[ \t]*[:：][ \t]*(.*?)[ \t]*$", re.MULTILINE)


def format_text(problem: Problem) -> str:
    steps = "\n".join(problem.steps)
    answer = _ANSWER_PREFIX[problem.lang] + problem.answer
    return f"{problem.question}\n<think>\n{steps}\n</think>\n{answer}"


def parse_answer(text: str) -> str | None:
    """The last "Answer:" / "答案：" line after the last </think> (anywhere if there is none)."""
    _, _, tail = text.rpartition("</think>")
    matches = _ANSWER_LINE.findall(tail)
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
