"""Where the Hydra configs are, and composing one outside a Hydra app (tests, benchmarks, scripts).

The configs live in the repository's top-level `conf/`; a built wheel installs them as the package
data folder `tinyreason/conf/` (pyproject's `package-dir` mapping). This is the one place that
knows both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

_INSTALLED = Path(__file__).resolve().parent / "conf"
CONF_DIR = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def compose(
    config_name: str = "train", overrides: Sequence[str] = (), run_dir: str = "outputs/composed"
) -> DictConfig:
    """The config `python -m tinyreason.<config_name> *overrides` would run with. Outside a
    running Hydra app `${hydra:runtime.output_dir}` has no value: `run_dir` stands in for it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    if "run_dir" in cfg:
        with open_dict(cfg):
            cfg.run_dir = run_dir
    return cfg
