"""Worked solutions of the synthetic corpus: operands -> question, <think> steps, final answer.

One builder per kind (`synthetic.py` draws the operands and the key, then calls it). A builder takes
only surface choices from its rng (the question's phrasing, names, items, vehicles), never a number.
Multi-digit +, -, × are worked out column by column (`working.py`); the words are in templates.py.
"""

from __future__ import annotations

import random

from .templates import ITEMS, NAMES, PLACES, TEXT, UNITS, VEHICLES, WORD, WORKS
from .working import add_columns, digits, mul_digit_columns, sub_columns, working

Solution = tuple[str, list[str], str]  # question, steps, answer


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _place_parts(n: int) -> list[int]:
    """Non-zero place-value parts, highest first: 4025 -> [4000, 20, 5]."""
    return [d * 10**i for i, d in reversed(list(enumerate(digits(n)))) if d]


def _paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def _word(lang: str, template: str, answer: int, **fields: object) -> Solution:
    question, *steps = (t.format(answer=answer, **fields) for t in WORD[lang][template])
    worked = [line for step in steps[:-1] for line in (*working(step, lang), step)]
    return question, [*worked, steps[-1]], str(answer)


# ---------------------------------------------------------------------------------------------
# Arithmetic


def build_add(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    steps = [t["add.intro"], *add_columns(a, b, lang)]
    steps.append(t["so"].format(fact=f"{a} + {b} = {a + b}"))
    return t[rng.choice(("add.q", "add.q2"))].format(a=a, b=b), steps, str(a + b)


def build_sub(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    steps = [t["sub.neg"].format(a=a, b=b)] if a < b else []
    steps.append(t["sub.intro"])
    steps += sub_columns(max(a, b), min(a, b), lang)
    if a < b:
        steps.append(t["sub.negso"].format(fact=f"{b} - {a} = {b - a}", a=a, b=b, diff=a - b))
    else:
        steps.append(t["so"].format(fact=f"{a} - {b} = {a - b}"))
    return t[rng.choice(("sub.q", "sub.q2"))].format(a=a, b=b), steps, str(a - b)


def build_mul(a: int, b: int, lang: str, rng: random.Random) -> Solution:
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
            steps += mul_digit_columns(a, part, lang) if part > 1 else []
            steps.append(f"{a} × {part} = {a * part}")
        else:  # a × 30: a × 3, then shift one place
            digit = int(str(part)[0])
            steps += mul_digit_columns(a, digit, lang) if digit > 1 else []
            fact = f"{a} × {digit} = {a * digit}"
            steps.append(t["mul.shift"].format(fact=fact, left=f"{a} × {part}", product=a * part))
    products = [part * other for part in parts]
    total = products[0]
    for p in products[1:]:  # the partial products, added column by column
        steps.append(t["add.sum"].format(a=total, b=p))
        steps += add_columns(total, p, lang)
        steps.append(f"{total} + {p} = {total + p}")
        total += p
    steps.append(t["so"].format(fact=f"{a} × {b} = {a * b}"))
    return t[rng.choice(("mul.q", "mul.q2"))].format(a=a, b=b), steps, str(a * b)


def build_compare(a: int, b: int, lang: str, rng: random.Random) -> Solution:
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


def build_gcd(a: int, b: int, lang: str, rng: random.Random) -> Solution:
    t = TEXT[lang]
    steps = [t["gcd.intro"]]
    x, y = max(a, b), min(a, b)
    while y:
        q, r = divmod(x, y)
        steps.append(t["gcd.step"].format(x=x, y=y, q=q, r=r))
        x, y = y, r
    steps.append(t["gcd.done"].format(g=x))
    return t["gcd.q"].format(a=a, b=b), steps, str(x)


def build_linear(a: int, b: int, c: int, lang: str, rng: random.Random) -> Solution:
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


def build_price(
    variant: str, price: int, qty: int, paid: int, lang: str, rng: random.Random
) -> Solution:
    one, many, noun, mw = rng.choice(ITEMS)
    total = price * qty
    answer = {"total": total, "change": paid - total, "unit": price}[variant]
    amounts = dict(price=price, qty=qty, total=total, paid=paid, change=paid - total)
    dollars = {f"{k}_d": _count(v, "dollar", "dollars") for k, v in amounts.items()}
    names = dict(one=one, many=many, noun=noun, mw=mw, name=rng.choice(NAMES[lang]))
    return _word(lang, f"price.{variant}", answer, **amounts, **dollars, **names)


def build_rate(
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


def build_unit(
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
