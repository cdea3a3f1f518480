"""`python -m tinyreason.export ckpt=<.ckpt | run dir> out=<dir> [overwrite=true] ...`

Writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads natively with
our logits (MLA -> DeepseekV3, GQA -> Llama / Qwen3; see `tinyreason.model.hf`), plus the tokenizer
and its chat template. `export(...)` is the importable function; training exports at the end of a
run (`export.hf=true`) through `tinyreason.checkpoints.export_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tinyreason import errors
from tinyreason.checkpoints import (
    checkpoint_file,
    export_model,
    find_tokenizer,
    load_checkpoint,
    run_dir_of,
)
from tinyreason.compose import CONF_DIR
from tinyreason.model.hf import check_export_folder


def export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    tokenizer: str | None = None,
    max_shard_size: int | str = "5GB",
    dtype: str = "float32",
    drop_mtp: bool = False,
) -> Path:
    """Lightning checkpoint (or run dir) -> Hugging Face folder `out`."""
    check_export_folder(Path(out), overwrite)  # before reading a checkpoint of any size
    path = checkpoint_file(ckpt)
    model = load_checkpoint(path)
    tok = find_tokenizer(run_dir_of(path), tokenizer)
    return export_model(
        model,
        tok,
        out,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        dtype=dtype,
        drop_mtp=drop_mtp,
    )


@hydra.main(config_path=str(CONF_DIR), config_name="export", version_base="1.3")
@errors.reported
def _hydra_main(cfg: DictConfig) -> None:
    if cfg.ckpt is None or cfg.out is None:
        raise errors.UserError(
            "usage: python -m tinyreason.export ckpt=<.ckpt | run dir> out=<dir>"
        )
    export(
        cfg.ckpt,
        cfg.out,
        overwrite=cfg.overwrite,
        tokenizer=cfg.tokenizer,
        max_shard_size=cfg.max_shard_size,
        dtype=cfg.dtype,
        drop_mtp=cfg.drop_mtp,
    )


def main() -> None:
    errors.run(_hydra_main)


if __name__ == "__main__":
    main()
