"""The Lightning strategies behind `trainer.strategy`: ours by name (`fsdp`: FSDP2Strategy;
`deepspeed`: Lightning's DeepSpeedStrategy with `trainer.deepspeed_stage`), else Lightning's own
string (`auto`, `ddp`, ...). What the module does under them is `training/parallel.py` (which
imports no Lightning, so the GPU check runs its sharding on a bare torch image)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy


def build_strategy(run) -> Any:
    """The Lightning strategy for `trainer.strategy`: ours by name, else Lightning's string."""
    t = run.trainer
    if t.strategy == "fsdp":
        return FSDP2Strategy(data_parallel_size=t.world_size)
    if t.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=t.deepspeed_stage)
    return t.strategy


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2: a 1-D data-parallel mesh (no tensor
    parallelism: Lightning's default would make every device a tensor-parallel rank) and DCP
    checkpoint folders that appear whole or not at all."""

    def __init__(self, data_parallel_size: int) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
        )

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Every rank writes its shard into `<path>.partial/`; once all are done rank 0 checks
        the folder (metadata and `meta.pt` readable) and swaps it in for `<path>`. A kill mid-write
        leaves the previous checkpoint whole."""
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial)
        self.barrier("checkpoint-partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint-written")
        if self.global_rank == 0:
            torch.load(partial / "meta.pt", map_location="cpu", weights_only=True)
            if not (partial / ".metadata").is_file():
                raise OSError(f"DCP wrote no .metadata in {partial}")
            old = path.with_name(path.name + ".old")
            if path.exists():
                os.replace(path, old)
            os.replace(partial, path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.barrier("checkpoint-swapped")

    def remove_checkpoint(self, filepath) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
