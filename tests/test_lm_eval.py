"""The lm-evaluation-harness export (`tinyreason.lm_eval_task`): its metric is our checker, its
tasks load offline, and lm-eval's greedy exact match on an HF export equals ours problem by
problem (same prompt ids, same completions, same correct flags)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tinyreason.data import synthetic
from tinyreason.evaluate import corpus_config
from tinyreason.evaluation import (
    EvalConfig,
    EvalOptions,
    _prompt,
    corpus_items,
    evaluate_items,
    file_items,
)
from tinyreason.lm_eval_task import GROUP, export_tasks, process_results

N, MAX_NEW = 8, 48


def eval_cfg(**overrides):
    base = {"splits": ["test", "ood"], "num_problems": N, "max_new_tokens": MAX_NEW, "files": []}
    return EvalConfig.from_dict({**base, **overrides})


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access, and the json builder's cache in tmp_path, not ~/.cache."""
    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def test_process_results_is_our_checker(tmp_path):
    """On right, wrong, respaced and answerless completions, en and zh, corpus and jsonl items."""
    problems = synthetic.generate(synthetic.CorpusConfig(num_test=18), "test")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "How many?", "answer": "so\n#### 1,000"}) + "\n")
    cases = []
    for p in problems:
        right = synthetic.format_text(p)
        wrong = synthetic.format_text(dataclasses.replace(p, answer=p.answer + "1"))
        spaced = right.replace(p.answer, " ".join(p.answer))
        for completion in (right, wrong, spaced, "<think>\nno answer\n</think>", ""):
            cases.append(("corpus", p.answer, completion, synthetic.check(p, completion)))
    [item] = file_items(gsm)
    for completion in ("</think>\nAnswer: 1000", "Answer: 1,000.", "Answer: 1000.0", "Answer: 999"):
        cases.append(("file", item.gold, completion, item.check(completion)))
    assert {ok for *_, ok in cases} == {True, False}
    for check, gold, completion, ok in cases:
        doc = {"question": "q", "answer": gold, "check": check}
        assert process_results(doc, [completion]) == {"exact_match": float(ok)}, completion


def test_export_writes_loadable_tasks(tmp_path, offline):
    """Every split and file becomes a task lm-eval loads offline, over our items and our prompt."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    corpus = synthetic.CorpusConfig()
    gsm = tmp_path / "gsm8k" / "test.jsonl"  # named gsm8k_test, as tinyreason.evaluate does
    gsm.parent.mkdir()
    lines = [{"question": f"What is {i} + 1?", "answer": f"so\n#### {i + 1}"} for i in range(10)]
    gsm.write_text("".join(json.dumps(r) + "\n" for r in lines))
    folder = tmp_path / "tasks"
    cfg = eval_cfg(splits=["test", "validation", "ood"], files=[str(gsm)])
    paths = export_tasks(folder, corpus, cfg)
    assert {p.name for p in paths} >= {"tinyreason_test.yaml", f"{GROUP}.yaml", "utils.py"}
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    names = {"tinyreason_test", "tinyreason_validation", "tinyreason_ood", "tinyreason_gsm8k_test"}
    assert names | {GROUP} <= set(manager.all_tasks)
    tasks = get_task_dict(["tinyreason_ood", "tinyreason_gsm8k_test", GROUP], manager)
    ood = tasks["tinyreason_ood"]
    docs = list(ood.test_docs())
    items = corpus_items(corpus, "ood", N)
    assert [d["question"] for d in docs] == [it.question for it in items]
    assert [d["answer"] for d in docs] == [it.gold for it in items]
    assert {d["check"] for d in docs} == {"corpus"}
    assert ood.doc_to_text(docs[0]) == f"<|bos|><|user|>{items[0].question}<|assistant|>"
    file_docs = list(tasks["tinyreason_gsm8k_test"].test_docs())
    assert [d["answer"] for d in file_docs] == [str(i + 1) for i in range(N)]  # num_problems
    assert {d["check"] for d in file_docs} == {"file"}
    [children] = [v for k, v in tasks.items() if getattr(k, "group_name", None) == GROUP]
    assert list(children) == ["tinyreason_test"], "the group runs the test split"


def compare(hf_dir: Path, folder: Path, items: list) -> tuple[list[str], dict]:
    """Ours and lm-eval's greedy runs of `tinyreason_reasoning` on one export, problem by problem:
    the same prompt ids, completions and correct flags, and the same exact match. Returns
    (our completions, our report)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tinyreason.checkpoints import load_model

    model, tokenizer = load_model(hf_dir)
    with torch.no_grad():
        ours, records = evaluate_items(
            model.float(), tokenizer, items, EvalOptions(max_new_tokens=MAX_NEW, batch_size=N)
        )
    lm = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=1)
    for it in items:  # the prompt lm-eval encodes is ours: one bos, then the chat template
        ids, _ = lm.tok_batch_encode([f"<|bos|><|user|>{it.question}<|assistant|>"])
        assert ids[0].tolist() == _prompt(tokenizer, it.question)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[GROUP],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        apply_chat_template=False,
    )
    samples = sorted(out["samples"]["tinyreason_test"], key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [it.question for it in items]
    mine = [r["completion"].strip() for r in records]
    assert [s["resps"][0][0].strip() for s in samples] == mine
    assert [s["exact_match"] for s in samples] == [float(r["correct"]) for r in records]
    for name in ("tinyreason_test", GROUP):
        assert out["results"][name]["exact_match,none"] == pytest.approx(ours["exact_match"])
    return mine, ours


@pytest.mark.slow
def test_lm_eval_exact_match_equals_ours(make_cfg, tmp_path, offline):
    """On a noisy copy of the end-of-run export of a debug=fast run (ten steps leave a model that
    repeats one digit for every prompt, which would compare little): the noise (weights + 4 std) makes completions differ per prompt,
    and an eos head row of 1.05 x a mid-completion token's row makes some stop at eos."""
    pytest.importorskip("lm_eval")
    from tinyreason.checkpoints import load_model
    from tinyreason.model.hf import save_pretrained
    from tinyreason.sampling import SamplingConfig, sample
    from tinyreason.train import train

    cfg = make_cfg("model=dense_mla", "precision=fp32", "debug=fast", "logger=none")
    train(cfg)
    corpus = corpus_config(None, OmegaConf.to_container(cfg.data.corpus, resolve=True))
    folder = tmp_path / "tasks"
    export_tasks(folder, corpus, eval_cfg(splits=["test"]))
    items = corpus_items(corpus, "test", N)

    model, tokenizer = load_model(Path(cfg.run_dir) / "hf")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(4.0 * p.std() * torch.randn(p.shape, generator=g))
        prompt = _prompt(tokenizer, items[0].question)
        [new] = sample(
            model, [prompt], SamplingConfig(MAX_NEW), eos_token_id=tokenizer.eos_token_id
        )
        head = model.lm_head.weight
        head[tokenizer.eos_token_id] = 1.05 * head[new[10]]
    noisy = save_pretrained(model, tmp_path / "noisy", tokenizer)
    mine, ours = compare(noisy, folder, items)
    assert len(set(mine)) == N, "the noisy model answers every prompt differently"
    assert ours["mean_completion_tokens"] < MAX_NEW, "some completions stop at eos"
