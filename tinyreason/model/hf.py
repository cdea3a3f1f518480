"""Hugging Face interop: our `CausalLM` weights <-> folders that `AutoModelForCausalLM` loads
natively (no `trust_remote_code`), and back. Which class computes a config (DeepseekV3 for MLA,
Llama / Qwen3 for GQA) and the config conversion both ways: hf_config.py.

Our parameter names are HF's, so the weight map is mostly a `model.` prefix. The exceptions:

    ours                                        on disk (DeepSeek's release names)
    lm_head.weight                              lm_head.weight (omitted when tied)
    layers.L.mlp.experts.{e}.{gate,up,down}_proj.weight, or the fused in-memory layout
      layers.L.mlp.experts.gate_up_proj [E, 2I, D] (rows [0, I) gate, [I, 2I) up) and
      layers.L.mlp.experts.down_proj [E, D, I]  model.layers.L.mlp.experts.{e}.{gate,up,down}_proj.weight
    mtp.k.{enorm,hnorm,eh_proj}.weight          model.layers.{N+k}.{enorm,hnorm,eh_proj}.weight
    mtp.k.block.*                               model.layers.{N+k}.*   (N = num_hidden_layers)
    mtp.k.norm.weight                           model.layers.{N+k}.shared_head.norm.weight
    (shared) embed_tokens / lm_head             model.layers.{N+k}.embed_tokens.weight,
                                                model.layers.{N+k}.shared_head.head.weight (copies)

HF's DeepseekV3 has no MTP forward: it reports the MTP layers as unexpected keys and ignores them.
Spec and pitfalls: ../shared/design/deepseek_v3.md §3, §7.
Shape legend: E routed experts, I expert width (moe_intermediate_size), D hidden size.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .config import ModelConfig
from .hf_config import from_hf_config, target, to_hf_config
from .transformer import CausalLM

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


# ---------------------------------------------------------------------------------------------
# routed experts: fused [E, ...] tensors <-> one tensor per expert


def split_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused `experts.gate_up_proj` [E, 2I, D] / `experts.down_proj` [E, D, I] -> per-expert
    `experts.{e}.{gate,up,down}_proj.weight`; other keys pass through."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            gate_EID, up_EID = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate_EID[e].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = up_EID[e].clone()
        elif key.endswith(".experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].clone()
        else:
            out[key] = value
    return out


def fuse_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert keys -> fused `experts.gate_up_proj` (gate rows first) and `experts.down_proj`."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _PER_EXPERT.match(key)
        if m:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = value
        else:
            out[key] = value
    for prefix, parts in experts.items():
        num = 1 + max(e for e, _ in parts)
        try:
            gate = [parts[(e, "gate")] for e in range(num)]
            up = [parts[(e, "up")] for e in range(num)]
            down = [parts[(e, "down")] for e in range(num)]
        except KeyError as err:
            raise ValueError(
                f"{prefix}: expert {err.args[0][0]} lacks its {err.args[0][1]}_proj"
            ) from err
        out[f"{prefix}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack(down)
    return out


def _fused(keys: Iterable[str]) -> bool:
    return any(k.endswith(".experts.gate_up_proj") for k in keys)


# ---------------------------------------------------------------------------------------------
# state dicts


def _to_hf_key(key: str, num_layers: int) -> str:
    m = re.match(r"mtp\.(\d+)\.(.*)", key)
    if m is None:
        return key if key == "lm_head.weight" else f"model.{key}"
    layer, rest = f"model.layers.{num_layers + int(m[1])}.", m[2]
    if rest.startswith("block."):
        return layer + rest.removeprefix("block.")
    if rest == "norm.weight":
        return layer + "shared_head.norm.weight"
    return layer + rest


def _from_hf_key(key: str, num_layers: int) -> str | None:
    """Our name for an HF key, or None for keys we do not keep (MTP copies, RoPE tables)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # old checkpoints store the RoPE table
    if key == "lm_head.weight" or not key.startswith("model."):
        return key  # an unknown key is reported by the caller
    key = key.removeprefix("model.")
    m = re.match(r"layers\.(\d+)\.(.*)", key)
    if m is None or int(m[1]) < num_layers:
        return key
    k, rest = int(m[1]) - num_layers, m[2]
    if rest in _MTP_COPIES:
        return None  # the shared embedding / head, stored again per MTP layer
    if rest == "shared_head.norm.weight":
        return f"mtp.{k}.norm.weight"
    if rest.startswith(_MTP_OWN):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """HF on-disk tensors of `model`: per-expert routed experts, MTP as extra layers with the
    shared embedding and head copied in, `lm_head.weight` omitted when tied."""
    config = model.config
    target(config)
    n = config.num_layers
    ours = split_experts({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight")
    out = {_to_hf_key(k, n): v for k, v in ours.items()}
    for k in range(config.mtp.depth):
        # Separate copies: safetensors refuses (and HF's writer drops) tensors sharing storage.
        out[f"model.layers.{n + k}.embed_tokens.weight"] = (
            model.embed_tokens.weight.detach().cpu().clone()
        )
        out[f"model.layers.{n + k}.shared_head.head.weight"] = (
            model.lm_head.weight.detach().cpu().clone()
        )
    return out


def from_hf_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor], model: CausalLM
) -> dict[str, torch.Tensor]:
    """Tensors for `model.load_state_dict`, from HF tensors in either experts layout.

    The result has exactly `model`'s keys (routed experts fused or per expert, as `model` has them);
    a missing or unknown tensor raises ValueError naming it.
    """
    n = model.config.num_layers
    ours: dict[str, torch.Tensor] = {}
    for key, value in split_experts(hf_state_dict).items():
        name = _from_hf_key(key, n)
        if name is not None:
            ours[name] = value
    wanted = model.state_dict()
    if model.config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
        ours["lm_head.weight"] = ours.get("embed_tokens.weight")
    if _fused(wanted):
        ours = fuse_experts(ours)
    missing = sorted(k for k in wanted if ours.get(k) is None)
    unexpected = sorted(k for k in ours if k not in wanted)
    if missing or unexpected:
        raise ValueError(
            f"HF weights do not fit the model: missing {_short(missing)}, unexpected {_short(unexpected)}"
        )
    for key in ("embed_tokens.weight", "lm_head.weight"):
        ours[key] = _grow_vocab(key, ours[key], wanted[key])
    for key, value in ours.items():
        if value.shape != wanted[key].shape:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} in the HF weights, {tuple(wanted[key].shape)} in the model"
            )
    return ours


def _grow_vocab(key: str, value: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Rows [0, V_hf) from the file, the rest as `model` initialised them: a tokenizer that gained
    our special tokens after the vendor's vocabulary needs a larger embedding and head."""
    if value.shape[0] >= wanted.shape[0] or value.shape[1:] != wanted.shape[1:]:
        return value  # equal, or a mismatch reported by the caller
    log.info("%s: %d vocabulary rows from the file, %d new", key, value.shape[0], len(wanted))
    grown = wanted.detach().clone()
    grown[: value.shape[0]] = value
    return grown


def _short(keys: list[str], limit: int = 8) -> str:
    return str(keys[:limit] + [f"... {len(keys) - limit} more"] if len(keys) > limit else keys)


# ---------------------------------------------------------------------------------------------
# folders


def check_export_folder(out: Path, overwrite: bool) -> bool:
    """Refuse a file, or a non-empty folder without `overwrite`; True: an export is replaced."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file, not a folder")
    replace = out.is_dir() and any(out.iterdir())
    if replace and not overwrite:
        raise ValueError(
            f"out={str(out)!r} is not empty; pass overwrite=true to replace its export (other "
            "files stay), or choose a new folder"
        )
    return replace


def save_pretrained(
    model: CausalLM,
    out: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `config.json`, `generation_config.json`, `model.safetensors` (sharded with
    `model.safetensors.index.json` past `max_shard_size`) and the tokenizer (chat template inside
    `tokenizer_config.json`) to `out`. Safetensors only: nothing in the folder is a pickle.

    `dtype` casts floating weights except the router (`mlp.gate.*`), which HF keeps in fp32.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    out = Path(out)
    replace = check_export_folder(out, overwrite)
    special = _special_ids(tokenizer)
    hf_config = to_hf_config(model.config, special)  # refuses what transformers cannot load
    hf_config.dtype = dtype
    tensors = {
        k: v.to(dtype) if v.is_floating_point() and ".mlp.gate." not in k else v
        for k, v in to_hf_state_dict(model).items()
    }
    if replace:  # a smaller export would leave old shards behind
        for stale in [*out.glob("model*.safetensors"), out / WEIGHTS_INDEX_NAME]:
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    GenerationConfig(**{k: v for k, v in special.items() if v is not None}).save_pretrained(out)
    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
        tokenizer.save_pretrained(out, save_jinja_files=False)
    return out


def _special_ids(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_config(folder: str | os.PathLike) -> ModelConfig:
    """Our `ModelConfig` for an HF folder; the MTP depth is the number of MTP layers in its weights."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not is_hf_folder(folder):
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        hf = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:  # bad JSON, an unknown model_type
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(
            f"{folder}/config.json is not a config transformers reads ({reason})"
        ) from err
    return from_hf_config(hf, mtp_depth=_mtp_layers_on_disk(folder, hf))


def _mtp_layers_on_disk(folder: Path, hf) -> int:
    if hf.model_type != "deepseek_v3":
        return 0
    n = hf.num_hidden_layers
    layers = {
        int(m[1]) for k in _weight_keys(folder) if (m := re.match(r"model\.layers\.(\d+)\.", k))
    }
    depth = sum(1 for k in range(hf.num_nextn_predict_layers) if n + k in layers)
    if depth < hf.num_nextn_predict_layers:
        log.info(
            "%s: config has %d MTP layers, the weights %d; building %d",
            folder,
            hf.num_nextn_predict_layers,
            depth,
            depth,
        )
    return depth


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / name for name in names]
    else:
        files = [folder / WEIGHTS_NAME]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise ValueError(
            f"{folder}: missing safetensors weights {absent} (only safetensors are read)"
        )
    return files


def _weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in _weight_files(folder):
        with safe_open(file, framework="pt") as f:
            keys.extend(f.keys())
    return keys


def load_weights(model: CausalLM, folder: str | os.PathLike) -> None:
    """Load an HF folder's safetensors into `model` (built from `read_hf_config(folder)`)."""
    from safetensors.torch import load_file

    hf_state_dict: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(folder)):
        hf_state_dict.update(load_file(file))
    model.load_state_dict(from_hf_state_dict(hf_state_dict, model))


def load_pretrained(folder: str | os.PathLike) -> CausalLM:
    """Our `CausalLM` with the weights of a local DeepseekV3 / Llama / Qwen3 folder (fp32)."""
    model = CausalLM(read_hf_config(folder))
    load_weights(model, folder)
    return model.eval()
