"""`python -m tinyreason.prepare [overrides]`: build the tokenizer and token shards of a config.

`tinyreason.train` prepares its data itself (the stage's DataModule); this entry point only does
the data part, e.g. to warm the cache before a sweep. Both are idempotent and safe to run in
parallel (file locks).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from tinyreason import errors
from tinyreason.compose import CONF_DIR
from tinyreason.training.quiet import quiet_start
from tinyreason.training.run_config import RunConfig

log = logging.getLogger(__name__)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
@errors.reported
def _hydra_main(cfg: DictConfig) -> None:
    run = RunConfig.from_hydra(cfg)
    _, datamodule_class = run.stage.classes()  # the stage's data: conversations, pairs, shards
    data = datamodule_class.from_run(run).prepared
    splits = ", ".join(
        f"{k}: {v['tokens']:,} tokens, {v['bytes'] / v['tokens']:.2f} bytes/token"
        for k, v in data.manifest["splits"].items()
    )
    log.info(
        "tokenizer %s (%d tokens); shards %s (%s)",
        data.tokenizer_dir,
        len(data.tokenizer),
        data.shard_root,
        splits,
    )


def main() -> None:
    quiet_start()
    errors.run(_hydra_main)


if __name__ == "__main__":
    main()
