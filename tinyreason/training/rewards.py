"""Verifiable rewards of `stage=grpo`, one number per completion.

    reward = correctness + format_reward * [one think block, one answer line]
                         + overlong_penalty * overlong(length)
                         + step_reward * working(completion, the reference solution's steps)

correctness is the answer checker of the problem (1 / 0: `Item.check`, the same check exact match
uses) or, with `grpo.reward_fn=<module>:<function>`, the user's function
`fn(question: str, completion: str, answer: str) -> float`. The overlong term is DAPO's soft
penalty (arXiv 2503.14476, §3.4): 0 up to max_new_tokens - buffer, then falling linearly to -1 at
max_new_tokens. `working` is a dense, still verifiable, process reward for the embedded corpus,
whose every problem has one reference working: the share of its step lines the completion's think
block writes, in order (a model that is never right at the end still gets a gradient towards the
steps that lead there).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from tinyreason.data import synthetic
from tinyreason.tokenizer.special import THINK_CLOSE, THINK_OPEN

RewardFn = Callable[[str, str, str], float]


def well_formed(completion: str) -> bool:
    """One `<think>` ... `</think>` block at the start and exactly one answer line after it."""
    if completion.count(THINK_OPEN) != 1 or completion.count(THINK_CLOSE) != 1:
        return False
    head, _, tail = completion.partition(THINK_CLOSE)
    if not head.lstrip().startswith(THINK_OPEN):
        return False
    return (
        len(synthetic.ANSWER_LINE.findall(tail)) == 1 and synthetic.parse_answer(tail) is not None
    )


def working(completion: str, reference: tuple[str, ...]) -> float:
    """Share of the reference step lines found, in order, among the think block's lines."""
    if not reference:
        return 0.0
    head = completion.partition(THINK_CLOSE)[0].replace(THINK_OPEN, "")
    lines = [line.strip() for line in head.splitlines() if line.strip()]
    found, at = 0, 0
    for step in reference:
        for j in range(at, len(lines)):
            if lines[j] == step.strip():
                found, at = found + 1, j + 1
                break
    return found / len(reference)


def overlong(length: int, max_new_tokens: int, buffer: int) -> float:
    """0 for length <= max_new_tokens - buffer, then linearly down to -1 at max_new_tokens."""
    start = max_new_tokens - buffer
    return 0.0 if length <= start else -min(1.0, (length - start) / max(buffer, 1))


def load_reward_fn(path: str) -> RewardFn:
    """`package.module:function` (or `package.module.function`) -> the function, checked."""
    module_name, sep, name = path.partition(":")
    if not sep:
        module_name, _, name = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"grpo.reward_fn={path!r} is not an importable function ({err}); write "
            "'package.module:function', the function taking (question, completion, answer)"
        ) from err
    if not callable(fn):
        raise ValueError(f"grpo.reward_fn={path!r} is not callable")
    return fn


class RewardError(ValueError):
    """A reward function raised or returned something that is not a finite number."""


def score(fn: RewardFn, question: str, completion: str, answer: str) -> float:
    try:
        value = fn(question, completion, answer)
    except Exception as err:  # the user's code: any failure marks the group unscorable
        raise RewardError(f"the reward function raised {type(err).__name__}: {err}") from err
    if not isinstance(value, int | float) or not math.isfinite(value):  # bools count as 1 / 0
        raise RewardError(f"the reward function returned {value!r}, not a finite number")
    return float(value)
