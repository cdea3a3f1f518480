"""A resume, checked against the run config stored in its checkpoint (`run_config`, written by
every checkpoint; not `.hydra/`, which Hydra rewrites on resume) before any work.

What the weights and the data position depend on must not change: the architecture, the
tokenizer, the data (corpus, windows, batch), the stage and its `<stage>.*` options, the seed (the
order of the windows). A change is refused with `key: old -> new` for each; before, it was torch's
"size mismatch ..." from deep inside `load_state_dict`, or a silently different run. Everything
else (lr, steps, precision, logging, eval, export, trainer, guard, the model group's training
knobs, where the run and the cache live) may change, and is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tinyreason.checkpoints import checkpoint_run_config
from tinyreason.errors import UserError

log = logging.getLogger(__name__)

FIXED_ON_RESUME = (  # a key, or a section of keys
    "model",
    "tokenizer",
    "stage",
    "seed",
    "data.name",
    "data.corpus",
    "data.paths",
    "data.seq_len",
    "data.batch_size",
    "data.loss_on",
)
_UNSET = "(unset)"


def check_resume(path: Path, composed: dict, free: tuple[str, ...] = ()) -> None:
    """Refuse a resume of `path` with the resolved config `composed` where a fixed key differs;
    log the keys that may change and did. `free`: keys inside a fixed section that may change."""
    stored, step = checkpoint_run_config(path)
    if stored is None:
        log.warning("%s stores no run config: the resume is not checked against it", path)
        return
    stage = (stored.get("stage") or {}).get("name")
    fixed = (*FIXED_ON_RESUME, stage) if stage else FIXED_ON_RESUME
    old, new = _flatten(stored), _flatten(composed)
    refused, changed = [], []
    for key in sorted((old.keys() | new.keys()) - {"ckpt_path"}):
        before, after = old.get(key, _UNSET), new.get(key, _UNSET)
        if before == after:
            continue
        keep = any(key == p or key.startswith(p + ".") for p in fixed) and key not in free
        (refused if keep else changed).append(f"{key}: {before} -> {after}")
    if refused:
        raise UserError(
            f"ckpt_path={composed['ckpt_path']}: a resume keeps the architecture, tokenizer, data, "
            f"stage and seed of {path}; these differ: {'; '.join(refused)}\n(a new run starts "
            "from its weights with model.init_from=<its run dir> and no ckpt_path)"
        )
    if changed:
        log.info("resuming %s at step %d with changed keys: %s", path, step, "; ".join(changed))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
