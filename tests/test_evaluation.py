"""Exact match, the measure every training result is judged by: the answer checker on
hand-written completions, GSM8K golds, pass@k against hand counts and brute force, eval files and
the `evaluate` CLI refusing bad input before any generation, the OOD split really beyond the
training limits, and the key invariant: a model overfit to a few problems scores 100% on them
and ~0% on others."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tinyreason.evaluate as evaluate_cli
from tinyreason.data import synthetic
from tinyreason.data.sources import solution
from tinyreason.data.synthetic import CorpusConfig, Problem
from tinyreason.evaluate import corpus_config, evaluate
from tinyreason.evaluation import (
    EvalConfig,
    EvalOptions,
    Item,
    answers_equal,
    complete,
    corpus_items,
    eval_sets,
    evaluate_items,
    file_items,
    gold_answer,
    pass_at_k,
)
from tinyreason.model import CausalLM, debug_config
from tinyreason.sampling import SamplingConfig
from tinyreason.tokenizer import TokenizerConfig, chat_document, load, model_vocab_size, train_bpe

# --- the answer checker -----------------------------------------------------------------------


def problem(answer: str, lang: str = "en") -> Problem:
    return Problem("compare", lang, "q", [], answer, f"test:{answer}")


THINK = "<think>\nLine up the digits.\n</think>\n"


@pytest.mark.parametrize(
    "completion, answer, correct",
    [
        (THINK + "Answer: 42", "42", True),
        (THINK + "Answer: 42.", "42", True),  # a closing full stop is not part of the answer
        (THINK + "  Answer :  42  ", "42", True),
        (THINK + "Answer: 42\r\n", "42", True),  # CRLF
        # the right answer in the wrong place: inside <think> only, nothing after </think>
        ("<think>\nAnswer: 42\n</think>\n", "42", False),
        ("<think>\nAnswer: 42\n</think>\nI am not sure.", "42", False),
        ("<think>\nAnswer: 42\n</think>\nAnswer: 41", "42", False),
        (THINK + "So it is 42.", "42", False),  # no answer line at all
        (THINK + "The Answer: 42", "42", False),  # an answer line starts the line
        (THINK + "Answer: 42 apples", "42", False),
        (THINK + "Answer:", "42", False),
        # two answer lines: the last counts
        (THINK + "Answer: 41\nAnswer: 42", "42", True),
        (THINK + "Answer: 42\nAnswer: 41", "42", False),
        # several think blocks: what follows the last </think> counts
        ("<think>a</think>\nAnswer: 41\n<think>b</think>\nAnswer: 42", "42", True),
        ("<think>a</think>\nAnswer: 42\n<think>b</think>\nAnswer: 41", "42", False),
        # Chinese label and punctuation
        (THINK + "答案：42。", "42", True),
        (THINK + "答案: 42", "42", True),
        (THINK + "答案：41。", "42", False),
        # no </think> at all: an answer line anywhere counts
        ("Answer: 42", "42", True),
        ("<think>\nthe working was cut off\nAnswer: 42", "42", True),
        ("I think 42", "42", False),
        # spacing carries no meaning in equations and relations, the values do
        (THINK + "Answer: x=5", "x = 5", True),
        (THINK + "Answer: x = 5", "x=5", True),
        (THINK + "Answer: x = -5", "x = 5", False),
        (THINK + "Answer: 4521 > 987", "4521 > 987", True),
        (THINK + "Answer: 4521>987", "4521 > 987", True),
        (THINK + "Answer: 4521 < 987", "4521 > 987", False),
        (THINK + "Answer: 987 < 4521", "4521 > 987", False),  # the canonical order only
        (THINK + "答案：4521 > 987。", "4521 > 987", True),
        (THINK + "Answer: -17", "-17", True),
        (THINK + "Answer: 17", "-17", False),
    ],
)
def test_checker_on_hand_written_completions(completion, answer, correct):
    assert synthetic.check(problem(answer), completion) is correct


def test_parse_answer_returns_the_final_answer_text():
    assert synthetic.parse_answer(THINK + "Answer: 41\nAnswer:  4521 > 987 .") == "4521 > 987"
    assert synthetic.parse_answer(THINK + "答案：x = -3。") == "x = -3"
    assert synthetic.parse_answer("<think>\nAnswer: 42\n</think>\n") is None
    assert synthetic.parse_answer("") is None


@pytest.mark.parametrize(
    "answer, gold",
    [
        (
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
            "72",
        ),
        ("He pays 1,000 + 234 = <<1000+234=1234>>1,234 dollars.\n#### 1,234", "1234"),
        ("#### 1,234\n", "1234"),
        ("The loss is 3.\n####-3", "-3"),
        ("#### 2.5", "2.5"),
        ("x = 5", "x = 5"),  # not GSM8K: as it is
        ("1,000", "1000"),
    ],
)
def test_gold_answer_of_gsm8k_answers(answer, gold):
    assert gold_answer(answer) == gold


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        ("1,000", "1000.0", True),
        ("1000.0", "1,000", True),
        ("1000", "1000", True),
        ("$1,234", "1234", True),
        ("1000.5", "1000.50", True),
        ("-7", "-7.0", True),
        ("0.10", "0.1", True),
        ("42。", "42", True),
        ("42.", "42", True),
        ("x=5", "x = 5", True),
        ("-7", "7", False),
        ("1001", "1000", False),
        ("12 apples", "12", False),
        ("", "0", False),
        (None, "1", False),
    ],
)
def test_answers_equal(predicted, gold, equal):
    assert answers_equal(predicted, gold) is equal


# --- pass@k --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 0, 1, 0.0),
        (5, 0, 5, 0.0),
        (5, 5, 1, 1.0),
        (5, 5, 3, 1.0),
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
        (5, 2, 2, 0.7),
        (4, 1, 4, 1.0),
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_against_hand_counts(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one():
    """Brute force: the share of the k-subsets of n samples (c correct) with a correct one."""
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                share = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(share, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="0 <= c <= n and 1 <= k <= n"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_samples": 3, "k": (1, 4)}, r"every k must be in \[1, eval.num_samples=3\]"),
        ({"num_samples": 3, "k": (0,)}, "every k"),
        ({"num_samples": 3, "temperature": 0.0}, "temperature > 0"),
    ],
)
def test_eval_options_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalOptions(**kwargs)


# --- eval files --------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines),
        encoding="utf-8",
    )
    return path


def test_file_items_read_gsm8k_records(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm8k_mini.jsonl",
        [
            {
                "question": "Sam has 1,000 apples and buys 234 more. How many?",
                "answer": "...\n#### 1,234",
            },
            "",  # blank lines are skipped
            {"question": "小明有3个苹果，又买了4个。一共几个？", "answer": "#### 7", "id": 2},
        ],
    )
    items = file_items(path)
    assert [(it.gold, it.kind, it.lang) for it in items] == [
        ("1234", "gsm8k_mini", "en"),
        ("7", "gsm8k_mini", "zh"),
    ]
    assert items[0].check(THINK + "Answer: 1,234")
    assert items[0].check(THINK + "Answer: 1234.0")
    assert not items[0].check("<think>\nAnswer: 1234\n</think>\n")
    assert items[1].check(THINK + "答案：7。")
    assert not items[1].check(THINK + "答案：8。")


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"question": "a", "answer": "1"}, {"question": "b"}], r"bad\.jsonl:2 lacks .*'answer'"),
        ([{"answer": "1"}], r"bad\.jsonl:1 lacks .*'question'"),
        ([{"question": "a", "answer": 1}], r"bad\.jsonl:1 lacks .*'answer'"),  # not text
        ([{"question": "a", "answer": "1"}, "", "{not json"], r"bad\.jsonl:3 is not JSON"),
        ([], "holds no records"),
        (["", "   "], "holds no records"),
    ],
)
def test_file_items_errors_name_the_problem(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        file_items(path)


def test_file_items_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"absent\.jsonl does not exist"):
        file_items(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("line", ["[1, 2]", '"just a string"', "42"])
def test_file_items_json_that_is_not_an_object(tmp_path, line):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, line])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 lacks .*'question', 'answer'"):
        file_items(path)


# --- corpus splits and the OOD split -----------------------------------------------------------

# sha256 of json.dumps([[question, answer, key] for the problems of
# synthetic.generate(CorpusConfig(), "test")], ensure_ascii=False): a change of the default test
# split (a sampler, a question template, the split rule, the defaults) must be deliberate.
DEFAULT_TEST_SHA256 = "ba28035f174162b2a5a9348f61664a682613142104fc7ffe4db51e875cb4bc99"


def split_digest(problems: list[Problem]) -> str:
    blob = json.dumps([[p.question, p.answer, p.key] for p in problems], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_default_test_split_is_pinned_and_unchanged_by_the_ood_field():
    default = synthetic.generate(CorpusConfig(), "test")
    assert len(default) == 500
    assert split_digest(default) == DEFAULT_TEST_SHA256
    assert synthetic.generate(CorpusConfig(ood=False), "test") == default
    items = corpus_items(CorpusConfig(), "test")
    assert [(it.question, it.gold, it.kind, it.lang) for it in items] == [
        (p.question, p.answer, p.kind, p.lang) for p in default
    ]


def operands(key: str) -> list[int]:
    return [int(x) for x in key.split(":")[1:] if x.lstrip("-").isdigit()]


def ndigits(n: int) -> int:
    return len(str(abs(n)))


def limits_of(p: Problem, c: CorpusConfig, ood: bool) -> None:
    """Assert that every number in the problem's key is within (ood=False) or beyond (ood=True)
    the training limits of `c`, exactly as CorpusConfig documents them."""
    d, md = c.max_digits + ood, c.max_multiplier_digits + ood
    fields = p.key.split(":")

    def inside(n: int, low: int, limit: int) -> bool:
        return limit < n <= 2 * limit if ood else low <= n <= limit

    if p.kind in ("add", "sub", "compare", "gcd"):
        assert all((ndigits(n) == d) if ood else ndigits(n) <= d for n in operands(p.key)), p.key
    elif p.kind == "mul":
        a, b = operands(p.key)
        if ood:
            assert sorted([ndigits(a), ndigits(b)]) == sorted([d, md]), p.key
        else:
            assert min(ndigits(a), ndigits(b)) <= md and max(ndigits(a), ndigits(b)) <= d, p.key
    elif p.kind == "price":
        price, qty = int(fields[2]), int(fields[3])
        assert inside(price, 1, c.max_rate) and inside(qty, 2, c.max_quantity), p.key
    elif p.kind == "rate":
        r1, r2, hours = int(fields[2]), int(fields[3]), int(fields[4])
        rates = [r1, r2] if fields[1] == "work" else [r1]
        assert all(inside(r, 2, c.max_rate) for r in rates), p.key
        assert inside(hours, 1, c.max_quantity), p.key
    elif p.kind == "unit":
        big, digits = int(fields[3]), max(1, c.max_digits - 1)
        assert (ndigits(big) == digits + 1) if ood else 1 <= big < 10**digits, p.key
    elif p.kind == "linear":
        a, b, total = int(fields[1]), int(fields[2]), int(fields[3])
        x = (total - b) // a
        assert a * x + b == total, p.key
        assert inside(abs(a), 2, c.max_coef), p.key
        if ood:
            assert inside(abs(x), 0, c.max_coef) and inside(abs(b), 0, 10 * c.max_coef), p.key
        else:
            assert abs(x) <= c.max_coef and abs(b) <= 10 * c.max_coef, p.key
    else:
        raise AssertionError(f"no limits known for kind {p.kind!r}: extend this test")


SMALL_KNOBS = CorpusConfig(
    num_train=0,
    num_val=45,
    num_test=45,
    max_digits=2,
    max_multiplier_digits=1,
    max_quantity=10,
    max_rate=20,
    max_coef=4,
)


@pytest.mark.parametrize("config", [CorpusConfig(), SMALL_KNOBS], ids=["default", "small"])
def test_ood_split_exceeds_every_training_limit(config):
    ood = synthetic.generate(synthetic.ood_config(config), "test")
    assert len(ood) == config.num_test
    assert {p.kind for p in ood} == set(config.kinds)
    for p in ood:
        limits_of(p, config, ood=True)
    held_out = {s: synthetic.generate(config, s) for s in ("validation", "test")}
    for split, problems in held_out.items():
        for p in problems:  # the in-distribution problems keep to the limits...
            limits_of(p, config, ood=False)
        # ... so none of them is an OOD problem, and the OOD questions are new too
        assert not {p.key for p in ood} & {p.key for p in problems}, split
        assert not {p.question for p in ood} & {p.question for p in problems}, split
    items = corpus_items(config, "ood")
    assert [it.question for it in items] == [p.question for p in ood]
    # the ood field is all that ood_config changes
    assert dataclasses.replace(synthetic.ood_config(config), ood=False) == config
    assert synthetic.ood_config(config).fingerprint() != config.fingerprint()


def test_corpus_items_limit_is_a_balanced_prefix_and_bad_splits_fail():
    config = CorpusConfig(num_train=0, num_val=90, num_test=90)
    for split in ("test", "validation", "ood"):
        full = corpus_items(config, split)
        head = corpus_items(config, split, limit=18)
        assert [it.question for it in head] == [it.question for it in full[:18]]
        assert sorted(it.kind for it in head) == sorted(synthetic.KINDS * 2)
    with pytest.raises(ValueError, match="'train' is not one of"):
        corpus_items(config, "train")


# --- the evaluate CLI: bad input fails before any model is loaded or token generated -----------


def eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


@pytest.fixture
def no_generation(monkeypatch):
    """Any model load (and so any generation) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(evaluate_cli, "load_model", refuse)
    monkeypatch.setattr(evaluate_cli, "run_evaluation", refuse)


@pytest.fixture
def fake_hf(tmp_path) -> Path:
    """A folder `evaluate` takes for an HF export (config.json) but cannot load a model from."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_evaluate_refuses_a_missing_ckpt(tmp_path, no_generation):
    with pytest.raises(ValueError, match="no such file or folder"):
        evaluate(eval_cfg(f"ckpt={tmp_path / 'absent'}"))
    with pytest.raises(ValueError, match="usage: python -m tinyreason.evaluate ckpt="):
        evaluate(eval_cfg())
    (tmp_path / "run").mkdir()  # a folder that is neither a run dir nor an HF folder
    with pytest.raises(ValueError, match="no checkpoint at"):
        evaluate(eval_cfg(f"ckpt={tmp_path / 'run'}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["eval.splits=[test,nope]"],
            r"eval.splits: 'nope' is not one of \['test', 'validation', 'ood'\]",
        ),
        (["eval.splits=[train]"], "'train' is not one of"),
        (["eval.num_samples=2", "eval.k=[1,4]"], r"every k must be in \[1, eval.num_samples=2\]"),
        (["eval.num_samples=4", "eval.temperature=0"], "temperature > 0"),
        (["eval.files=[absent.jsonl]"], "absent.jsonl does not exist"),
        (["eval.splits=[absent.jsonl]"], "absent.jsonl does not exist"),
        (["eval.splits=[]", "eval.files=[]"], "nothing to evaluate"),
        (["+corpus.max_digitz=3"], r"unknown key\(s\) \['max_digitz'\] in corpus"),
        (["+corpus.max_digits=12"], "max_digits=12 must be in"),
    ],
)
def test_evaluate_bad_input_fails_before_generation(fake_hf, no_generation, overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluate(eval_cfg(f"ckpt={fake_hf}", "eval.num_problems=9", *overrides))


def test_corpus_config_is_the_runs_then_the_overrides(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    data = {"name": "reasoning", "corpus": {"max_digits": 2, "kinds": ["add", "compare"]}}
    OmegaConf.save({"data": data}, run / ".hydra" / "config.yaml")
    assert corpus_config(run, {"num_test": 7}) == CorpusConfig(
        max_digits=2, kinds=("add", "compare"), num_test=7
    )
    assert corpus_config(None, {}) == CorpusConfig()
    text = {"name": "text_files", "corpus": {"paths": ["a.txt"]}}
    OmegaConf.save({"data": text}, run / ".hydra" / "config.yaml")
    assert corpus_config(run, {}) == CorpusConfig()  # not a reasoning run: the default corpus
    sets = eval_sets(
        EvalConfig.from_dict({"splits": ["ood"], "num_problems": 9, "files": []}),
        CorpusConfig(max_digits=2),
    )
    assert list(sets) == ["ood"] and len(sets["ood"]) == 9


def test_ood_problems_caps_the_ood_split_only():
    small = CorpusConfig(max_digits=2)
    config = EvalConfig.from_dict({"splits": ["test", "ood"], "ood_problems": 18})
    sets = eval_sets(config, small)
    assert len(sets["test"]) == 500 and len(sets["ood"]) == 18  # the test split stays whole
    prefix = [it.question for it in corpus_items(small, "ood", 18)]
    assert [it.question for it in sets["ood"]] == prefix  # a prefix: balanced over kinds
    both = EvalConfig.from_dict({"splits": ["test", "ood"], "num_problems": 9, "ood_problems": 18})
    assert [len(v) for v in eval_sets(both, small).values()] == [9, 9]  # the smaller cap
    for bad in (0, -1, 2.5, True, "all"):
        with pytest.raises(ValueError, match="eval.ood_problems=.* positive integer or null"):
            EvalConfig.from_dict({"ood_problems": bad})


# --- the key invariant: overfit problems score 100%, others ~0% --------------------------------

TINY = CorpusConfig(
    kinds=("compare",), langs=("en",), max_digits=2, num_train=4, num_val=0, num_test=8
)


def problem_item(p: Problem) -> Item:
    return Item(p.question, p.answer, p.kind, p.lang, lambda c, p=p: synthetic.check(p, c))


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A debug CausalLM trained (plain AdamW, fp32) on 4 fixed problems' conversations until
    its greedy completions reproduce their solutions; with the tokenizer as a run saves it."""
    seen, others = synthetic.generate(TINY, "train"), synthetic.generate(TINY, "test")
    docs = [chat_document(p.question, solution(p)) for p in seen]
    folder = tmp_path_factory.mktemp("overfit") / "tokenizer"
    all_docs = docs + [chat_document(p.question, solution(p)) for p in others]
    train_bpe(all_docs, TokenizerConfig(vocab_size=300)).save_pretrained(folder)
    tok = load(folder)  # as training loads it (the think tags survive decoding)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    torch.manual_seed(0)
    model = CausalLM(debug_config(model_vocab_size(tok), "dense")).float()
    assert max(map(len, ids)) <= model.config.max_seq_len
    width = max(map(len, ids))
    inputs = torch.full((len(ids), width), tok.pad_token_id)
    targets = torch.full((len(ids), width), -100)
    for i, seq in enumerate(ids):
        inputs[i, : len(seq)] = torch.tensor(seq)
        targets[i, : len(seq) - 1] = torch.tensor(seq[1:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    items = [problem_item(p) for p in seen]
    options = EvalOptions(max_new_tokens=width, batch_size=4)
    for step in range(1, 401):
        model.train()
        loss = model(inputs, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            _, records = evaluate_items(model, tok, items, options)
            if [r["completion"] for r in records] == [solution(p) for p in seen]:
                break
    else:
        pytest.fail(f"the model did not learn its 4 problems in {step} steps (loss {loss:.3f})")
    model.eval()
    return model, tok, seen, others, options


@pytest.mark.slow
def test_overfit_model_scores_all_of_its_problems_and_few_others(overfit):
    model, tok, seen, others, options = overfit
    report, records = evaluate_items(model, tok, [problem_item(p) for p in seen], options)
    assert report["exact_match"] == 1.0
    assert report["by_kind"] == {"compare": 1.0} and report["by_lang"] == {"en": 1.0}
    assert report["no_answer"] == 0.0 and report["num_problems"] == 4
    assert [r["completion"] for r in records] == [solution(p) for p in seen]
    assert all(r["correct"] and r["gold"] == p.answer for r, p in zip(records, seen, strict=True))
    # a completion's length counts its tokens and the eos that ended it
    lengths = [
        len(tok(solution(p) + tok.eos_token, add_special_tokens=False)["input_ids"]) for p in seen
    ]
    assert report["mean_completion_tokens"] == sum(lengths) / 4

    unseen = corpus_items(TINY, "test")
    assert not {it.question for it in unseen} & {p.question for p in seen}
    report, records = evaluate_items(model, tok, unseen, options)
    assert report["num_problems"] == 8
    assert report["exact_match"] < 0.5
    assert report["exact_match"] == sum(r["correct"] for r in records) / 8
    # a wrong answer is still an answer: the model writes one of the answer lines it learned
    assert report["no_answer"] < 1.0


@pytest.mark.slow
def test_overfit_batching_does_not_change_completions(overfit):
    model, tok, seen, others, options = overfit
    items = [problem_item(p) for p in [others[0], seen[0], others[1], seen[1]]]
    _, batched = evaluate_items(model, tok, items, dataclasses.replace(options, batch_size=3))
    _, single = evaluate_items(model, tok, items, dataclasses.replace(options, batch_size=1))
    assert batched == single
    assert [r["correct"] for r in batched[1::2]] == [True, True]


@pytest.mark.slow
def test_pass_at_k_of_top_k_1_samples_equals_exact_match(overfit):
    """top_k=1 samples are the greedy completion: every item's samples are all right or all
    wrong, and pass@k is the exact match for every k."""
    model, tok, seen, others, options = overfit
    items = [problem_item(p) for p in seen[:2] + others[:3]]
    sampled = dataclasses.replace(options, num_samples=3, k=(1, 3), temperature=1.0, top_k=1)
    report, records = evaluate_items(model, tok, items, sampled)
    for r in records:
        assert r["samples_correct"] == 3 * r["correct"]
    assert report["pass_at_k"] == {"pass@1": report["exact_match"], "pass@3": report["exact_match"]}
    assert report["exact_match"] == pytest.approx((2 + sum(r["correct"] for r in records[2:])) / 5)
    # with real sampling the report is the unbiased estimator averaged over the items' counts
    hot = dataclasses.replace(options, num_samples=3, k=(1, 2, 3), temperature=2.0, seed=3)
    report, records = evaluate_items(model, tok, items[1:4], hot)
    counts = [r["samples_correct"] for r in records]
    assert all(0 <= c <= 3 for c in counts)
    for k in (1, 2, 3):
        assert report["pass_at_k"][f"pass@{k}"] == pytest.approx(
            sum(pass_at_k(3, c, k) for c in counts) / 3
        )


@pytest.mark.slow
def test_evaluate_cli_on_an_hf_export_of_the_overfit_model(overfit, tmp_path):
    """`evaluate ckpt=<HF folder> eval.files=[...]` reports what evaluate_items reports, and
    writes eval.json and one completions.jsonl line per problem."""
    from tinyreason.checkpoints import export_model

    model, tok, seen, others, options = overfit
    hf = export_model(model, tok, tmp_path / "hf", drop_mtp=True)
    records = [{"question": p.question, "answer": f"(worked)\n#### {p.answer}"} for p in seen]
    path = write_jsonl(tmp_path / "seen.jsonl", records)
    out = tmp_path / "out"
    cfg = eval_cfg(
        f"ckpt={hf}",
        "eval.splits=[test]",
        f"eval.files=[{path}]",
        f"eval.max_new_tokens={options.max_new_tokens}",
        f"out={out}",
        "+corpus.kinds=[compare]",
        "+corpus.langs=[en]",
        "+corpus.max_digits=2",
        "+corpus.num_test=8",
    )
    reports = evaluate(cfg)
    assert set(reports) == {"test", "seen"}
    assert reports["seen"]["exact_match"] == 1.0
    expected, _ = evaluate_items(model, tok, corpus_items(TINY, "test"), options)
    assert reports["test"]["exact_match"] == expected["exact_match"] < 0.5
    written = json.loads((out / "eval.json").read_text())
    assert written["seen"]["exact_match"] == 1.0 and set(written) == {"test", "seen"}
    lines = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [x["split"] for x in lines] == ["test"] * 8 + ["seen"] * 4
    assert [x["completion"] for x in lines[8:]] == [solution(p) for p in seen]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="library bug: the tokenizer train_bpe returns (before save/load) marks <think> and "
    "</think> special in its backend, so decode(skip_special_tokens=True) drops them",
)
def test_completions_keep_the_think_tags_with_a_freshly_trained_tokenizer(overfit):
    model, tok, seen, others, options = overfit
    docs = [chat_document(p.question, solution(p)) for p in seen + others]
    fresh = train_bpe(docs, TokenizerConfig(vocab_size=300))
    if fresh.get_vocab() != tok.get_vocab():  # the same tokenizer, before save and load
        pytest.fail("train_bpe is not deterministic: the precondition of this test is broken")
    texts, _ = complete(model, fresh, [seen[0].question], SamplingConfig(options.max_new_tokens), 1)
    assert texts == [solution(seen[0])]
