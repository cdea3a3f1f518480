"""Our exact match as an lm-evaluation-harness task: `python -m tinyreason.evaluate export_tasks=<dir>`.

`export_tasks(folder, corpus, eval_config)` writes, for every set that `tinyreason.evaluate` would
score (the corpus splits of `eval.splits`: test / validation / ood, `eval.num_problems` each, and
the jsonl files of `eval.files`),

    <name>.jsonl              question, answer (the gold), kind, lang, check (which rule scores it)
    tinyreason_<name>.yaml    task `tinyreason_<name>`: generate_until over that file
    tinyreason_reasoning.yaml group `tinyreason_reasoning` = the test split (else the first set)
    utils.py                  `process_results`, a shim onto `process_results` below

and logs the command to run; an HF export then gets the same greedy exact match as ours:

    lm_eval --model hf --model_args pretrained=<HF folder>,dtype=float32 \\
        --include_path <dir> --tasks tinyreason_reasoning --batch_size 1 --log_samples --output_path <out>

Why the numbers agree (tests/test_lm_eval.py checks it per problem):
  * the prompt is our chat template rendered around `{{question}}` ("<|bos|><|user|>...<|assistant|>").
    It starts with the tokenizer's bos, so lm-eval's HFLM encodes it with add_special_tokens=False
    (`has_bos_prefix`): one bos, never two, whatever `add_bos_token` says. Do not pass
    `--apply_chat_template`: the template is already applied.
  * greedy (`do_sample: false`), stopping at "<|eos|>" (also HF's eos_token_id); lm-eval decodes
    with skip_special_tokens=True, as `evaluation.complete` does.
  * the metric is our checker: the last "Answer:" / "答案：" line after </think>
    (`synthetic.parse_answer`), compared without whitespace for corpus problems (`synthetic.check`)
    and by `evaluation.answers_equal` for jsonl files (`evaluation.file_items`).
Ours also caps generation at the model's window (prompt + max_new_tokens <= max_seq_len); keep
`eval.max_new_tokens` within it. `--batch_size 1` avoids left-padding numerics in HF's generate.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import yaml

from tinyreason.data import synthetic
from tinyreason.evaluation import (
    CORPUS_SPLITS,
    EvalConfig,
    Item,
    answers_equal,
    corpus_items,
    file_items,
    file_set_name,
)
from tinyreason.tokenizer import EOS, chat_prompt

log = logging.getLogger(__name__)

GROUP = "tinyreason_reasoning"
PREFIX = "tinyreason_"
UTILS = '''"""lm-eval metric of the tinyreason tasks in this folder (written by tinyreason.lm_eval_task)."""

from tinyreason.lm_eval_task import process_results  # noqa: F401
'''


def prompt_template() -> str:
    """Our chat template's generation prompt around lm-eval's `{{question}}` placeholder."""
    return chat_prompt("{{question}}")


def is_correct(check: str, gold: str, completion: str) -> bool:
    """`synthetic.check` (check="corpus") or the jsonl rule of `evaluation.file_items` ("file")."""
    answer = synthetic.parse_answer(completion)
    if answer is None:
        return False
    if check == "file":
        return answers_equal(answer, gold)
    return "".join(answer.split()) == "".join(gold.split())


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's per-document metric: 1.0 when the greedy completion's answer is the gold."""
    return {"exact_match": float(is_correct(doc["check"], doc["answer"], results[0]))}


def _sets(corpus: synthetic.CorpusConfig, config: EvalConfig) -> dict[str, tuple[str, list[Item]]]:
    """name -> (check rule, items): the corpus splits, then the files (as `evaluation.eval_sets`)."""
    limit = config.num_problems
    sets: dict[str, tuple[str, list[Item]]] = {}
    for split in config.splits:
        if str(split).endswith(".jsonl"):
            sets[file_set_name(split)] = ("file", file_items(split)[:limit])
        elif split not in CORPUS_SPLITS:
            raise ValueError(f"eval.splits: {split!r} is not one of {list(CORPUS_SPLITS)}")
        else:
            sets[str(split)] = ("corpus", corpus_items(corpus, split, limit))
    for path in config.files:
        sets[file_set_name(path)] = ("file", file_items(path)[:limit])
    if not sets:
        raise ValueError("nothing to export: eval.splits and eval.files are both empty")
    return sets


def task_config(name: str, data_file: Path, max_new_tokens: int) -> dict:
    return {
        "task": PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": prompt_template(),
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {
            "until": [EOS],
            "do_sample": False,
            "max_gen_toks": int(max_new_tokens),
        },
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _write_yaml(path: Path, config: dict, function: str | None = None) -> None:
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    if function is not None:  # a tag safe_dump cannot write; lm-eval resolves it beside the yaml
        text += f"process_results: !function {function}\n"
    path.write_text(text, encoding="utf-8")


def export_tasks(folder: Path, corpus: synthetic.CorpusConfig, config: EvalConfig) -> list[Path]:
    """Write the jsonl files, task YAMLs, group and utils.py to `folder`; return the paths written."""
    folder, sets = Path(folder), _sets(corpus, config)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (check, items) in sets.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"eval set {name!r}: a task name takes letters, digits, _ and - only")
        data = folder / f"{name}.jsonl"
        records = [
            {
                "question": it.question,
                "answer": it.gold,
                "kind": it.kind,
                "lang": it.lang,
                "check": check,
            }
            for it in items
        ]
        data.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
        task = folder / f"{PREFIX}{name}.yaml"
        config = task_config(name, data, config.options.max_new_tokens)
        _write_yaml(task, config, "utils.process_results")
        written += [data, task]
    main = "test" if "test" in sets else next(iter(sets))
    group = {
        "group": GROUP,
        "task": [PREFIX + main],
        "aggregate_metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}
        ],
        "metadata": {"version": 1.0},
    }
    _write_yaml(folder / f"{GROUP}.yaml", group)
    (folder / "utils.py").write_text(UTILS, encoding="utf-8")
    written += [folder / f"{GROUP}.yaml", folder / "utils.py"]
    log.info(
        "wrote lm-eval tasks %s (%s = %s) to %s; run: %s",
        ", ".join(PREFIX + n for n in sets),
        GROUP,
        PREFIX + main,
        folder,
        lm_eval_command(folder),
    )
    return written


def lm_eval_command(folder: Path, hf_folder: str = "<HF export folder>") -> str:
    return (
        f"lm_eval --model hf --model_args pretrained={hf_folder},dtype=float32 "
        f"--include_path {Path(folder).resolve()} --tasks {GROUP} --batch_size 1 "
        f"--log_samples --output_path {Path(folder).resolve() / 'results'}"
    )
