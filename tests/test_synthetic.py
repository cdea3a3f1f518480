"""The synthetic reasoning corpus: determinism, split hygiene, and solutions that are right.

Answers are recomputed here from each problem's key with plain int arithmetic, and every
arithmetic fact written in the steps ("13 - 8 = 5", "84 ÷ 36 = 2……12") is re-evaluated.
"""

import dataclasses
import hashlib
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from tinyreason.data import solutions, synthetic
from tinyreason.data.synthetic import CorpusConfig, Problem

# The column format (generator v2, `working.py`): the local format's lines are checked in
# test_local_format.py; what is checked here on the column format holds for both.
SMALL = CorpusConfig(num_train=1800, num_val=180, num_test=180, format="column")
UNIT_FACTORS = {"km_m": 1000, "kg_g": 1000, "h_min": 60}


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[Problem]]:
    return {split: synthetic.generate(SMALL, split) for split in synthetic.SPLITS}


def _all(corpus: dict[str, list[Problem]]) -> list[Problem]:
    return [p for problems in corpus.values() for p in problems]


# --- determinism ------------------------------------------------------------------------------


def test_same_config_same_problems_different_seed_different(corpus):
    assert synthetic.generate(SMALL, "test") == corpus["test"]
    other = synthetic.generate(dataclasses.replace(SMALL, seed=1), "test")
    assert [p.key for p in other] != [p.key for p in corpus["test"]]


def test_deterministic_across_processes_with_different_hash_seeds():
    # str hash() is salted per process; the corpus must not depend on it
    code = (
        "import hashlib; from tinyreason.data import synthetic as s;"
        "c = s.CorpusConfig(num_train=0, num_val=0, num_test=90);"
        "text = '\\n'.join(map(s.format_text, s.generate(c, 'test')));"
        "print(hashlib.sha256(text.encode()).hexdigest(), c.fingerprint())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    config = CorpusConfig(num_train=0, num_val=0, num_test=90)
    text = "\n".join(map(synthetic.format_text, synthetic.generate(config, "test")))
    assert out.stdout.split() == [hashlib.sha256(text.encode()).hexdigest(), config.fingerprint()]


def test_larger_split_extends_a_smaller_one(corpus):
    # eval subsets taken as prefixes are the same problems whatever num_test is
    small = synthetic.generate(dataclasses.replace(SMALL, num_test=40), "test")
    assert small == corpus["test"][:40]


# --- splits -----------------------------------------------------------------------------------


def test_splits_disjoint_on_keys_and_questions_across_seeds(corpus):
    other = {s: synthetic.generate(dataclasses.replace(SMALL, seed=7), s) for s in synthetic.SPLITS}
    for a in synthetic.SPLITS:
        for b in synthetic.SPLITS:
            if a == b:
                continue
            for left, right in ((corpus[a], corpus[b]), (corpus[a], other[b])):
                assert not {p.key for p in left} & {p.key for p in right}, (a, b)
                assert not {p.question for p in left} & {p.question for p in right}, (a, b)


def test_no_duplicates_within_a_split_and_sizes_match(corpus):
    for split, problems in corpus.items():
        assert len(problems) == SMALL.split_size(split)
        assert len({p.key for p in problems}) == len(problems)
        assert len({p.question for p in problems}) == len(problems)
        assert all(synthetic.split_of(p.key) == split for p in problems)


def test_bad_split_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'train', 'validation', 'test'"):
        synthetic.generate(SMALL, "val")


# --- correctness ------------------------------------------------------------------------------


def _expected(key: str) -> tuple[str, set[int]]:
    """(answer, numbers the question must show), from the key alone."""
    kind, *rest = key.split(":")
    if kind in ("add", "sub", "mul", "gcd"):
        a, b = map(int, rest)
        answer = {"add": a + b, "sub": a - b, "mul": a * b, "gcd": math.gcd(a, b)}[kind]
        return str(answer), {a, b}
    if kind == "price":
        variant, price, qty, paid = rest[0], *map(int, rest[1:])
        if variant == "total":
            return str(price * qty), {price, qty}
        if variant == "change":
            assert paid > price * qty
            return str(paid - price * qty), {price, qty, paid}
        return str(price), {price * qty, qty}
    if kind == "rate":
        variant, r1, r2, hours = rest[0], *map(int, rest[1:])
        if variant == "distance":
            return str(r1 * hours), {r1, hours}
        if variant == "time":
            return str(hours), {r1 * hours, r1}
        return str(hours), {r1, r2, (r1 + r2) * hours}
    if kind == "unit":
        pair, direction, big, rest_ = rest[0], rest[1], int(rest[2]), int(rest[3])
        factor = UNIT_FACTORS[pair]
        if direction == "to_big":
            return str(big), {big * factor}
        return str(big * factor + rest_), {big, rest_} - {0}
    if kind == "linear":
        a, b, c = map(int, rest)
        assert (c - b) % a == 0
        return f"x = {(c - b) // a}", {abs(a), abs(b), abs(c)} - {0}
    raise AssertionError(f"unexpected key {key}")


def test_every_answer_is_correct(corpus):
    for p in _all(corpus):
        if p.kind == "compare":
            x, rel, y = p.answer.split()
            a, b = int(x), int(y)
            assert sorted((a, b)) == [int(v) for v in p.key.split(":")[1:]]
            assert rel == (">" if a > b else "<" if a < b else "=")
            assert re.findall(r"\d+", p.question) == [x, y]  # asked in the answer's order
            continue
        answer, shown = _expected(p.key)
        assert p.answer == answer, p
        assert shown <= {int(n) for n in re.findall(r"\d+", p.question)}, p


_NUM = r"\(?-?\d+\)?"
# "a op b op c = d" with at least one operator; not inside a word, number or "(borrowed)"
_CHAIN = re.compile(rf"(?<![\w)])({_NUM}(?: [+\-×÷] {_NUM})+) = (-?\d+)(?![\d…])")
_SPLIT = re.compile(r"(?<![\w)])(\d+) = (\d+(?: \+ \d+)+)(?=[.。]|$)")
_EUCLID_EN = re.compile(r"^(\d+) = (\d+) × (\d+) \+ (\d+)$")
_EUCLID_ZH = re.compile(r"^(\d+) ÷ (\d+) = (\d+)……(\d+)$")


def _verify_arithmetic(line: str) -> int:
    """Re-evaluate every arithmetic fact in a step; return how many there were."""
    count = 0
    for expr, value in _CHAIN.findall(line):
        python = expr.replace("×", "*").replace("÷", "/")
        assert eval(python, {"__builtins__": {}}) == int(value), line  # noqa: S307 (digits and + - * / only)
        count += 1
    for total, parts in _SPLIT.findall(line):
        assert int(total) == sum(map(int, parts.split(" + "))), line
        count += 1
    for pattern, order in ((_EUCLID_EN, (0, 2, 1, 3)), (_EUCLID_ZH, (0, 1, 2, 3))):
        if m := pattern.match(line):
            x, y, q, r = (int(m.group(i + 1)) for i in order)
            assert (q, r) == divmod(x, y), line
            count += 1
    return count


def test_every_arithmetic_fact_in_the_steps_is_true(corpus):
    facts = Counter()
    for p in _all(corpus):
        for line in p.steps:
            facts[p.kind] += _verify_arithmetic(line)
    # the checker must actually see the working of every kind that has any
    assert all(facts[k] > 0 for k in synthetic.KINDS if k != "compare"), facts


def _column_writes(steps: list[str]) -> str:
    """The digits written column by column, read back as a number (units came first)."""
    digits = [
        m.group(1)
        for line in steps
        if (m := re.search(r"(?:write|写) (\d)(?: carry 1| 进 1)?$", line))
    ]
    return "".join(reversed(digits)).lstrip("0") or "0"


def test_addition_carries_and_digits_match_python(corpus):
    checked = 0
    for p in _all(corpus):
        if p.kind != "add":
            continue
        a, b = map(int, p.key.split(":")[1:])
        width = len(str(max(a, b)))
        carries = sum((a % 10**k + b % 10**k) >= 10**k for k in range(1, width + 1))
        marker = " carry 1" if p.lang == "en" else " 进 1"
        assert sum(line.count(marker) for line in p.steps) == carries, p
        assert _column_writes(p.steps) == str(a + b), p
        checked += 1
    assert checked > 100


def test_subtraction_borrows_and_digits_match_python(corpus):
    checked = 0
    for p in _all(corpus):
        if p.kind != "sub":
            continue
        a, b = map(int, p.key.split(":")[1:])
        big, small = max(a, b), min(a, b)
        borrows = sum(big % 10**k < small % 10**k for k in range(1, len(str(big)) + 1))
        marker = "borrow 1 from" if p.lang == "en" else "借 1："
        assert sum(line.count(marker) for line in p.steps) == borrows, p
        assert _column_writes(p.steps) == str(big - small), p
        assert ("negative" in p.steps[0] or "负数" in p.steps[0]) == (a < b)
        checked += 1
    assert checked > 100


def test_hand_picked_addition_478_plus_65():
    rng = random.Random(0)
    _, steps, answer = solutions.build_add(478, 65, "en", rng)
    assert answer == "543"
    assert steps[1:] == [
        "units: 8 + 5 = 13, write 3 carry 1",
        "tens: 7 + 6 + 1 (carried) = 14, write 4 carry 1",
        "hundreds: 4 + 1 (carried) = 5, write 5",
        "So 478 + 65 = 543.",
    ]
    _, steps, _ = solutions.build_add(478, 65, "zh", rng)
    assert steps[1:] == [
        "个位：8 + 5 = 13，写 3 进 1",
        "十位：7 + 6 + 1（进位） = 14，写 4 进 1",
        "百位：4 + 1（进位） = 5，写 5",
        "所以 478 + 65 = 543。",
    ]
    # a carry out of the highest column becomes a new digit
    _, steps, answer = solutions.build_add(95, 7, "en", rng)
    assert (answer, steps[-2]) == ("102", "hundreds: carried 1, write 1")


def test_hand_picked_negative_subtraction():
    _, steps, answer = solutions.build_sub(478, 1203, "en", random.Random(0))
    assert answer == "-725"
    assert steps[-1] == "1203 - 478 = 725, so 478 - 1203 = -725."


# --- text format ------------------------------------------------------------------------------


def test_format_text_and_parse_answer_round_trip_in_both_languages(corpus):
    langs = set()
    for p in _all(corpus)[:300]:
        text = synthetic.format_text(p)
        assert text.startswith(p.question + "\n<think>\n")
        assert "\n</think>\n" in text
        assert text.endswith(("Answer: " if p.lang == "en" else "答案：") + p.answer)
        assert synthetic.parse_answer(text) == p.answer
        langs.add(p.lang)
    assert langs == {"en", "zh"}


def test_parse_answer_takes_the_last_answer_after_think():
    assert synthetic.parse_answer("<think>\nAnswer: 3\n</think>\nAnswer: 4") == "4"
    assert synthetic.parse_answer("<think>\nAnswer: 3\n</think>\nno idea") is None
    assert synthetic.parse_answer("Answer: 1\n答案：x = 2。") == "x = 2"
    assert synthetic.parse_answer("") is None


def test_check_accepts_the_right_answer_and_rejects_a_wrong_one(corpus):
    for p in corpus["test"][:40]:
        text = synthetic.format_text(p)
        assert synthetic.check(p, text)
        assert synthetic.check(p, text.replace(" ", ""))  # spacing is not part of the answer
        wrong = text.rsplit(p.answer, 1)[0] + p.answer + "1"
        assert not synthetic.check(p, wrong)
        assert not synthetic.check(p, p.question)


# --- mix, config ------------------------------------------------------------------------------


def test_all_kinds_and_languages_appear_evenly(corpus):
    for problems in corpus.values():
        counts = Counter((p.kind, p.lang) for p in problems)
        assert set(counts) == {(k, lang) for k in synthetic.KINDS for lang in synthetic.LANGS}
        assert max(counts.values()) - min(counts.values()) <= 1


def test_kinds_and_langs_restrict_the_mix():
    config = CorpusConfig(
        num_train=0, num_val=0, num_test=30, kinds=["linear", "gcd"], langs=["zh"]
    )
    assert config.kinds == ("linear", "gcd")  # YAML lists become tuples
    problems = synthetic.generate(config, "test")
    assert {(p.kind, p.lang) for p in problems} == {("linear", "zh"), ("gcd", "zh")}


def test_difficulty_knobs_bound_operands():
    config = CorpusConfig(
        num_train=300, max_digits=2, max_multiplier_digits=1, kinds=("add", "mul")
    )
    for p in synthetic.generate(config, "train"):
        a, b = map(int, p.key.split(":")[1:])
        assert max(a, b) < 100 and (p.kind == "add" or min(a, b) < 10)


def test_bad_config_values_name_the_key_and_allowed_values():
    with pytest.raises(ValueError, match=r"kinds=.*'add'.*'linear'"):
        CorpusConfig(kinds=("add", "calculus"))
    with pytest.raises(ValueError, match=r"langs=.*'en', 'zh'"):
        CorpusConfig(langs=("fr",))
    with pytest.raises(ValueError, match="max_digits=0"):
        CorpusConfig(max_digits=0)


def test_exhausted_problem_space_raises_instead_of_looping():
    config = CorpusConfig(num_train=500, kinds=("add",), max_digits=1)  # only 55 distinct sums
    with pytest.raises(ValueError, match="ran out of distinct 'add' problems"):
        synthetic.generate(config, "train")


def test_fingerprint_is_stable_and_changes_with_every_field():
    base = CorpusConfig()
    assert base.fingerprint() == CorpusConfig().fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", base.fingerprint())
    changed = {
        "kinds": ("add",),
        "langs": ("zh",),
        "ood": True,
        "format": "column",
        "drills": 0.1,
    }
    for f in dataclasses.fields(CorpusConfig):
        value = changed.get(f.name, getattr(base, f.name) + 1 if f.type == "int" else None)
        assert value is not None, f"add a changed value for field {f.name}"
        other = dataclasses.replace(base, **{f.name: value})
        assert other.fingerprint() != base.fingerprint(), f.name


def test_default_corpus_is_fast():
    problems = synthetic.generate(CorpusConfig(), "train")
    assert len(problems) == 20000
