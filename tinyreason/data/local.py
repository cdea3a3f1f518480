"""Local working (`data.corpus.format=local`, generator v3): solutions whose every copy is local.

A digit the model writes is either computed from digits on the same line, or copied from a place it
finds by content: just before a delimiter, after a label, at the end of the line above. Nothing is
fetched by counting positions inside a number far back in the question (the "tens digit of the
first operand" lookup the column format needs, which a tiny model does not learn in ~2 M tokens).

The routines write spaced lines (readable, below); the builders of each kind (`steps_*`) take the
spaces out of the working lines (`tight`): "622+213|2+3+0=5|5". Each routine restates what is
left of its operands at the start of every line, so the digits in use are the last ones before a
delimiter; the carry, borrow or remainder comes from the line above;
the running result is carried forward on the right and the routine ends with "= result":

    add   622 + 213 | 2 + 3 + 0 = 5 | 5          the units, the carry of the line above, the
          62 + 21 | 2 + 1 + 0 = 3 | 35           running sum (the new digit in front); an operand
          6 + 2 | 6 + 2 + 0 = 8 | 835            used up is 0; a last carry gets a 0 + 0 line
          = 835
    sub   622 - 213 | 12 - 3 - 0 = 9 | 9          a >= b; "12" = the digit with a 1 borrowed in
          62 - 21 | 2 - 1 - 1 = 0 | 09           front, so the next line subtracts a borrow of 1
          6 - 2 | 6 - 2 - 0 = 4 | 409
          = 409                                  (leading zeros dropped here)
    mul   594 × 7 | 4 × 7 + 0 = 28 | 8            one digit: the carry is the tens of the line above
          59 × 7 | 9 × 7 + 2 = 65 | 58
          5 × 7 | 5 × 7 + 6 = 41 | 158
          0 × 7 | 0 × 7 + 4 = 4 | 4158
          = 4158
          594 × 37 = 594 × 7 + 5940 × 3           several digits: one partial product per digit
                                                 (the shift is a 0 appended), then their sum
    div   1564 ÷ 17                              long division: the first len(divisor) digits,
          15 ÷ 17 = 0 r 15 | 64 | 0              then the remainder with the next digit brought
          156 ÷ 17 = 9 r 3 | 4 | 09              down (the rest of the dividend is restated after
          34 ÷ 17 = 2 r 0 | . | 092              the first bar), the quotient growing on the right
          = 92 r 0

Signs are settled on a line of their own before the unsigned working (`-37 - 25 = -(37 + 25)`).
The words around the working (one short line per step of a word problem) are in `WORDS`.
"""

from __future__ import annotations

from .templates import UNITS

Lines = list[str]


def _rest(s: str) -> str:
    """A number without its last digit; "0" when nothing is left."""
    return s[:-1] or "0"


def add(a: int, b: int) -> tuple[Lines, int]:
    """a + b for a, b >= 0."""
    sa, sb, carry, out, lines = str(a), str(b), 0, "", []
    while True:
        total = int(sa[-1]) + int(sb[-1]) + carry
        out = str(total % 10) + out
        lines.append(f"{sa} + {sb} | {sa[-1]} + {sb[-1]} + {carry} = {total} | {out}")
        carry = total // 10
        if len(sa) == 1 and len(sb) == 1 and not carry:
            break
        sa, sb = _rest(sa), _rest(sb)
    lines.append(f"= {a + b}")
    return lines, a + b


def sub(a: int, b: int) -> tuple[Lines, int]:
    """a - b for a >= b >= 0."""
    assert a >= b >= 0
    sa, sb, borrow, out, lines = str(a), str(b), 0, "", []
    while True:
        top, low = int(sa[-1]), int(sb[-1]) + borrow
        lent = top < low
        top += 10 * lent
        out = str(top - low) + out
        lines.append(f"{sa} - {sb} | {top} - {sb[-1]} - {borrow} = {top - low} | {out}")
        borrow = int(lent)
        if len(sa) == 1:
            break
        sa, sb = _rest(sa), _rest(sb)
    assert not borrow
    lines.append(f"= {a - b}")
    return lines, a - b


def mul_digit(a: int, d: int) -> tuple[Lines, int]:
    """a × d for a >= 0 and one digit d >= 2; × 0 and × 1 are one line."""
    if d < 2:
        return [f"{a} × {d} = {a * d}"], a * d
    sa, carry, out, lines = str(a), 0, "", []
    while True:
        total = int(sa[-1]) * d + carry
        out = str(total % 10) + out
        lines.append(f"{sa} × {d} | {sa[-1]} × {d} + {carry} = {total} | {out}")
        carry = total // 10
        if len(sa) == 1 and not carry:
            break
        sa = _rest(sa)
    lines.append(f"= {int(out)}")
    return lines, a * d


def _power_of_ten(n: int) -> bool:
    return n >= 10 and str(n).rstrip("0") == "1"


def mul(a: int, b: int) -> tuple[Lines, int]:
    """a × b for a, b >= 0: the longer number times each non-zero digit of the shorter (a
    partial product per digit, shifted by appending zeros), then their sum. × 10^k is a shift."""
    if _power_of_ten(a) or _power_of_ten(b) or not a or not b:
        return [f"{a} × {b} = {a * b}"], a * b
    if len(str(a)) < len(str(b)):
        a, b = b, a
    terms = [(a * 10**k, int(d)) for k, d in enumerate(reversed(str(b))) if d != "0"]
    if len(terms) == 1 and terms[0][0] == a:
        return mul_digit(a, b)
    lines = [f"{a} × {b} = " + " + ".join(f"{x} × {d}" for x, d in terms)]
    partials = []
    for x, d in terms:
        working, p = mul_digit(x, d)
        lines += working
        partials.append(p)
    total = partials[0]
    for p in partials[1:]:
        working, total = add(total, p)
        lines += working
    return lines, total


def div(x: int, y: int) -> tuple[Lines, int, int]:
    """Long division x ÷ y for x >= 0, y >= 1: (lines, quotient, remainder)."""
    assert y >= 1 and x >= 0
    if _power_of_ten(y) and x % y == 0:  # ÷ 10, ÷ 1000: a shift
        return [f"{x} ÷ {y} = {x // y}"], x // y, 0
    sx, width = str(x), len(str(y))
    if int(sx[:width]) < y and len(sx) > width:  # the first len(divisor) digits are too few
        width += 1
    head, rest = sx[:width], sx[width:]
    lines, quotient, r = [f"{x} ÷ {y}"], "", 0
    current = int(head)
    while True:
        q, r = divmod(current, y)
        assert q < 10
        quotient += str(q)
        lines.append(f"{current} ÷ {y} = {q} r {r} | {rest or '.'} | {quotient}")
        if not rest:
            break
        current, rest = int(f"{r}{rest[0]}"), rest[1:]
    lines.append(f"= {int(quotient)} r {r}")
    return lines, int(quotient), r


def signed_add(a: int, b: int) -> tuple[Lines, int]:
    """a + b for any signs: a sign line, then the unsigned add or sub."""
    if a >= 0 and b >= 0:
        return add(a, b)
    if a < 0 and b < 0:
        lines, s = add(-a, -b)
        return [f"{a} + ({b}) = -({-a} + {-b})", *lines[:-1], f"= {-s}"], -s
    pos, neg = (a, -b) if b < 0 else (b, -a)  # pos - neg
    return signed_sub(pos, neg, shown=f"{a} + {_paren(b)}")


def signed_sub(a: int, b: int, shown: str | None = None) -> tuple[Lines, int]:
    """a - b for any signs."""
    shown = shown or f"{a} - {_paren(b)}"
    if b < 0:
        lines, s = signed_add(a, -b)
        return [f"{shown} = {a} + {-b}", *lines], s
    if a < 0:  # -|a| - b = -(|a| + b)
        lines, s = add(-a, b)
        return [f"{shown} = -({-a} + {b})", *lines[:-1], f"= {-s}"], -s
    if a >= b:
        lines, s = sub(a, b)
        return ([f"{shown} = {a} - {b}"] if shown != f"{a} - {b}" else []) + lines, s
    lines, s = sub(b, a)
    return [f"{shown} = -({b} - {a})", *lines[:-1], f"= {-s}"], -s


def _paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def compare(a: int, b: int) -> tuple[Lines, str]:
    """The two numbers padded to one length, then digit against digit from the highest."""
    width = max(len(str(a)), len(str(b)))
    sa, sb = str(a).zfill(width), str(b).zfill(width)
    lines = [f"{a} ? {b} = {sa} ? {sb}"] if (sa, sb) != (str(a), str(b)) else []
    rel = "="
    while sa:
        x, y = sa[0], sb[0]
        r = ">" if x > y else "<" if x < y else "="
        lines.append(f"{sa} ? {sb} | {x} {r} {y}")
        if r != "=":
            rel = r
            break
        sa, sb = sa[1:], sb[1:]
    answer = f"{a} {rel} {b}"
    lines.append(f"= {answer}")
    return lines, answer


def gcd(a: int, b: int) -> tuple[Lines, int]:
    """Euclid: each division worked out long-hand, until the remainder is 0."""
    x, y = max(a, b), min(a, b)
    lines = []
    while y:
        working, q, r = div(x, y)
        lines += working
        lines.append(f"{x} = {q} × {y} + {r}")
        x, y = y, r
    return lines, x


# ---------------------------------------------------------------------------------------------
# The words: one short line in front of each step of a word problem (en / zh)

WORDS = {
    "en": {
        "add.q": "Add from the units.",
        "sub.q": "Subtract from the units.",
        "mul.q": "Multiply digit by digit from the units.",
        "cmp.q": "Pad to the same length, then compare from the highest digit.",
        "gcd.q": "Euclidean algorithm: divide until the remainder is 0.",
        "gcd.done": "The remainder is 0, so the greatest common divisor is {g}.",
        "total": "Total cost = unit price × quantity:",
        "change": "Change = paid - total cost:",
        "unit_price": "Unit price = total cost ÷ quantity:",
        "distance": "Distance = speed × time:",
        "time": "Time = distance ÷ speed:",
        "both": "Combined rate = {r1} + {r2}:",
        "work": "Time = total work ÷ combined rate:",
        "to_small": "1 {big1} = {factor} {smalls}, so multiply by {factor}:",
        "plus_rest": "Add the {rest} {smalls}:",
        "to_big": "1 {big1} = {factor} {smalls}, so divide by {factor}:",
        "lin.move": "Move {b} to the right side: {a}x = {c} - {b}",
        "lin.div": "Divide by {a}: x = {rhs} ÷ {a}",
    },
    "zh": {
        "add.q": "从个位起逐位相加。",
        "sub.q": "从个位起逐位相减。",
        "mul.q": "从个位起逐位相乘。",
        "cmp.q": "补成同样的位数，从最高位起逐位比较。",
        "gcd.q": "辗转相除，直到余数为 0。",
        "gcd.done": "余数为 0，所以最大公因数是 {g}。",
        "total": "总价 = 单价 × 数量：",
        "change": "找回的钱 = 付的钱 - 总价：",
        "unit_price": "单价 = 总价 ÷ 数量：",
        "distance": "路程 = 速度 × 时间：",
        "time": "时间 = 路程 ÷ 速度：",
        "both": "工作效率和 = {r1} + {r2}：",
        "work": "工作时间 = 工作总量 ÷ 工作效率：",
        "to_small": "1 {big_zh} = {factor} {small_zh}，乘 {factor}：",
        "plus_rest": "再加 {rest} {small_zh}：",
        "to_big": "1 {big_zh} = {factor} {small_zh}，除以 {factor}：",
        "lin.move": "把 {b} 移到右边：{a}x = {c} - {b}",
        "lin.div": "两边除以 {a}：x = {rhs} ÷ {a}",
    },
}


def tight(lines: Lines) -> Lines:
    """Working lines without spaces: "62+21|2+1+0=3|35". With `tokenizer.digits=individual` every
    digit is then the same token wherever it is (a space before a digit would make " 2" another
    token than "2", so copying the last digit of "622" to "| 2" would change the token)."""
    return [line.replace(" ", "") for line in lines]


def steps_add(a: int, b: int, lang: str) -> Lines:
    return [WORDS[lang]["add.q"], *tight(add(a, b)[0])]


def steps_sub(a: int, b: int, lang: str) -> Lines:
    return [WORDS[lang]["sub.q"], *tight(signed_sub(a, b)[0])]


def steps_mul(a: int, b: int, lang: str) -> Lines:
    return [WORDS[lang]["mul.q"], *tight(mul(a, b)[0])]


def steps_compare(a: int, b: int, lang: str) -> Lines:
    return [WORDS[lang]["cmp.q"], *tight(compare(a, b)[0])]


def steps_gcd(a: int, b: int, lang: str) -> Lines:
    lines, g = gcd(a, b)
    return [WORDS[lang]["gcd.q"], *tight(lines), WORDS[lang]["gcd.done"].format(g=g)]


def steps_linear(a: int, b: int, c: int, lang: str) -> Lines:
    w = WORDS[lang]
    lines = []
    if b:
        lines.append(w["lin.move"].format(a=a, b=_paren(b), c=c))
        working, rhs = signed_sub(c, b)
        lines += tight(working)
    else:
        rhs = c
    lines.append(w["lin.div"].format(a=_paren(a), rhs=rhs))
    sign = "-" if (rhs < 0) != (a < 0) and rhs else ""
    working, q, r = div(abs(rhs), abs(a))
    assert r == 0
    if rhs < 0 or a < 0:
        working.insert(0, f"{rhs} ÷ {_paren(a)} = {sign}({abs(rhs)} ÷ {abs(a)})")
    working.append(f"x = {sign}{q}" if q else "x = 0")
    return lines + tight(working)


def steps_price(variant: str, price: int, qty: int, paid: int, lang: str) -> Lines:
    w = WORDS[lang]
    if variant == "unit":
        return [w["unit_price"], *tight(div(price * qty, qty)[0])]
    lines = [w["total"], *tight(mul(price, qty)[0])]
    if variant == "change":
        lines += [w["change"], *tight(sub(paid, price * qty)[0])]
    return lines


def steps_rate(variant: str, r1: int, r2: int, hours: int, lang: str) -> Lines:
    w = WORDS[lang]
    if variant == "distance":
        return [w["distance"], *tight(mul(r1, hours)[0])]
    if variant == "time":
        return [w["time"], *tight(div(r1 * hours, r1)[0])]
    both = r1 + r2
    lines = [w["both"].format(r1=r1, r2=r2), *tight(add(r1, r2)[0])]
    return [*lines, w["work"], *tight(div(both * hours, both)[0])]


def steps_unit(pair: str, to_small: bool, big: int, rest: int, lang: str) -> Lines:
    factor, big1, _, _, smalls, big_zh, small_zh = UNITS[pair]
    names = dict(factor=factor, big1=big1, smalls=smalls, big_zh=big_zh, small_zh=small_zh)
    w = WORDS[lang]
    if not to_small:
        return [w["to_big"].format(**names), *tight(div(big * factor, factor)[0])]
    lines = [w["to_small"].format(**names), *tight(mul(big, factor)[0])]
    if rest:
        lines += [w["plus_rest"].format(rest=rest, **names), *tight(add(big * factor, rest)[0])]
    return lines
