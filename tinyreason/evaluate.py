"""`python -m tinyreason.evaluate ckpt=<run dir | .ckpt | HF folder> [eval.*=...]`

Greedy exact match (and pass@k with `eval.num_samples > 1`) on the corpus splits of
`eval.splits` (the run's corpus config, read from its `.hydra/config.yaml`) and the jsonl files of
`eval.files`; prints one line per split and writes `eval.json` and `completions.jsonl` to `out=`
(default: the run dir, the checkpoint's folder, or the HF folder). `export_tasks=<dir>` writes the
lm-evaluation-harness task instead (`tinyreason.lm_eval_task`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tinyreason.data import synthetic
from tinyreason.data.sources import dataclass_from_dict
from tinyreason.evaluation import (
    CORPUS_SPLITS,
    EvalOptions,
    corpus_items,
    evaluate_items,
    file_items,
)
from tinyreason.export import checkpoint_file, run_dir_of
from tinyreason.generate import load_model
from tinyreason.model.hf import is_hf_folder

log = logging.getLogger(__name__)


def eval_options(eval_cfg: DictConfig) -> EvalOptions:
    keys = (
        "max_new_tokens",
        "batch_size",
        "num_samples",
        "k",
        "temperature",
        "top_p",
        "top_k",
        "seed",
    )
    return EvalOptions(**{k: eval_cfg[k] for k in keys})


def run_dir_for(source: Path) -> Path | None:
    """The training run a checkpoint source belongs to (for its corpus config), if any."""
    if is_hf_folder(source):
        parent = source.parent
        return parent if (parent / ".hydra" / "config.yaml").is_file() else None
    return run_dir_of(checkpoint_file(source))


def corpus_config(run_dir: Path | None, overrides: dict) -> synthetic.CorpusConfig:
    """The run's embedded-corpus config (`.hydra/config.yaml`), then `corpus=` overrides."""
    base: dict = {}
    saved = run_dir / ".hydra" / "config.yaml" if run_dir is not None else None
    if saved is not None and saved.is_file():
        data = OmegaConf.load(saved).get("data", {})
        if data.get("name") == "reasoning":
            base = OmegaConf.to_container(data.corpus, resolve=True)
    return dataclass_from_dict(synthetic.CorpusConfig, {**base, **overrides}, "corpus")


def file_set_name(path: str) -> str:
    """A file's name in reports: its stem, or <folder>_<stem> when the stem is a split's name
    (gsm8k/test.jsonl -> gsm8k_test)."""
    p = Path(path)
    return f"{p.parent.name}_{p.stem}" if p.stem in CORPUS_SPLITS else p.stem


def eval_sets(cfg_eval: DictConfig, corpus: synthetic.CorpusConfig) -> dict[str, list]:
    """Every requested split and file, built (and so checked) before any generation."""
    sets = {}
    for split in cfg_eval.splits:
        if str(split).endswith(".jsonl"):
            sets[file_set_name(split)] = file_items(split)[: cfg_eval.num_problems]
        elif split not in CORPUS_SPLITS:
            raise ValueError(
                f"eval.splits: {split!r} is not one of {list(CORPUS_SPLITS)} (files go in eval.files)"
            )
        else:
            sets[split] = corpus_items(corpus, split, cfg_eval.num_problems)
    for path in cfg_eval.files:
        sets[file_set_name(path)] = file_items(path)[: cfg_eval.num_problems]
    if not sets:
        raise ValueError("nothing to evaluate: eval.splits and eval.files are both empty")
    return sets


def summary(name: str, report: dict) -> str:
    kinds = " ".join(f"{k} {v:.0%}" for k, v in report["by_kind"].items())
    line = f"{name}: exact match {report['exact_match']:.1%} of {report['num_problems']} ({kinds})"
    for key, value in report.get("pass_at_k", {}).items():
        line += f", {key} {value:.1%}"
    return line + f"; no answer {report['no_answer']:.1%}, {report['tokens_per_s']:.0f} tokens/s"


def run_evaluation(model, tokenizer, sets: dict[str, list], options: EvalOptions, out: Path | None):
    """Evaluate every set; write eval.json and completions.jsonl to `out` when given."""
    reports, lines = {}, []
    for name, items in sets.items():
        report, records = evaluate_items(model, tokenizer, items, options)
        reports[name] = report
        lines += [json.dumps({"split": name, **r}, ensure_ascii=False) for r in records]
        log.info(summary(name, report))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(reports, indent=2, ensure_ascii=False))
        (out / "completions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        log.info("wrote %s and %s", out / "eval.json", out / "completions.jsonl")
    return reports


def evaluate(cfg: DictConfig) -> dict:
    if cfg.ckpt is None:
        raise ValueError("usage: python -m tinyreason.evaluate ckpt=<run dir | .ckpt | HF folder>")
    source = Path(cfg.ckpt)
    if not source.exists():
        raise ValueError(f"ckpt={cfg.ckpt}: no such file or folder")
    options = eval_options(cfg.eval)
    run_dir = run_dir_for(source)
    corpus = corpus_config(run_dir, OmegaConf.to_container(cfg.corpus, resolve=True))
    if cfg.export_tasks:
        from tinyreason.lm_eval_task import export_tasks

        export_tasks(Path(cfg.export_tasks), corpus, cfg.eval)
        return {}
    sets = eval_sets(cfg.eval, corpus)
    model, tokenizer = load_model(source, cfg.tokenizer)
    model = model.to(cfg.device).float() if cfg.device != "cpu" else model.float()
    if cfg.out is not None:
        out = Path(cfg.out)
    elif is_hf_folder(source):
        out = source
    else:
        out = run_dir if source.is_dir() else checkpoint_file(source).parent
    with torch.no_grad():
        return run_evaluation(model, tokenizer, sets, options, out)


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
