"""A quiet start: library notices a user cannot act on are silenced before a run begins.

Each entry names a message that every run printed (torch 2.13 / Lightning 2.6 / litdata 0.2) and
no user can act on; a real problem still warns. torchao's kernel-loading lines are avoided at the
source: `training/fp8.py` (and so torchao) is imported only when an FP8 option is chosen.
"""

from __future__ import annotations

import logging
import warnings

_IGNORED = (
    # Lightning's own pytree use under torch >= 2.10: a deprecation inside Lightning
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # litdata's StreamingDataset has __len__; we run num_workers <= 1 or shard per worker
    r"Your `IterableDataset` has `__len__` defined.*",
    # FSDP2 (strategy=fsdp): the head and the root return views (logits reshaped, ModelOutput);
    # no in-place op follows them anywhere (FSDP2's losses and grads == DDP's, tests/test_fsdp.py)
    r"FSDP2-wrapped module \((FSDPOutputHead|FSDPCausalLM)\) returned a view tensor.*",
    # exact match under DDP / FSDP2: every rank answers the same problems with the same weights,
    # so the values are equal on every rank already (training/exact_match.py)
    r"It is recommended to use `self.log\('(val/exact_match|val/no_answer|val/draft_acceptance|time/seconds).*",
)


def quiet_start() -> None:
    for message in _IGNORED:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("litdata").setLevel(logging.WARNING)  # one INFO line per dataset otherwise
    # Lightning's advertisement for its hosted logger, printed by every Trainer without one
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)
