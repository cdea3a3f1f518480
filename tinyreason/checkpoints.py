"""What a run leaves on disk, read and written in one place: Lightning checkpoints (`ckpt_path`
resolution, atomic writes, one verified read, our model from a checkpoint), the run's tokenizer
folder, the Hugging Face export."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from transformers import PreTrainedTokenizerFast

from tinyreason import tokenizer as tokenizers
from tinyreason.errors import UserError
from tinyreason.model import CausalLM, ModelConfig
from tinyreason.model.hf import (
    is_hf_folder,
    load_pretrained,
    load_weights,
    save_pretrained,
    target,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_DIR = "tokenizer"  # <run dir>/tokenizer/: saved by `train` at the start of a run
PARTIAL = ".partial"  # <name>.ckpt.partial: a checkpoint being written (no reader takes it)
DCP_METADATA, LIGHTNING_META = ".metadata", "meta.pt"  # the two index files of a DCP folder


def checkpoint_file(ckpt: str | os.PathLike, key: str = "ckpt") -> Path:
    """A `.ckpt` file as given, or `<run dir>/checkpoints/last.ckpt` for a run folder (`key`:
    the option the error names)."""
    path = Path(ckpt)
    if path.is_dir() and not is_sharded(path):
        path = path / "checkpoints" / "last.ckpt"
    if not (path.is_file() or is_sharded(path)):
        raise ValueError(f"{key}={str(ckpt)!r}: no checkpoint at {path}")
    return path


def is_sharded(path: Path) -> bool:
    """A DCP checkpoint folder (trainer.strategy=fsdp): one shard file per rank, DCP's
    `.metadata` and Lightning's `meta.pt` (everything but weights and optimizer state)."""
    return path.is_dir() and ((path / DCP_METADATA).exists() or (path / LIGHTNING_META).exists())


def resolve_resume(ckpt_path: str | None, run_dir: str | os.PathLike) -> Path | None:
    """`ckpt_path` of a training run: null (fresh run), `last` (this run dir's last.ckpt), a run
    dir, or a file."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        path = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not (path.is_file() or is_sharded(path)):
            raise ValueError(
                f"ckpt_path=last: no checkpoint at {path}; to resume a run, pass its folder: "
                "hydra.run.dir=<run dir> ckpt_path=last"
            )
        return path
    return checkpoint_file(ckpt_path, key="ckpt_path")


def run_dir_of(ckpt_file: Path) -> Path:
    """`<run dir>/checkpoints/x.ckpt` -> `<run dir>`; a loose file -> its folder."""
    parent = ckpt_file.parent
    return parent.parent if parent.name == "checkpoints" else parent


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict:
    """A Lightning checkpoint as a dict: every read of one (resume, `model.init_from`, export,
    evaluate, generate) comes here. `torch.load(weights_only=True)`: tensors and plain containers
    only, no code runs; `mmap`: tensors stay on disk until used (a look at the run config).
    A DCP folder (FSDP2) is consolidated: its weights as one full state_dict (no optimizer
    state), with `mmap` only its `meta.pt` (run config, hyper-parameters, loop state)."""
    if path.is_dir():
        return _read_sharded(path, weights=not mmap)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        if "Unsupported global" in str(err):  # pickle.UnpicklingError: weights_only refused it
            raise UserError(f"{path}: not a tinyreason checkpoint of tensors ({err})") from err
        # a truncated zip (RuntimeError), an empty file, bytes that are no pickle
        raise UserError(damaged(path, err)) from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{path} is not a Lightning checkpoint: it has no state_dict")
    return state


def _read_sharded(path: Path, weights: bool) -> dict:
    """Lightning's `meta.pt` of a DCP folder, plus (weights) the full model state_dict gathered
    from the shards by DCP itself (`dcp_to_torch_save`, no process group needed)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    missing = [n for n in (LIGHTNING_META, DCP_METADATA) if not (path / n).is_file()]
    if missing:
        raise UserError(damaged(path, FileNotFoundError(f"it has no {' and no '.join(missing)}")))
    try:
        state = torch.load(path / LIGHTNING_META, map_location="cpu", weights_only=True)
        if weights:
            with tempfile.TemporaryDirectory() as tmp:
                dcp_to_torch_save(path, Path(tmp) / "full.pt")
                full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
            state["state_dict"] = full["state_dict"]
    except Exception as err:
        raise UserError(damaged(path, err)) from err
    return state


def damaged(path: Path, err: BaseException) -> str:
    """The message for an unreadable checkpoint, naming the newest other `.ckpt` beside it."""
    head = b"PK"
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(2)
    lines = str(err).strip().splitlines()
    reason = lines[0].split(". ")[0][:200] if lines else type(err).__name__  # its first sentence
    if head != b"PK":  # torch.save writes a zip archive
        reason = "an empty file" if not head else "not a torch zip archive"
    others = [
        p
        for p in path.parent.glob("*.ckpt")
        if p.name != path.name and (p.is_file() or is_sharded(p))
    ]
    previous = max(others, key=lambda p: p.stat().st_mtime_ns, default=None)
    where = f"the previous one is {previous}" if previous else f"no other .ckpt in {path.parent}"
    return f"checkpoint {path} is damaged or incomplete ({reason}); {where}"


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into `<path>.partial` beside `path`, fsync'd and read back, then renamed
    over `path` (`os.replace`, atomic on POSIX), then the folder fsync'd: a kill or a full disk
    mid-write leaves the previous `path` whole, and an error leaves no partial file behind (a
    kill leaves it; the next write of `path` replaces it)."""
    partial = path.with_name(path.name + PARTIAL)
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        read_checkpoint(partial, mmap=True)  # verified: a whole archive with a state_dict
        os.replace(partial, path)
    except BaseException as err:
        partial.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = "; free some space, then resume with ckpt_path=last" if full else ""
        raise UserError(
            f"could not write checkpoint {path} ({err.strerror or err}); {kept}{hint}"
        ) from err
    try:  # the rename itself survives a power cut
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # a file system that cannot fsync a folder
        pass


def checkpoint_run_config(path: Path) -> tuple[dict | None, int]:
    """(the composed config a checkpoint was trained with, or None before it was stored; its
    step), read without loading its tensors."""
    state = read_checkpoint(path, mmap=True)
    return state.get("run_config"), int(state.get("global_step", 0))


def _model_config(path: Path, state: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(state["hyper_parameters"]["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} has no model hyper-parameters (not a tinyreason run)") from err


def checkpoint_model_config(ckpt: str | os.PathLike) -> ModelConfig:
    """The architecture a checkpoint (or a run dir's last.ckpt) holds."""
    path = checkpoint_file(ckpt)
    return _model_config(path, read_checkpoint(path, mmap=True))


def load_checkpoint(ckpt: str | os.PathLike) -> CausalLM:
    """Our model, in eval mode, from a Lightning checkpoint of any stage (or its run folder)."""
    path = checkpoint_file(ckpt)
    state = read_checkpoint(path)
    model = CausalLM(_model_config(path, state))
    load_model_weights(model, path, state)
    return model.eval()


def load_model_weights(model: CausalLM, path: Path, state: dict | None = None) -> None:
    """The `model.*` weights of a checkpoint into `model` (of the same architecture)."""
    state = read_checkpoint(path) if state is None else state
    weights = {
        k.removeprefix("model."): v
        for k, v in state["state_dict"].items()
        if k.startswith("model.")
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit its own model config; missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )


def load_init_weights(model: CausalLM, source: Path) -> None:
    """`model.init_from`: the weights of a Hugging Face folder or of a checkpoint file."""
    if is_hf_folder(source):
        load_weights(model, source)
    else:
        load_model_weights(model, checkpoint_file(source))


def find_tokenizer(run_dir: Path, tokenizer: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of a run: `tokenizer` if given, else `<run dir>/tokenizer/`."""
    folder = Path(tokenizer) if tokenizer else run_dir / TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"no tokenizer at {folder}; pass tokenizer=<folder with tokenizer.json> (a run saves "
            f"its tokenizer to <run dir>/{TOKENIZER_DIR}/)"
        )
    return tokenizers.load(folder)


def without_mtp(model: CausalLM) -> CausalLM:
    """The same main model without its MTP modules (they do not change the main logits)."""
    config = dataclasses.replace(model.config, mtp=dataclasses.replace(model.config.mtp, depth=0))
    slim = CausalLM(config)
    slim.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    return slim.eval()


def check_exportable(config: ModelConfig, drop_mtp: bool = False) -> None:
    """Raise the ValueError `export_model` would raise for a model of `config`."""
    if drop_mtp:
        config = dataclasses.replace(config, mtp=dataclasses.replace(config.mtp, depth=0))
    target(config)


def export_model(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerFast | None,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    dtype: str = "float32",
    drop_mtp: bool = False,
) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    if drop_mtp and model.config.mtp.depth:
        model = without_mtp(model)
    out = save_pretrained(
        model,
        out,
        tokenizer,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        dtype=DTYPES[dtype],
    )
    log.info("exported %s", out)
    return out


def load_model(
    source: str | os.PathLike, tokenizer: str | None = None
) -> tuple[CausalLM, PreTrainedTokenizerFast]:
    """(model in eval mode, tokenizer) from a Hugging Face folder, a run dir or a `.ckpt` file."""
    if is_hf_folder(source):
        model = load_pretrained(source)
        tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer or source))
        return model, tok
    path = checkpoint_file(source)
    return load_checkpoint(path), find_tokenizer(run_dir_of(path), tokenizer)
