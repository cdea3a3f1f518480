import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from tinyreason.compose import CONF_DIR as CONF

GROUPS = ("stage", "model", "precision", "tokenizer", "data", "trainer", "logger", "debug")


def run_train_cli(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -m tinyreason.train *args` in a fresh process, W&B offline; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "tinyreason.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_MODE": "offline"},
        **kwargs,
    )


def prepare(cfg: DictConfig):
    """The tokenizer and shards a run of `cfg` trains on (`PreparedData`): its stage's data."""
    from tinyreason.training.run_config import RunConfig

    run = RunConfig.from_hydra(cfg)
    _, datamodule_class = run.stage.classes()
    return datamodule_class.from_run(run).prepared


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/shard cache for the whole session: the sweep-sharing path, exercised."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["TINYREASON_CACHE"] = str(path)
    return path


@pytest.fixture
def make_cfg(cache_dir, tmp_path):
    def _make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
        with open_dict(cfg):
            cfg.run_dir = str(run_dir or tmp_path / "run")
            cfg.cache_dir = str(cache_dir)
        return cfg

    return _make


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, cache_dir):
    """(run dir, metrics) of a debug=fast pretraining run of 20 steps: what the post-training
    stages start from (`model.init_from=<run dir>`: last.ckpt + tokenizer/)."""
    from tinyreason.train import train

    run = tmp_path_factory.mktemp("pretrained") / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = ["debug=fast", "logger=none", "export.hf=false", "trainer.max_steps=20"]
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir, cfg.cache_dir = str(run), str(cache_dir)
    return run, train(cfg)
