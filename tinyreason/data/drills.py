"""Digit drills (`data.corpus.drills`): the lookups of the local working, as short problems of
their own with checkable answers, in the training split only.

    copy      Copy 4521.                          -> 4521
    rest      Drop the last digit of 4521.        -> 452     (what every working line restates)
    last      The last digit of 4521?             -> 1       (the digit each line works on)
    reverse   Reverse 4521.                       -> 1254    (4521|1, 452|12, ...: the running
                                                              result carried forward line by line)
    column    7+8+1 = ?  /  12-3-1 = ?  /  7×8+3 = ?   (one column step)

Their working lines are tight (no spaces), like the local working's (`local.tight`).
"""

from __future__ import annotations

import random

DRILLS = ("copy", "rest", "last", "reverse", "column")

_Q = {
    "en": {
        "copy": "Copy {n}.",
        "rest": "Drop the last digit of {n}.",
        "last": "What is the last digit of {n}?",
        "reverse": "Reverse the digits of {n}.",
        "column": "Compute {expr}.",
    },
    "zh": {
        "copy": "抄写 {n}。",
        "rest": "去掉 {n} 的最后一位。",
        "last": "{n} 的最后一位是几？",
        "reverse": "把 {n} 的各位倒过来写。",
        "column": "计算：{expr}。",
    },
}


def _drill(kind: str, rng: random.Random, max_digits: int) -> tuple[str, list[str], str]:
    """(question field, steps, answer) of one drill."""
    if kind == "column":
        op = rng.choice("+-×")
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        if op == "+":
            c = rng.randint(0, 1)
            expr, value = f"{x}+{y}+{c}", x + y + c
        elif op == "-":
            c = rng.randint(0, 1)
            x += 10 * (x < y + c)
            expr, value = f"{x}-{y}-{c}", x - y - c
        else:
            c = rng.randint(0, 8)
            expr, value = f"{x}×{y}+{c}", x * y + c
        return expr, [f"{expr}={value}"], str(value)
    n = str(
        rng.randint(10 ** (k - 1) if (k := rng.randint(2, max_digits + 1)) > 1 else 0, 10**k - 1)
    )
    if kind == "copy":
        return n, [n], n
    if kind == "rest":
        return n, [f"{n}|{n[:-1]}"], n[:-1]
    if kind == "last":
        return n, [f"{n}|{n[-1]}"], n[-1]
    steps, out = [], ""
    for i in range(len(n), 0, -1):
        out += n[i - 1]
        steps.append(f"{n[:i]}|{out}")
    return n, steps, out


Drill = tuple[str, str, list[str], str, str]  # lang, question, steps, answer, key


def generate(rng: random.Random, num: int, langs: tuple[str, ...], max_digits: int) -> list[Drill]:
    """`num` drills, round-robin over the drill kinds, then languages."""
    problems = []
    for i in range(num):
        kind = DRILLS[i % len(DRILLS)]
        lang = langs[(i // len(DRILLS)) % len(langs)]
        value, steps, answer = _drill(kind, rng, max_digits)
        field = "expr" if kind == "column" else "n"
        question = _Q[lang][kind].format(**{field: value})
        problems.append((lang, question, steps, answer, f"drill:{kind}:{value}"))
    return problems
