"""`python -m tinyreason.generate ckpt=<.ckpt | run dir | HF dir> prompt="..." [max_new_tokens=N]`

Greedy by default (`temperature=0`); `temperature>0` samples, optionally within the nucleus
`top_p`. `chat=true` (default: every training document is a conversation) wraps the prompt in the
tokenizer's chat template and stops at eos. Decoding uses the KV cache (`use_cache=false`
recomputes the whole prefix each step: same tokens, for checking). `generate(...)` is the
importable function.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerFast

from tinyreason import errors
from tinyreason.checkpoints import load_model
from tinyreason.compose import CONF_DIR
from tinyreason.model import CausalLM
from tinyreason.sampling import SamplingConfig, prompt_ids, sample

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Continue `input_ids` [1, S]; return the new token ids [1, <= max_new_tokens], ending at the
    first `eos_token_id` (included) if one is generated. Batches: `tinyreason.sampling.sample`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"input_ids must be [1, seq], got shape {tuple(input_ids.shape)}; for a batch of "
            "prompts use tinyreason.sampling.sample (or generate_batch)"
        )
    config = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed)
    new = sample(model, input_ids.tolist(), config, eos_token_id=eos_token_id, use_cache=use_cache)
    return torch.tensor(new, dtype=torch.long, device=input_ids.device)


def generate_batch(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    config: SamplingConfig,
    *,
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Completions (special tokens dropped) of text prompts, `batch_size` prompts per batch."""
    ids = [prompt_ids(tokenizer, p, chat, system)[0].tolist() for p in prompts]
    texts: list[str] = []
    for start in range(0, len(ids), batch_size):
        new = sample(
            model,
            ids[start : start + batch_size],
            config,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 0,
            seeds=[config.seed + i for i in range(start, min(start + batch_size, len(ids)))],
        )
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts


@hydra.main(config_path=str(CONF_DIR), config_name="generate", version_base="1.3")
@errors.reported
def _hydra_main(cfg: DictConfig) -> None:
    if cfg.ckpt is None or cfg.prompt is None:
        raise errors.UserError(
            'usage: python -m tinyreason.generate ckpt=<.ckpt | run dir | HF dir> prompt="..."'
        )
    model, tokenizer = load_model(Path(cfg.ckpt), cfg.tokenizer)
    if cfg.device != "cpu":
        model = model.to(cfg.device)
    prompts = list(cfg.prompt) if OmegaConf.is_list(cfg.prompt) else [str(cfg.prompt)]
    config = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed)
    if not cfg.use_cache:  # the reference path, one prompt at a time
        for p in prompts:
            ids = prompt_ids(tokenizer, str(p), cfg.chat, cfg.system)
            new = sample(
                model, ids.tolist(), config, eos_token_id=tokenizer.eos_token_id, use_cache=False
            )
            print(tokenizer.decode(new[0], skip_special_tokens=True))
        return
    texts = generate_batch(
        model, tokenizer, [str(p) for p in prompts], config, chat=cfg.chat, system=cfg.system
    )
    for text in texts:
        print(text)


def main() -> None:
    errors.run(_hydra_main)


if __name__ == "__main__":
    main()
