"""Working: the written-out column arithmetic inside the <think> solutions of the corpus.

Every multi-digit +, - and × of a solution is derived on the lines before it, one digit-level
operation per line (a column of a sum or a difference, one digit of a product, a carry or a borrow),
so that nothing is done "in the head". The builders (`solutions.py`) call the column helpers
directly; `working` writes the working for the facts a step of a word problem states. The words
come from templates.py.
"""

from __future__ import annotations

import re

from .templates import PLACES, TEXT


def digits(n: int) -> list[int]:
    """Decimal digits, units first."""
    return [int(c) for c in reversed(str(n))]


def add_columns(a: int, b: int, lang: str) -> list[str]:
    """Column addition a + b (a, b >= 0) from the units, one line per column."""
    t, places = TEXT[lang], PLACES[lang]
    da, db = digits(a), digits(b)
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


def sub_columns(top: int, bottom: int, lang: str) -> list[str]:
    """Column subtraction top - bottom (top >= bottom >= 0), borrowing from the next place."""
    t, places = TEXT[lang], PLACES[lang]
    dt, db = digits(top), digits(bottom)
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


def mul_digit_columns(a: int, d: int, lang: str) -> list[str]:
    """a × d (one digit) from the units, one line per digit of a; the last writes all it has."""
    t, places = TEXT[lang], PLACES[lang]
    lines, carry = [t["mul.by"].format(a=a, d=d)], 0
    da = digits(a)
    for i, x in enumerate(da):
        total = x * d + carry
        expr = f"{x} × {d}" + (t["mul.carried"].format(c=carry) if carry else "")
        last = i == len(da) - 1
        digit = total if last else total % 10
        carry = 0 if last else total // 10
        line = t["mul.col"].format(place=places[i], expr=expr, total=total, digit=digit)
        lines.append(line + (t["mul.carry"].format(c=carry) if carry else ""))
    return lines


def long_multiplication(a: int, b: int, lang: str) -> list[str]:
    """Working for a × b (a, b >= 2): b's digits one by one, then the partial products added."""
    t = TEXT[lang]
    if b < 10:
        return mul_digit_columns(a, b, lang)
    lines = [t["mul.partial"].format(a=a, b=b)]
    partials = []
    for k, d in enumerate(digits(b)):
        if d == 0:
            continue
        if d > 1:
            lines += mul_digit_columns(a, d, lang)
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
        lines += add_columns(total, p, lang)
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    return lines


_FACT = re.compile(r"(?<![\d.(-])(\d+) ([×+-]) (\d+) = (-?\d+)(?![\d.])")


def working(step: str, lang: str) -> list[str]:
    """The column working that derives the multi-digit +, -, × facts written in a step, so that
    every line of a solution is one digit-level operation or a copy (none done "in the head").
    Facts that do not hold as written (parts of longer expressions) are left alone; × by 10^k is
    a shift and needs no working."""
    t, lines = TEXT[lang], []
    for a, op, b, c in _FACT.findall(step):
        a, b, c = int(a), int(b), int(c)
        if op == "+" and a + b == c and min(a, b) >= 10:
            lines += [t["add.sum"].format(a=a, b=b), *add_columns(a, b, lang)]
        elif op == "-" and a - b == c and min(a, b) >= 10:  # a < b: the working of b - a
            top, bottom = max(a, b), min(a, b)
            lines += [t["sub.diff"].format(a=top, b=bottom), *sub_columns(top, bottom, lang)]
        elif op == "×" and a * b == c and min(a, b) >= 2 and max(a, b) >= 10:
            if "1" in (str(a).rstrip("0"), str(b).rstrip("0")):
                continue  # × 10, × 100, × 1000: a shift
            big, small = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
            lines += long_multiplication(big, small, lang)
    return lines
