"""The local solution format (`CorpusConfig(format="local")`, generator v3) and the digit drills.

Checked on every problem of small train / validation / test corpora and of their OOD counterpart,
in both languages. The corpus writes the working lines without spaces (`local.tight`:
"62+21|2+1+0=3|35"), the routines called directly write them spaced; the line shapes below parse
both, and the checks run on both:

* arithmetic: every working line of add, sub, mul-by-digit, long division and compare is recomputed
  from its own digits and from the line above (carry, borrow, remainder, running result); each
  routine runs exactly until nothing is left and closes with "= N", its running result; every
  equation line ("594 × 37 = 594 × 7 + 5940 × 3", "4884 = 1 × 2706 + 2178", "-5 - (-20) = -5 + 20")
  holds, and the one-liners done "in the head" are only shifts and × 0 / × 1;
* locality: each number a working line copies is found on the same line, on the line directly
  above, or (first line of a routine) in the question or an earlier line; the checker flags
  deliberately broken solutions;
* the local and column formats pose the same problems with the same answers, the local working ends
  on that answer, and the column format is still generator v2's output (pinned digest);
* drills: training split only, spread evenly, the other problems unchanged, right answers;
* the corpus working lines hold no space, the words lines keep theirs;
* config validation, GENERATOR_VERSION and the fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from fractions import Fraction

import pytest

from tinyreason.data import drills, local, synthetic
from tinyreason.data.synthetic import CorpusConfig, Problem
from tinyreason.data.templates import UNITS

SMALL = CorpusConfig(num_train=900, num_val=90, num_test=180)
CONFIGS = {"in": SMALL, "ood": synthetic.ood_config(SMALL)}

# --- line shapes of local.py ------------------------------------------------------------------

# The routines (local.add, ...) write spaced lines ("62 + 21 | 2 + 1 + 0 = 3 | 35"); the builders of
# the corpus (local.steps_*) pass the working lines through local.tight, which removes every space
# ("62+21|2+1+0=3|35", "156÷17=9r3|4|09", "x=-4"). The shapes below are written spaced and accept
# each of those spaces as optional (`_shape`), so they parse both; the words lines keep theirs.


def _shape(spaced: str) -> re.Pattern:
    """A line shape written with single spaces, each of them optional."""
    assert "  " not in spaced and "[" not in spaced, spaced  # no space inside a character class
    return re.compile(spaced.replace(" ", " ?"))


EQ = re.compile(r" ?= ?")  # the "=" of a line, spaced or tight

# the working lines of a routine: one regex per routine, one role per group (how the number is
# sourced, for the locality checker; None: not a number)
WORKING = {
    "add": _shape(r"(\d+) \+ (\d+) \| (\d) \+ (\d) \+ (\d) = (\d+) \| (\d+)"),
    "sub": _shape(r"(\d+) - (\d+) \| (\d+) - (\d) - (\d) = (\d+) \| (\d+)"),
    "mul": _shape(r"(\d+) × (\d) \| (\d) × (\d) \+ (\d+) = (\d+) \| (\d+)"),
    "div": _shape(r"(\d+) ÷ (\d+) = (\d+) r (\d+) \| (\d+|\.) \| (\d+)"),
    "cmp": _shape(r"(\d+) \? (\d+) \| (\d) (<|>|=) (\d)"),
}
ROLES = {  # operands restated | digits used | carry / borrow | computed | running result
    "add": ("shrink", "shrink", "digit", "digit", "carry", "computed", "grow"),
    "sub": ("shrink", "shrink", "borrowed", "digit", "carry", "computed", "grow"),
    "mul": ("shrink", "same", "digit", "digit", "carry", "computed", "grow"),
    "div": ("bring", "same", "computed", "computed", "drop_first", "append"),
    "cmp": ("drop_first", "drop_first", "first_digit", None, "first_digit"),
}
RESULT = _shape(r"= (-?\d+)(?: r (\d+))?")  # closes add / sub / mul ("= N") and div ("= Q r R")
CMP_RESULT = _shape(r"= (\d+) (<|>|=) (\d+)")  # "= 7 < 123", "=5441=5441"
CMP_PAD = _shape(r"(\d+) \? (\d+) = (\d+) \? (\d+)")  # "7 ? 123 = 007 ? 123"
DIV_HEAD = _shape(r"(\d+) ÷ (\d+)")
GCD_LINE = _shape(r"(\d+) = (\d+) × (\d+) \+ (\d+)")
# sign lines, mul headers, one-liners ("-37 - 25 = -(37 + 25)", "551×49=551×9+5510×4")
EQUATION = re.compile(r"[-\d ()+×÷]+ ?= ?[-\d ()+×÷]+")
ONE_MUL = _shape(r"(\d+) × (\d+) = (\d+)")
ONE_DIV = _shape(r"(\d+) ÷ (\d+) = (\d+)")
X_LINE = _shape(r"x = (-?\d+)")
# constants a line may write without a source: "nothing left" / "no carry", "1 hour = 60 minutes"
CONSTANTS = {"0", "1", *(str(u[0]) for u in UNITS.values())}


def _template(template: str) -> re.Pattern:
    """A WORDS template as a regex, each {field} any text."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append("(.+?)")
    return re.compile("".join(parts))


WORD_LINES = {lang: [_template(t) for t in words.values()] for lang, words in local.WORDS.items()}


def classify(line: str, lang: str) -> tuple[str, re.Match | None]:
    """(shape, match) of one line of a local solution; ("unknown", None) if it has no known shape."""
    for shape, regex in WORKING.items():
        if m := regex.fullmatch(line):
            return shape, m
    for shape, regex in (
        ("result", RESULT),
        ("cmp_result", CMP_RESULT),
        ("cmp_pad", CMP_PAD),
        ("div_head", DIV_HEAD),
        ("gcd", GCD_LINE),
        ("equation", EQUATION),
        ("x", X_LINE),
    ):
        if m := regex.fullmatch(line):
            return shape, m
    for regex in WORD_LINES[lang]:
        if m := regex.fullmatch(line):
            return "words", m
    return "unknown", None


def numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def routines(steps: list[str], lang: str) -> list[tuple[str, int, list[tuple[str, ...]]]]:
    """(shape, index of the first line, groups of each line) of each run of working lines."""
    runs: list[tuple[str, int, list[tuple[str, ...]]]] = []
    prev = None
    for i, line in enumerate(steps):
        shape, m = classify(line, lang)
        if shape in WORKING:
            if shape != prev:
                runs.append((shape, i, []))
            runs[-1][2].append(m.groups())
        prev = shape
    return runs


def _evaluate(expr: str) -> Fraction:
    """An expression of integers, + - × ÷ and parentheses, exactly."""
    code = re.sub(r"\d+", lambda m: f"F({m.group()})", expr.replace("×", "*").replace("÷", "/"))
    return eval(code, {"__builtins__": {}, "F": Fraction})  # only digits, operators, F(...)


def _power_of_ten(n: int) -> bool:
    return n >= 1 and str(n).rstrip("0") == "1"


# --- arithmetic -------------------------------------------------------------------------------


def _add_rows(rows) -> list[str]:
    errors, prev = [], None
    for row in rows:
        a, b, x, y, c, t, out = row
        if (x, y) != (a[-1], b[-1]):
            errors.append(f"{x}, {y} are not the last digits of {a}, {b}")
        if int(t) != int(x) + int(y) + int(c):
            errors.append(f"{x} + {y} + {c} != {t}")
        if prev is None:
            if c != "0" or out != t[-1]:
                errors.append(f"first line: carry {c} != 0 or result {out} != {t[-1]}")
        else:
            pa, pb, _, _, _, pt, pout = prev
            if (a, b) != (pa[:-1] or "0", pb[:-1] or "0"):
                errors.append(f"{a} + {b} is not {pa} + {pb} without the last digits")
            if int(c) != int(pt) // 10:
                errors.append(f"carry {c} is not the tens of {pt}")
            if out != t[-1] + pout:
                errors.append(f"running sum {out} != {t[-1]} + {pout!r}")
        done = len(a) == 1 and len(b) == 1 and int(t) < 10
        if done != (row is rows[-1]):
            errors.append(
                f"{a} + {b} with sum {t}: the routine should {'stop' if done else 'go on'}"
            )
        prev = row
    return errors


def _sub_rows(rows) -> list[str]:
    errors, prev = [], None
    if int(rows[0][0]) < int(rows[0][1]):
        errors.append(f"{rows[0][0]} - {rows[0][1]} subtracts the larger number")
    for row in rows:
        a, b, top, y, borrow, d, out = row
        x = int(a[-1])
        borrow_in = 0 if prev is None else int(int(prev[2]) >= 10)
        if y != b[-1]:
            errors.append(f"{y} is not the last digit of {b}")
        if int(borrow) != borrow_in:
            errors.append(f"borrow {borrow} but the line above lent {borrow_in}")
        if int(top) != x + 10 * (x < int(y) + int(borrow)):
            errors.append(f"top {top} from digit {x}: borrows iff {x} < {y} + {borrow}")
        if int(d) != int(top) - int(y) - int(borrow) or not 0 <= int(d) <= 9:
            errors.append(f"{top} - {y} - {borrow} != {d}")
        if prev is None:
            if out != d:
                errors.append(f"first running result {out} != {d}")
        else:
            pa, pb, *_, pout = prev
            if (a, b) != (pa[:-1] or "0", pb[:-1] or "0"):
                errors.append(f"{a} - {b} is not {pa} - {pb} without the last digits")
            if out != d + pout:
                errors.append(f"running result {out} != {d} + {pout!r}")
        done = len(a) == 1
        if done != (row is rows[-1]):
            errors.append(f"{a} - {b}: the routine should {'stop' if done else 'go on'}")
        if done and int(top) >= 10:
            errors.append(f"{a} - {b}: borrows from beyond the highest digit")
        prev = row
    return errors


def _mul_rows(rows) -> list[str]:
    errors, prev = [], None
    for row in rows:
        a, d, x, d2, c, t, out = row
        if x != a[-1] or d2 != d or d != rows[0][1] or int(d) < 2:
            errors.append(
                f"{x} × {d2}: not the last digit of {a} times the digit {rows[0][1]} (>= 2)"
            )
        if int(t) != int(x) * int(d) + int(c):
            errors.append(f"{x} × {d} + {c} != {t}")
        if prev is None:
            if c != "0" or out != t[-1]:
                errors.append(f"first line: carry {c} != 0 or result {out} != {t[-1]}")
        else:
            pa, _, _, _, _, pt, pout = prev
            if a != (pa[:-1] or "0"):
                errors.append(f"{a} is not {pa} without its last digit")
            if int(c) != int(pt) // 10:
                errors.append(f"carry {c} is not the tens of {pt}")
            if out != t[-1] + pout:
                errors.append(f"running product {out} != {t[-1]} + {pout!r}")
        done = len(a) == 1 and int(t) < 10
        if done != (row is rows[-1]):
            errors.append(f"{a} × {d} = ..{t}: the routine should {'stop' if done else 'go on'}")
        prev = row
    return errors


def _div_rows(rows) -> list[str]:
    errors, prev = [], None
    for row in rows:
        cur, y, q, r, rest, quotient = row
        if len(q) != 1 or int(q) * int(y) + int(r) != int(cur) or not 0 <= int(r) < int(y):
            errors.append(f"{cur} ÷ {y} = {q} r {r} is wrong")
        if prev is None:
            if quotient != q:
                errors.append(f"first quotient {quotient} != {q}")
        else:
            pcur, py, pq, pr, prest, pquotient = prev
            if prest == ".":
                errors.append("goes on after the dividend is used up")
            elif int(cur) != int(pr + prest[0]) or rest != (prest[1:] or "."):
                errors.append(
                    f"{cur} | {rest} is not remainder {pr} with {prest[0]} of {prest} brought down"
                )
            if y != py or quotient != pquotient + q:
                errors.append(f"divisor {y} != {py} or quotient {quotient} != {pquotient} + {q}")
        if (rest == ".") != (row is rows[-1]):
            errors.append(f"rest {rest!r}: the routine should {'stop' if rest == '.' else 'go on'}")
        prev = row
    return errors


def _cmp_rows(rows) -> list[str]:
    errors, prev = [], None
    for row in rows:
        sa, sb, x, rel, y = row
        if len(sa) != len(sb) or (x, y) != (sa[0], sb[0]):
            errors.append(f"{x} ? {y}: not the first digits of {sa} ? {sb} of one length")
        if rel != (">" if x > y else "<" if x < y else "="):
            errors.append(f"{x} {rel} {y} is false")
        if prev is not None and (prev[3] != "=" or (sa, sb) != (prev[0][1:], prev[1][1:])):
            errors.append(f"{sa} ? {sb} does not follow {prev[0]} ? {prev[1]} (equal first digits)")
        done = rel != "=" or len(sa) == 1
        if done != (row is rows[-1]):
            errors.append(f"{sa} ? {sb}: the routine should {'stop' if done else 'go on'}")
        prev = row
    return errors


ROW_CHECKS = {
    "add": _add_rows,
    "sub": _sub_rows,
    "mul": _mul_rows,
    "div": _div_rows,
    "cmp": _cmp_rows,
}


def _closing_errors(shape: str, rows, before: str, after: str) -> list[str]:
    """The "= ..." line after a routine (and the header before a division) against its rows."""
    first, last = rows[0], rows[-1]
    if shape in ("add", "sub", "mul"):
        m = RESULT.fullmatch(after)
        if not m or m.group(2) is not None:
            return [f"{shape} routine ends on {after!r}, not '= N'"]
        n = m.group(1)
        a, b = int(first[0]), int(first[1])  # mul: the number and the digit
        value = {"add": a + b, "sub": a - b, "mul": a * b}[shape]
        negated = bool(re.search(r"= ?-\([^()]*\)$", before))  # "-37 - 25 = -(37 + 25)"
        errors = []
        if n.lstrip("-") != (last[-1].lstrip("0") or "0"):
            errors.append(f"{after!r} is not the running result {last[-1]} without leading zeros")
        if int(n) != (-value if negated else value):
            errors.append(
                f"{after!r} but {first[0]} {shape} {first[1]} = {value} (negated: {negated})"
            )
        return errors
    if shape == "div":
        m, head = RESULT.fullmatch(after), DIV_HEAD.fullmatch(before)
        errors = []
        if not m or m.group(2) is None:
            return [f"division ends on {after!r}, not '= Q r R'"]
        if (m.group(1), m.group(2)) != (last[5].lstrip("0") or "0", last[3]):
            errors.append(f"{after!r} is not quotient {last[5]} and remainder {last[3]}")
        if not head:
            return [*errors, f"division not introduced by 'X ÷ Y' but {before!r}"]
        x, y = head.groups()
        cur, rest = first[0], first[4].replace(".", "")
        if y != first[1] or cur + rest != x:
            errors.append(f"{cur} | {rest} ÷ {first[1]} does not split {x} ÷ {y}")
        head = x[: len(y)] if int(x[: len(y)]) >= int(y) else x[: len(y) + 1]
        if cur != head:  # the first len(y) digits, one more if they are less than y
            errors.append(f"first part {cur} of {x} ÷ {y}, expected {head}")
        if int(m.group(1)) * int(y) + int(m.group(2)) != int(x):
            errors.append(f"{x} ÷ {y} {after}")
        return errors
    m = CMP_RESULT.fullmatch(after)
    if not m:
        return [f"comparison ends on {after!r}, not '= A ? B'"]
    a, rel, b = m.groups()
    width = len(first[0])
    truth = ">" if int(a) > int(b) else "<" if int(a) < int(b) else "="
    errors = []
    if (a.zfill(width), b.zfill(width)) != (first[0], first[1]):
        errors.append(f"{after!r} does not compare {first[0]} ? {first[1]}")
    if rel != last[3] or rel != truth:
        errors.append(f"{after!r}: the last line says {last[3]}, the truth is {truth}")
    return errors


def arithmetic_errors(steps: list[str], lang: str) -> list[str]:
    """Every wrong fact of a local solution, as 'line i "...": what is wrong'."""
    errors = []
    for shape, start, rows in routines(steps, lang):
        end = start + len(rows)
        before = steps[start - 1] if start else ""
        after = steps[end] if end < len(steps) else ""
        for e in ROW_CHECKS[shape](rows) + _closing_errors(shape, rows, before, after):
            errors.append(f"lines {start}-{end} ({shape}) {steps[start]!r}..{after!r}: {e}")
    for i, line in enumerate(steps):
        shape, m = classify(line, lang)
        prev_shape = classify(steps[i - 1], lang)[0] if i else None
        following = classify(steps[i + 1], lang)[0] if i + 1 < len(steps) else None
        if shape == "unknown":
            errors.append(f"line {i} {line!r}: not a line of the local format")
        elif shape in ("result", "cmp_result") and prev_shape not in WORKING:
            errors.append(f"line {i} {line!r}: a result with no routine above it")
        elif shape == "div_head" and following != "div":
            errors.append(f"line {i} {line!r}: a division header with no long division after it")
        elif shape in ("equation", "gcd"):
            lhs, rhs = EQ.split(line)
            if _evaluate(lhs) != _evaluate(rhs):
                errors.append(
                    f"line {i} {line!r}: {lhs} = {_evaluate(lhs)}, {rhs} = {_evaluate(rhs)}"
                )
            if shape == "gcd" and not 0 <= int(m.group(4)) < int(m.group(3)):
                errors.append(f"line {i} {line!r}: remainder not below the divisor")
            if (mm := ONE_MUL.fullmatch(line)) and not (
                {mm.group(1), mm.group(2)} & {"0", "1"}
                or _power_of_ten(int(mm.group(1)))
                or _power_of_ten(int(mm.group(2)))
            ):
                errors.append(f"line {i} {line!r}: a product done in the head")
            if (md := ONE_DIV.fullmatch(line)) and not _power_of_ten(int(md.group(2))):
                errors.append(f"line {i} {line!r}: a quotient done in the head")
        elif shape == "cmp_pad":
            a, b, sa, sb = m.groups()
            width = max(len(a), len(b))
            if (sa, sb) != (a.zfill(width), b.zfill(width)) or (sa, sb) == (a, b):
                errors.append(f"line {i} {line!r}: not {a} ? {b} padded to one length")
    return errors


def final_value(problem: Problem) -> str:
    """What the last line of a local solution concludes, written as an answer ("1 < 7", "x = -4")."""
    last = problem.steps[-1]
    if m := RESULT.fullmatch(last):
        if m.group(2) is not None:
            assert m.group(2) == "0", f"{problem.key}: ends with remainder {m.group(2)}: {last!r}"
        return m.group(1)
    if m := CMP_RESULT.fullmatch(last):
        return " ".join(m.groups())
    if (m := ONE_MUL.fullmatch(last)) or (m := ONE_DIV.fullmatch(last)):
        return m.group(3)
    if m := X_LINE.fullmatch(last):
        return f"x = {m.group(1)}"
    m = _template(local.WORDS[problem.lang]["gcd.done"]).fullmatch(last)
    assert m, f"{problem.key}: unexpected last line {last!r}"
    return m.group(1)


# --- locality ---------------------------------------------------------------------------------


def _sourced(
    role: str,
    n: str,
    left: list[str],
    made: list[str],
    above: list[str],
    first: bool,
    seen: set[str],
) -> bool:
    """Whether number n of a working line has a local source (see `locality_errors`)."""
    if role == "computed":
        return True
    if role == "digit":  # the last digit of an operand restated on this line
        return any(n == t[-1] for t in left)
    if role == "borrowed":  # ... or that digit with a 1 borrowed in front
        return any(n in (t[-1], "1" + t[-1]) for t in left)
    if role == "first_digit":
        return any(n == t[0] for t in left)
    if role == "carry":  # the tens of the line above's result, or none
        return n == "0" or (not first and any(n == t[:-1] for t in above))
    if role in ("grow", "append"):  # the digit this line computes, before / after the line above's
        new, old = (n[0], n[1:]) if role == "grow" else (n[-1], n[:-1])
        return new == made[0][-1] and (old == "" if first else old in above)
    if first:  # restated operands: from the question, an earlier line, or split from the header
        return n in seen or any(t.startswith(n) or t.endswith(n) for t in above)
    if role == "shrink":  # the operand above without its last digit; "0" when nothing is left
        return any(n == (t[:-1] or "0") for t in above)
    if role == "drop_first":
        return any(n == t[1:] for t in above)
    if role == "same":
        return n in above
    assert role == "bring", role  # the remainder above with the next digit of the rest brought down
    return (len(n) == 1 or n[:-1] in above) and any(t[0] == n[-1] for t in above)


def locality_errors(question: str, steps: list[str], lang: str) -> list[str]:
    """Numbers of a solution that are not written from a local source.

    Working lines: each number by its role (`ROLES`): digits and carries come from this line or the
    line above, restated operands and running results are the line above's with one digit dropped
    or added (the added one computed on this line); the first line of a routine restates its
    operands from the question, an earlier line or the header right above it. Result lines come
    from the line above (leading zeros dropped). Other lines (headers, sign lines, words) take their
    numbers from the question, an earlier line, this line (a digit of a number, a shift by zeros),
    a constant, or compute them ("41 × 1000 = 41000").
    """
    errors = []
    seen = set(numbers(question))
    above: list[str] = []
    prev_shape = None
    for i, line in enumerate(steps):
        shape, m = classify(line, lang)
        if shape == "unknown":
            errors.append(f"line {i} {line!r}: not a local working line")
        elif shape in WORKING:
            roles = ROLES[shape]
            made = [m.group(k + 1) for k, r in enumerate(roles) if r == "computed"]
            left: list[str] = []
            for k, role in enumerate(roles):
                n = m.group(k + 1)
                if role is None or not n.isdigit():
                    continue
                if not _sourced(role, n, left, made, above, shape != prev_shape, seen):
                    errors.append(f"line {i} {line!r}: {n} ({role}) has no source nearby")
                if role != "computed":
                    left.append(n)
        elif shape == "result":
            for n in numbers(line):
                if not any(n == (t.lstrip("0") or "0") for t in above):
                    errors.append(f"line {i} {line!r}: {n} is not on the line above")
        else:
            one = ONE_MUL.fullmatch(line) or ONE_DIV.fullmatch(line)
            computed = one.group(3) if one else None
            tokens = [(mt.start(), mt.group()) for mt in re.finditer(r"\d+", line)]
            for pos, n in tokens:
                here = [t for p, t in tokens if p < pos]
                ok = (
                    n in seen
                    or n in above
                    or n in CONSTANTS
                    or n == computed
                    or any(n in t or (n.startswith(t) and set(n[len(t) :]) == {"0"}) for t in here)
                    or n.lstrip("0") in here
                )
                if not ok:
                    errors.append(f"line {i} {line!r}: {n} comes from nowhere nearby")
        seen |= set(numbers(line))
        above, prev_shape = numbers(line), shape
    return errors


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpora() -> dict[tuple[str, str, str], list[Problem]]:
    """(in | ood, local | column, split) -> problems."""
    return {
        (name, fmt, split): synthetic.generate(dataclasses.replace(config, format=fmt), split)
        for name, config in CONFIGS.items()
        for fmt in synthetic.FORMATS
        for split in synthetic.SPLITS
    }


def _local(corpora) -> list[Problem]:
    return [p for (_, fmt, _), problems in corpora.items() if fmt == "local" for p in problems]


# --- 1. arithmetic ----------------------------------------------------------------------------


def test_every_kind_and_language_is_covered(corpora):
    problems = _local(corpora)
    assert {(p.kind, p.lang) for p in problems} == {
        (k, l) for k in synthetic.KINDS for l in synthetic.LANGS
    }
    shapes = {classify(s, p.lang)[0] for p in problems for s in p.steps}
    expected = {
        *WORKING,
        "result",
        "cmp_result",
        "cmp_pad",
        "div_head",
        "gcd",
        "equation",
        "x",
        "words",
    }
    assert expected <= shapes, f"shapes never generated, so never checked: {expected - shapes}"


def test_every_working_line_is_arithmetically_right(corpora):
    bad = []
    for p in _local(corpora):
        bad += [f"{p.key} ({p.lang}): {e}" for e in arithmetic_errors(p.steps, p.lang)]
    assert not bad, f"{len(bad)} wrong lines, e.g.\n" + "\n".join(bad[:20])


def _is_words(line: str) -> bool:
    """A words / label line: a letter other than a division's "r" or the linear equation's "x"."""
    return any(ch.isalpha() and ch not in "rx" for ch in line)


def test_working_lines_are_tight_and_words_lines_keep_their_spaces(corpora):
    spaced, tight_shapes, words = [], set(), []
    for p in _local(corpora):
        for line in p.steps:
            if _is_words(line):
                words.append((p, line))
            elif " " in line:
                spaced.append(f"{p.key} ({p.lang}): {line!r}")
            else:
                tight_shapes.add(classify(line, p.lang)[0])
    assert not spaced, f"{len(spaced)} working lines with spaces, e.g.\n" + "\n".join(spaced[:20])
    expected = {*WORKING, "result", "cmp_result", "cmp_pad", "div_head", "gcd", "equation", "x"}
    assert tight_shapes == expected, f"tight shapes {tight_shapes} != {expected}"
    # a WORDS template matches only with its own spaces ("Move ", " to the right side: ", "x = ",
    # " - "): a words line that lost them would not be "words"
    not_words = [(p.key, line) for p, line in words if classify(line, p.lang)[0] != "words"]
    assert not not_words, not_words[:10]
    en = [line for p, line in words if p.lang == "en"]
    assert en and all(" " in line for line in en), [line for line in en if " " not in line][:5]
    for label in ("Move ", "Divide by ", "Combined rate = ", "Add from the units."):
        assert any(line.startswith(label) for line in en), f"no words line {label!r}..."


def test_local_solution_ends_on_the_answer(corpora):
    wrong = [
        (p.key, p.answer, final_value(p)) for p in _local(corpora) if final_value(p) != p.answer
    ]
    assert not wrong, f"solutions concluding something else than the answer: {wrong[:10]}"


def test_hand_picked_routines():
    assert local.add(622, 213)[0] == [
        "622 + 213 | 2 + 3 + 0 = 5 | 5",
        "62 + 21 | 2 + 1 + 0 = 3 | 35",
        "6 + 2 | 6 + 2 + 0 = 8 | 835",
        "= 835",
    ]
    assert local.add(95, 7)[0][-2:] == ["0 + 0 | 0 + 0 + 1 = 1 | 102", "= 102"]  # a last carry
    assert local.sub(1000, 1)[0] == [
        "1000 - 1 | 10 - 1 - 0 = 9 | 9",
        "100 - 0 | 10 - 0 - 1 = 9 | 99",
        "10 - 0 | 10 - 0 - 1 = 9 | 999",
        "1 - 0 | 1 - 0 - 1 = 0 | 0999",
        "= 999",
    ]
    assert local.div(1564, 17) == (
        ["1564 ÷ 17", "156 ÷ 17 = 9 r 3 | 4 | 9", "34 ÷ 17 = 2 r 0 | . | 92", "= 92 r 0"],
        92,
        0,
    )
    assert local.compare(7, 123)[0] == ["7 ? 123 = 007 ? 123", "007 ? 123 | 0 < 1", "= 7 < 123"]
    # the corpus builders write the same working without spaces, the words line with its spaces
    assert local.steps_add(622, 213, "en") == [
        "Add from the units.",
        "622+213|2+3+0=5|5",
        "62+21|2+1+0=3|35",
        "6+2|6+2+0=8|835",
        "=835",
    ]
    assert local.steps_compare(7, 123, "en")[1:] == ["7?123=007?123", "007?123|0<1", "=7<123"]
    assert local.steps_linear(8, 52, 20, "en") == [
        "Move 52 to the right side: 8x = 20 - 52",
        "20-52=-(52-20)",
        "52-20|2-0-0=2|2",
        "5-2|5-2-0=3|32",
        "=-32",
        "Divide by 8: x = -32 ÷ 8",
        "-32÷8=-(32÷8)",
        "32÷8",
        "32÷8=4r0|.|4",
        "=4r0",
        "x=-4",
    ]
    for lines in (
        local.add(99999, 1)[0],
        local.sub(1000, 1)[0],
        local.mul(594, 37)[0],
        local.div(1564, 17)[0],
        local.div(15, 17)[0],
        local.gcd(4884, 2706)[0],
        local.signed_sub(-37, 25)[0],
        local.signed_sub(-5, -20)[0],
        local.signed_sub(3, 8)[0],
        local.signed_add(-37, -25)[0],
        local.compare(4521, 987)[0],
        local.compare(5441, 5441)[0],
    ):
        for form in (lines, local.tight(lines)):
            assert not arithmetic_errors(form, "en"), (form, arithmetic_errors(form, "en"))


ADD_277_78 = local.add(277, 78)[0]  # 7 + 8 = 15, 7 + 7 + 1 = 15, 2 + 0 + 1 = 3


@pytest.mark.parametrize(
    "lines, old, new",
    [
        (ADD_277_78, "7 + 7 + 1 = 15", "7 + 7 + 1 = 16"),  # a wrong sum
        (ADD_277_78, "7 + 7 + 1 = 15 | 55", "7 + 7 + 0 = 14 | 45"),  # ignores the carry above
        (ADD_277_78, "27 + 7 |", "27 + 8 |"),  # an operand digit that is not the one left
        (ADD_277_78, "2 + 0 | 2 + 0 + 1 = 3 | 355", None),  # stops before the end
        (ADD_277_78, "= 355", "= 356"),  # closing result
        (ADD_277_78, "| 355", "| 365"),  # running result
        (local.sub(622, 213)[0], "2 - 1 - 1 = 0 | 09", "2 - 1 - 0 = 1 | 19"),  # ignores the borrow
        (local.sub(622, 213)[0], "12 - 3 - 0", "2 - 3 - 0"),  # does not borrow when it must
        (local.mul(594, 7)[0], "9 × 7 + 2 = 65", "9 × 7 + 3 = 66"),  # wrong carry
        (local.mul(594, 7)[0], "0 × 7 | 0 × 7 + 4 = 4 | 4158", None),  # drops the last carry
        (local.div(1564, 17)[0], "156 ÷ 17 = 9 r 3", "156 ÷ 17 = 8 r 20"),  # remainder >= divisor
        (local.div(1564, 17)[0], "34 ÷ 17", "35 ÷ 17"),  # brings down the wrong digit
        (local.compare(7, 123)[0], "0 < 1", "0 > 1"),
        (local.mul(594, 37)[0], "594 × 7 + 5940 × 3", "594 × 7 + 594 × 3"),  # header equation
        (local.gcd(4884, 2706)[0], "4884 = 1 × 2706 + 2178", "4884 = 1 × 2706 + 2179"),
    ],
)
@pytest.mark.parametrize("form", ["spaced", "tight"])  # routine output, corpus lines
def test_arithmetic_checker_catches_mistakes(lines, old, new, form):
    if form == "tight":
        lines, old = local.tight(lines), old.replace(" ", "")
        new = None if new is None else new.replace(" ", "")
    assert not arithmetic_errors(lines, "en"), arithmetic_errors(lines, "en")
    text = "\n".join(lines)
    assert old in text, (old, lines)
    broken = (
        [line for line in lines if line != old]
        if new is None
        else text.replace(old, new).split("\n")
    )
    assert arithmetic_errors(broken, "en"), f"{broken} passed"


# --- 2. same problems, same answers, in both formats -------------------------------------------


def test_local_and_column_pose_the_same_problems_with_the_same_answers(corpora):
    for name in CONFIGS:
        for split in synthetic.SPLITS:
            loc, col = corpora[name, "local", split], corpora[name, "column", split]
            assert len(loc) == len(col) == CONFIGS[name].split_size(split)
            fields = lambda ps: [(p.kind, p.lang, p.question, p.answer, p.key) for p in ps]
            assert fields(loc) == fields(col), f"{name}/{split}: local and column problems differ"
            same = [p.key for p, q in zip(loc, col, strict=True) if p.steps == q.steps]
            assert not same, f"{name}/{split}: identical steps in both formats for {same[:5]}"


def test_column_format_is_the_v2_working(corpora):
    for (_, fmt, _), problems in corpora.items():
        for p in problems:
            assert p.steps, p.key
            in_column = any(s.startswith(("units:", "个位：")) for s in p.steps)
            local_lines = [s for s in p.steps if classify(s, p.lang)[0] in WORKING]
            if fmt == "column":
                assert not local_lines, (
                    f"{p.key}: local working in the column format: {local_lines}"
                )
                if p.kind == "add":
                    assert in_column, f"{p.key}: column addition without a units column: {p.steps}"
            else:
                assert not in_column, f"{p.key}: a column line in the local format: {p.steps}"


# sha256 of the column-format SMALL corpus (all splits, in and OOD), computed with the generator
# before v3 (git: GENERATOR_VERSION = 2, no `format` field): format=column must reproduce it.
# Changing a builder/template changes it: bump GENERATOR_VERSION, then update this digest.
COLUMN_V2_DIGEST = "0dcb40a2d3f6d2a401ba88c689c279a083ccf8fbb27edc7d2266dbcb3e03d51d"


def _digest(problem_lists) -> str:
    rows = [[dataclasses.astuple(p) for p in problems] for problems in problem_lists]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def test_column_format_reproduces_generator_v2_exactly(corpora):
    lists = [corpora[name, "column", split] for name in CONFIGS for split in synthetic.SPLITS]
    assert _digest(lists) == COLUMN_V2_DIGEST


# --- 3. locality ------------------------------------------------------------------------------


def test_every_local_solution_copies_only_from_nearby(corpora):
    bad = []
    for p in _local(corpora):
        bad += [f"{p.key} ({p.lang}): {e}" for e in locality_errors(p.question, p.steps, p.lang)]
    assert not bad, f"{len(bad)} non-local numbers, e.g.\n" + "\n".join(bad[:20])


def _with_groups(shape: str, line: str, new: dict[int, str]) -> str:
    """`line` (a WORKING[shape] line, spaced or tight) with groups k replaced by new[k]."""
    m = WORKING[shape].fullmatch(line)
    assert m, (shape, line)
    out, end = [], 0
    for k in sorted(new):
        out += [line[end : m.start(k)], new[k]]
        end = m.end(k)
    return "".join([*out, line[end:]])


def _add_problem(corpora) -> Problem:
    """An addition of two numbers of 3+ digits whose first and last digits differ."""
    return next(
        p
        for p in corpora["in", "local", "train"]
        if p.kind == "add"
        and p.lang == "en"
        and all(len(n) >= 3 and n[1:] != n[:-1] for n in numbers(p.steps[1])[:2])
    )


def test_locality_checker_flags_operands_restated_from_the_wrong_end(corpora):
    p = _add_problem(corpora)
    assert not locality_errors(p.question, p.steps, p.lang)
    a, b, *_ = WORKING["add"].fullmatch(p.steps[2]).groups()
    a1, b1 = numbers(p.steps[1])[:2]
    assert (a, b) == (a1[:-1], b1[:-1])
    broken = [*p.steps]
    # "1492+7" restated as "492+0" (first digit dropped) instead of "149+0"
    broken[2] = _with_groups("add", p.steps[2], {1: a1[1:], 2: b1[1:]})
    assert broken[2] != p.steps[2]
    errors = locality_errors(p.question, broken, p.lang)
    assert any(e.startswith("line 2 ") for e in errors), (broken, errors)


def test_locality_checker_flags_a_column_line(corpora):
    p = _add_problem(corpora)
    broken = [*p.steps]
    broken[2] = "tens: 2 + 1 = 3, write 3"
    errors = locality_errors(p.question, broken, p.lang)
    assert any(e.startswith("line 2 ") for e in errors), (broken, errors)
    column = synthetic.generate(dataclasses.replace(SMALL, format="column"), "train")
    twin = next(q for q in column if q.key == p.key)
    assert locality_errors(twin.question, twin.steps, twin.lang), "a whole column solution passed"


def test_locality_checker_flags_numbers_from_afar(corpora):
    p = _add_problem(corpora)
    first, second = p.steps[1], p.steps[2]
    third = p.steps[3]  # 3+ digit operands: 3+ working lines
    a1, b1, *_ = WORKING["add"].fullmatch(first).groups()
    cases = {  # reason: (index, line)
        "answer copied before it is worked out": (2, _with_groups("add", second, {7: p.answer})),
        "operands of two lines up": (3, _with_groups("add", third, {1: a1, 2: b1})),
        "carry from nowhere": (2, _with_groups("add", second, {5: "7"})),  # add carries 0 or 1
    }
    for reason, (index, line) in cases.items():
        assert line != p.steps[index], reason
        broken = [*p.steps]
        broken[index] = line
        errors = locality_errors(p.question, broken, p.lang)
        assert any(e.startswith(f"line {index} ") for e in errors), (reason, broken, errors)


# --- 4. drills --------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_splits_ignore_format_and_drills(split):
    variants = [
        dataclasses.replace(SMALL, format="local"),
        dataclasses.replace(SMALL, format="column"),
        dataclasses.replace(SMALL, drills=0.3),
        dataclasses.replace(synthetic.ood_config(SMALL), drills=0.3),
    ]
    fields = [
        [(p.question, p.answer, p.key) for p in synthetic.generate(c, split)] for c in variants
    ]
    assert fields[0] == fields[1] == fields[2], f"{split} depends on format or drills"
    ood = [
        (p.question, p.answer, p.key)
        for p in synthetic.generate(synthetic.ood_config(SMALL), split)
    ]
    assert fields[3] == ood, f"OOD {split} depends on drills"
    assert len(fields[0]) == SMALL.split_size(split)


@pytest.mark.parametrize("fmt", synthetic.FORMATS)
def test_drills_take_their_share_of_train_evenly_and_leave_the_rest(fmt):
    share = 0.3
    config = dataclasses.replace(SMALL, format=fmt)
    plain = synthetic.generate(config, "train")
    mixed = synthetic.generate(dataclasses.replace(config, drills=share), "train")
    n_drills = round(SMALL.num_train * share)
    assert len(mixed) == SMALL.num_train
    is_drill = [p.kind == "drill" for p in mixed]
    assert sum(is_drill) == n_drills
    assert not any(p.kind == "drill" for p in plain)
    assert any(is_drill[: SMALL.num_train // 10]), "no drill in the first 10% of the split"
    count = 0
    for m, drill in enumerate(is_drill, 1):
        count += drill
        assert abs(count - m * share) <= 1, (
            f"the first {m} problems hold {count} drills, not ~{m * share:.0f}"
        )
    others = [p for p in mixed if p.kind != "drill"]
    assert others == plain[: SMALL.num_train - n_drills], (
        "drills changed the other training problems"
    )


def _recompute_drill(kind: str, value: str) -> str:
    if kind == "column":
        return str(int(_evaluate(value)))
    return {"copy": value, "rest": value[:-1], "last": value[-1], "reverse": value[::-1]}[kind]


def test_every_drill_is_right():
    config = dataclasses.replace(SMALL, drills=0.3)
    problems = [p for p in synthetic.generate(config, "train") if p.kind == "drill"]
    assert {p.key.split(":")[1] for p in problems} == set(drills.DRILLS)
    assert {p.lang for p in problems} == set(SMALL.langs)
    for p in problems:
        _, kind, value = p.key.split(":", 2)
        assert value in p.question, p
        assert bool(re.search(r"[\u4e00-\u9fff]", p.question)) == (p.lang == "zh"), p
        assert p.answer == _recompute_drill(kind, value), p
        if kind == "column":
            m = re.fullmatch(r"(\d+)([-+×])(\d)([-+])(\d)", value)
            assert m, p
            x, op, y, op2, c = m.groups()
            assert op2 == {"+": "+", "-": "-", "×": "+"}[op], p
            if op == "-":  # one column with a borrow: top = digit (+ 10), the result one digit
                assert (
                    int(x) < 20
                    and 0 <= int(p.answer) <= 9
                    and (int(x) >= 10) == (int(x) % 10 < int(y) + int(c))
                ), p
            else:
                assert len(x) == 1 and (c in "01" if op == "+" else True), p
            assert p.steps == [f"{value}={p.answer}"], p
            continue
        assert value.isdigit() and value[0] != "0" and 2 <= len(value) <= SMALL.max_digits + 1, p
        expected = {
            "copy": [value],
            "rest": [f"{value}|{value[:-1]}"],
            "last": [f"{value}|{value[-1]}"],
            "reverse": [
                f"{value[:i]}|{value[::-1][: len(value) - i + 1]}" for i in range(len(value), 0, -1)
            ],
        }[kind]
        assert p.steps == expected, p


# --- 5. bad config values ---------------------------------------------------------------------


def test_unknown_format_names_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        CorpusConfig(format="reverse")
    assert "'local'" in str(info.value) and "'column'" in str(info.value), info.value


@pytest.mark.parametrize("drill_share", [1.0, 1, -0.1, "a", True, None])
def test_bad_drill_share_names_the_range(drill_share):
    with pytest.raises(ValueError, match=re.escape("[0, 1)")):
        CorpusConfig(drills=drill_share)


@pytest.mark.parametrize("drill_share", [0, 0.0, 0.5, 0.99])
def test_good_drill_shares_are_accepted(drill_share):
    assert CorpusConfig(drills=drill_share).drills == drill_share


# --- 6. pinned --------------------------------------------------------------------------------


def test_generator_version_and_fingerprint():
    assert synthetic.GENERATOR_VERSION == 3
    base = CorpusConfig()
    assert base.format == "local" and base.drills == 0.0
    fingerprints = {
        base.fingerprint(),
        CorpusConfig(format="column").fingerprint(),
        CorpusConfig(drills=0.2).fingerprint(),
    }
    assert len(fingerprints) == 3, "format and drills must change the corpus cache key"
