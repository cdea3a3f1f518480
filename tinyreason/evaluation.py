"""Exact match on held-out problems: the measure of reasoning every training result is judged by.

An `EvalSet` is a list of `Item`s (question, gold answer, kind, language, checker) from
    test / validation   a split of the embedded corpus (the run's corpus config)
    ood                 the same kinds with every operand beyond the training limits
                        (`synthetic.ood_config`): length generalisation
    <file>.jsonl        `question` + `answer` records; a GSM8K answer ends in `#### N` and only N
                        counts (commas stripped, compared as numbers)
`evaluate_items` answers them with the batched sampler (greedy, the chat template) and reports
exact match overall / per kind / per language, the share with no parsable answer, the mean
completion length and tokens/s; with `num_samples > 1` also pass@k by the unbiased estimator
1 - C(n-c, k) / C(n, k) (Chen et al. 2021, arXiv 2107.03374). `speculative` drafts the greedy
completions with the model's MTP module (`tinyreason.speculative`: the same tokens, fewer main
forwards) and reports the drafts' acceptance rate; its pass@k samples are drafted too (speculative
sampling: the same distribution). `compile` runs the plain decoder's step through torch.compile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from tinyreason.data import synthetic
from tinyreason.data.sources import dataclass_from_dict, language_of
from tinyreason.model import CausalLM, ModelConfig
from tinyreason.sampling import SamplingConfig, progress_bar, prompt_ids, sample
from tinyreason.speculative import SpeculativeStats, check_speculative, speculative_sample

log = logging.getLogger(__name__)

CORPUS_SPLITS = ("test", "validation", "ood")


@dataclass(frozen=True)
class Item:
    question: str
    gold: str
    kind: str
    lang: str
    check: Callable[[str], bool] = field(repr=False, compare=False)


def corpus_items(
    config: synthetic.CorpusConfig, split: str, limit: int | None = None
) -> list[Item]:
    """`test` / `validation` of the corpus, or `ood` (the test split of `ood_config`)."""
    if split not in CORPUS_SPLITS:
        raise ValueError(
            f"eval split {split!r} is not one of {list(CORPUS_SPLITS)} or a .jsonl file"
        )
    if split == "ood":
        config, split = synthetic.ood_config(config), "test"
    if limit is not None:  # generate() is round-robin over kinds: a prefix stays balanced
        config = _with_size(config, split, limit)
    problems = synthetic.generate(config, split)
    return [problem_item(p) for p in problems]


def _with_size(config: synthetic.CorpusConfig, split: str, n: int) -> synthetic.CorpusConfig:
    key = {"test": "num_test", "validation": "num_val"}[split]
    return dataclasses.replace(config, **{key: min(n, getattr(config, key))})


def problem_item(p: synthetic.Problem) -> Item:
    """A corpus problem as an eval `Item`, checked by `synthetic.check` (GRPO's prompts too)."""
    return Item(p.question, p.answer, p.kind, p.lang, lambda c, p=p: synthetic.check(p, c))


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def gold_answer(answer: str) -> str:
    """A GSM8K answer's final `#### N`, commas stripped; any other answer as it is."""
    match = _GSM8K_FINAL.search(answer)
    gold = match.group(1) if match else answer
    return gold.replace(",", "").strip()


def answers_equal(predicted: str | None, gold: str) -> bool:
    """Numbers compare by value ("1,000" == "1000" == "1000.0"); anything else without spaces."""
    if predicted is None:
        return False
    a = predicted.replace(",", "").strip().rstrip("。.").strip()
    b = gold.replace(",", "").strip()
    a = a.removeprefix("$")
    if _NUMBER.match(a) and _NUMBER.match(b):
        return float(a) == float(b)
    return "".join(a.split()) == "".join(b.split())


def file_items(path: str | Path) -> list[Item]:
    """Items of a jsonl file of `question` / `answer` records (GSM8K's format included)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval file {path} does not exist")
    items = []
    kind = f"{path.parent.name}_{path.stem}" if path.stem in CORPUS_SPLITS else path.stem
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON ({e})") from e
        missing = [
            k
            for k in ("question", "answer")
            if not isinstance(record, dict) or not isinstance(record.get(k), str)
        ]
        if missing:
            raise ValueError(
                f"{path}:{n} lacks the text field(s) {missing}; each line needs 'question' and 'answer'"
            )
        gold = gold_answer(record["answer"])
        check = lambda c, gold=gold: answers_equal(synthetic.parse_answer(c), gold)
        lang = language_of(record["question"])
        items.append(Item(record["question"], gold, kind, lang, check))
    if not items:
        raise ValueError(f"eval file {path} holds no records")
    return items


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class EvalOptions:
    max_new_tokens: int = 256
    batch_size: int = 64
    num_samples: int = 1  # > 1: also sampled completions for pass@k
    k: tuple[int, ...] = (1,)
    temperature: float = 0.8  # of the pass@k samples; exact match is always greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    speculative: bool = False  # completions drafted by the MTP module (needs mtp.depth >= 1)
    compile: bool = (
        False  # decode steps through torch.compile (falls back to eager, with a warning)
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", tuple(self.k))
        for key in ("speculative", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"eval.{key} must be true or false, got {getattr(self, key)!r}")
        if self.num_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                "eval.num_samples, eval.batch_size and eval.max_new_tokens must be >= 1, got "
                f"{self.num_samples}, {self.batch_size}, {self.max_new_tokens}"
            )
        if self.num_samples > 1:
            bad = [k for k in self.k if not 1 <= k <= self.num_samples]
            if bad:
                raise ValueError(
                    f"eval.k={list(self.k)}: every k must be in [1, eval.num_samples={self.num_samples}]"
                )
            if self.temperature <= 0:
                raise ValueError("pass@k samples need eval.temperature > 0")


def _prompt(tokenizer: PreTrainedTokenizerFast, question: str) -> list[int]:
    """The chat template with a generation prompt, as `tinyreason.generate` renders it."""
    return prompt_ids(tokenizer, question, chat=True)[0].tolist()


def complete(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerFast,
    questions: list[str],
    config: SamplingConfig,
    batch_size: int,
    seed_offset: int = 0,
    speculative: SpeculativeStats | None = None,
    progress: str | None = None,
    compile: bool = False,
) -> tuple[list[str], list[int]]:
    """(completions, their token counts): `batch_size` rows decode at once, a finished row's slot
    taking the next question (continuous batching, `sampling.sample`; `compile`: its decode step
    compiled). With `speculative` (a stats object it adds to): MTP-drafted, the same greedy
    completions, or samples of the same distribution. `progress`: a label to show progress
    under (a bar on a terminal, else a log line per tenth)."""
    prompts = [_prompt(tokenizer, q) for q in questions]
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0)
    seeds = [config.seed + seed_offset + i for i in range(len(prompts))]
    with progress_bar(len(prompts), progress) as bar:
        if speculative is not None:
            new = _speculative_batches(
                model, prompts, config, batch_size, speculative, seeds, special, bar
            )
        else:
            new = sample(
                model,
                prompts,
                config,
                **special,
                seeds=seeds,
                batch_size=batch_size,
                progress=bar,
                fit_window=True,
                compile=compile,
            )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    return texts, [len(ids) for ids in new]


def _speculative_batches(
    model, prompts, config, batch_size, stats, seeds, special, progress
) -> list[list[int]]:
    """MTP-drafted completions (greedy, or sampled with the same distribution), longest prompts
    first, `batch_size` at a time."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    limit = model.config.max_seq_len
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        room = limit - max(len(p) for p in batch) + 1  # the window bounds what can be written
        if room < 1:
            raise ValueError(f"a prompt of {max(len(p) for p in batch)} tokens fills the window")
        cfg = SamplingConfig(min(config.max_new_tokens, room), *_rest(config))
        kw = dict(stats=stats, seeds=[seeds[i] for i in rows])
        for i, ids in zip(
            rows, speculative_sample(model, batch, cfg, **special, **kw), strict=True
        ):
            out[i] = ids
        if progress is not None:
            progress(len(rows))
    return out


def _rest(config: SamplingConfig) -> tuple:
    return config.temperature, config.top_p, config.top_k, config.seed


def evaluate_items(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerFast,
    items: list[Item],
    options: EvalOptions = EvalOptions(),
    label: str | None = None,
) -> tuple[dict, list[dict]]:
    """(report, one record per item) for greedy exact match, plus pass@k when num_samples > 1.
    `label`: show progress under this name (`complete`)."""
    if options.speculative:  # before any generation
        check_speculative(model.config)
    start = time.perf_counter()
    greedy = SamplingConfig(options.max_new_tokens)
    drafts = SpeculativeStats() if options.speculative else None
    questions = [it.question for it in items]
    texts, lengths = complete(
        model, tokenizer, questions, greedy, options.batch_size, 0, drafts, label, options.compile
    )
    seconds = time.perf_counter() - start
    correct = [it.check(t) for it, t in zip(items, texts, strict=True)]
    records = [
        {
            "question": it.question,
            "gold": it.gold,
            "kind": it.kind,
            "lang": it.lang,
            "completion": t,
            "correct": ok,
        }
        for it, t, ok in zip(items, texts, correct, strict=True)
    ]
    report = {
        "num_problems": len(items),
        "exact_match": sum(correct) / len(items),
        "by_kind": _share_by(items, correct, lambda it: it.kind),
        "by_lang": _share_by(items, correct, lambda it: it.lang),
        "no_answer": sum(synthetic.parse_answer(t) is None for t in texts) / len(items),
        "mean_completion_tokens": sum(lengths) / len(items),
        "tokens_per_s": sum(lengths) / max(seconds, 1e-9),
    }
    if drafts is not None:
        report["speculative"] = drafts.as_dict()
    if options.num_samples > 1:
        report["pass_at_k"] = _pass_at_k(model, tokenizer, items, options, records)
    return report, records


def _share_by(
    items: list[Item], correct: list[bool], key: Callable[[Item], str]
) -> dict[str, float]:
    hits, counts = defaultdict(int), defaultdict(int)
    for it, ok in zip(items, correct, strict=True):
        counts[key(it)] += 1
        hits[key(it)] += ok
    return {k: hits[k] / counts[k] for k in sorted(counts)}


def _pass_at_k(
    model, tokenizer, items, options: EvalOptions, records: list[dict]
) -> dict[str, float]:
    n = options.num_samples
    config = SamplingConfig(
        options.max_new_tokens, options.temperature, options.top_p, options.top_k, options.seed
    )
    questions = [it.question for it in items for _ in range(n)]
    drafts = SpeculativeStats() if options.speculative else None
    texts, _ = complete(
        model, tokenizer, questions, config, options.batch_size, 0, drafts, None, options.compile
    )
    counts = []
    for i, (it, rec) in enumerate(zip(items, records, strict=True)):
        samples = texts[i * n : (i + 1) * n]
        rec["samples_correct"] = sum(it.check(t) for t in samples)
        counts.append(rec["samples_correct"])
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in counts) / len(items) for k in options.k}


@dataclass(frozen=True)
class EvalConfig:
    """The `eval` config group (the same keys in `train` and `evaluate`), typed."""

    options: EvalOptions = field(default_factory=EvalOptions)
    splits: tuple[str, ...] = ("test", "ood")
    num_problems: int | None = None  # per split or file; None = all of it
    ood_problems: int | None = None  # at most this many of the ood split (and num_problems)
    files: tuple[str, ...] = ()
    during_training_problems: int = 64  # train: greedy exact match at every validation; 0 = off
    during_training_split: str = "validation"
    at_end: bool = True  # train: evaluate `splits` and `files` on the final weights

    @classmethod
    def from_dict(cls, d: dict, model: ModelConfig | None = None) -> EvalConfig:
        """The `eval` group; given the run's `model`, also refuse what it cannot run
        (`speculative` without MTP) before any work."""
        d = dict(d)
        option_keys = [f.name for f in dataclasses.fields(EvalOptions)]
        options = dataclass_from_dict(
            EvalOptions, {k: d.pop(k) for k in option_keys if k in d}, "eval"
        )
        during = dict(d.pop("during_training", None) or {})
        unknown = sorted(set(d) - {"splits", "num_problems", "ood_problems", "files", "at_end"})
        unknown += sorted(f"during_training.{k}" for k in set(during) - {"num_problems", "split"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in eval")
        if options.speculative and model is not None:
            check_speculative(model)
        for key in ("num_problems", "ood_problems"):
            n = d.get(key)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"eval.{key}={n!r} must be a positive integer or null (all)")
        split = during.get("split", "validation")
        if split not in CORPUS_SPLITS:
            raise ValueError(
                f"eval.during_training.split={split!r} is not one of {list(CORPUS_SPLITS)}"
            )
        return cls(
            options=options,
            splits=tuple(d.get("splits", ("test", "ood"))),
            num_problems=d.get("num_problems"),
            ood_problems=d.get("ood_problems"),
            files=tuple(d.get("files", ())),
            during_training_problems=during.get("num_problems", 64) or 0,
            during_training_split=split,
            at_end=bool(d.get("at_end", True)),
        )


def file_set_name(path: str) -> str:
    """A file's name in reports: its stem, or <folder>_<stem> when the stem is a split's name
    (gsm8k/test.jsonl -> gsm8k_test)."""
    p = Path(path)
    return f"{p.parent.name}_{p.stem}" if p.stem in CORPUS_SPLITS else p.stem


def eval_sets(config: EvalConfig, corpus: synthetic.CorpusConfig) -> dict[str, list]:
    """Every requested split and file, built (and so checked) before any generation."""
    sets = {}
    for split in config.splits:
        if str(split).endswith(".jsonl"):
            sets[file_set_name(split)] = file_items(split)[: config.num_problems]
        elif split not in CORPUS_SPLITS:
            raise ValueError(
                f"eval.splits: {split!r} is not one of {list(CORPUS_SPLITS)} (files go in eval.files)"
            )
        else:
            caps = [config.num_problems] + ([config.ood_problems] if split == "ood" else [])
            limit = min((n for n in caps if n is not None), default=None)
            sets[split] = corpus_items(corpus, split, limit)
    for path in config.files:
        sets[file_set_name(path)] = file_items(path)[: config.num_problems]
    if not sets:
        raise ValueError("nothing to evaluate: eval.splits and eval.files are both empty")
    return sets


def summary(name: str, report: dict) -> str:
    kinds = " ".join(f"{k} {v:.0%}" for k, v in report["by_kind"].items())
    line = f"{name}: exact match {report['exact_match']:.1%} of {report['num_problems']} ({kinds})"
    for key, value in report.get("pass_at_k", {}).items():
        line += f", {key} {value:.1%}"
    if "speculative" in report:
        s = report["speculative"]
        line += f"; drafts accepted {s['acceptance_rate']:.1%}, {s['tokens_per_forward']:.2f} tokens/forward"
    return line + f"; no answer {report['no_answer']:.1%}, {report['tokens_per_s']:.0f} tokens/s"


def run_evaluation(model, tokenizer, sets: dict[str, list], options: EvalOptions, out: Path | None):
    """Evaluate every set; write eval.json and completions.jsonl to `out` when given."""
    reports, lines = {}, []
    for name, items in sets.items():
        report, records = evaluate_items(model, tokenizer, items, options, label=name)
        reports[name] = report
        lines += [json.dumps({"split": name, **r}, ensure_ascii=False) for r in records]
        log.info(summary(name, report))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(reports, indent=2, ensure_ascii=False))
        (out / "completions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        log.info("wrote %s and %s", out / "eval.json", out / "completions.jsonl")
    return reports
