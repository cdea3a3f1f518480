"""`python -m tinyreason.evaluate ckpt=<run dir | .ckpt | HF folder> [eval.*=...]`

Greedy exact match (and pass@k with `eval.num_samples > 1`) on the corpus splits of
`eval.splits` (the run's corpus config, read from its `.hydra/config.yaml`) and the jsonl files of
`eval.files`; prints one line per split and writes `eval.json` and `completions.jsonl` to `out=`
(default: the run dir, the checkpoint's folder, or the HF folder). `export_tasks=<dir>` writes the
lm-evaluation-harness task instead (`tinyreason.lm_eval_task`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from tinyreason import errors
from tinyreason.checkpoints import checkpoint_file, load_model, run_dir_of
from tinyreason.compose import CONF_DIR
from tinyreason.data import synthetic
from tinyreason.data.sources import dataclass_from_dict
from tinyreason.evaluation import EvalConfig, eval_sets, run_evaluation
from tinyreason.model.hf import is_hf_folder

log = logging.getLogger(__name__)


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


def evaluate(cfg: DictConfig) -> dict:
    if cfg.ckpt is None:
        raise ValueError("usage: python -m tinyreason.evaluate ckpt=<run dir | .ckpt | HF folder>")
    source = Path(cfg.ckpt)
    if not source.exists():
        raise ValueError(f"ckpt={cfg.ckpt}: no such file or folder")
    eval_config = EvalConfig.from_dict(OmegaConf.to_container(cfg.eval, resolve=True))
    run_dir = run_dir_for(source)
    corpus = corpus_config(run_dir, OmegaConf.to_container(cfg.corpus, resolve=True))
    if cfg.export_tasks:
        from tinyreason.lm_eval_task import export_tasks

        export_tasks(Path(cfg.export_tasks), corpus, eval_config)
        return {}
    sets = eval_sets(eval_config, corpus)
    model, tokenizer = load_model(source, cfg.tokenizer)
    model = model.to(cfg.device).float() if cfg.device != "cpu" else model.float()
    if cfg.out is not None:
        out = Path(cfg.out)
    elif is_hf_folder(source):
        out = source
    else:
        out = run_dir if source.is_dir() else checkpoint_file(source).parent
    with torch.no_grad():
        return run_evaluation(model, tokenizer, sets, eval_config.options, out)


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
@errors.reported
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    errors.run(_hydra_main)


if __name__ == "__main__":
    main()
