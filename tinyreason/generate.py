"""`python -m tinyreason.generate ckpt=<.ckpt | run dir | HF dir> prompt="..." [max_new_tokens=N]`

Greedy by default (`temperature=0`); `temperature>0` samples, optionally within the nucleus
`top_p`. `chat=true` (default: every training document is a conversation) wraps the prompt in the
tokenizer's chat template and stops at eos. Decoding uses the KV cache (`use_cache=false`
recomputes the whole prefix each step: same tokens, for checking). `generate(...)` is the
importable function.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerFast

from tinyreason.export import checkpoint_file, find_tokenizer, load_checkpoint, run_dir_of
from tinyreason.model import CausalLM
from tinyreason.model.attention import KVCache
from tinyreason.model.hf import is_hf_folder, load_pretrained

log = logging.getLogger(__name__)


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


def _next_token(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy argmax at temperature 0; else a sample from softmax(logits / T) restricted to the
    smallest set of top tokens whose probability reaches top_p (nucleus sampling, arXiv 1904.09751)."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = (logits_BV / temperature).softmax(dim=-1)
    if top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Continue `input_ids` [1, S]; return the new token ids [1, <= max_new_tokens], ending at the
    first `eos_token_id` (included) if one is generated."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, seq], got shape {tuple(input_ids.shape)}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    limit = model.config.max_seq_len
    if input_ids.shape[1] + max_new_tokens - 1 > limit:
        raise ValueError(
            f"{input_ids.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
            f"model's max_seq_len={limit}"
        )
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    cache = KVCache(len(model.layers)) if use_cache else None
    seq = input_ids.to(device)
    step_input = seq
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache).logits[:, -1]
        token = _next_token(logits, temperature, top_p, generator)[:, None]
        new.append(token)
        if eos_token_id is not None and token.item() == eos_token_id:
            break
        seq = torch.cat([seq, token], dim=1)
        step_input = token if use_cache else seq
    return torch.cat(new, dim=1) if new else seq[:, :0]


def prompt_ids(
    tokenizer: PreTrainedTokenizerFast, prompt: str, chat: bool, system: str | None = None
) -> torch.Tensor:
    """[1, S] ids: the chat template with a generation prompt, or bos + the raw text."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = bos + tokenizer.encode(prompt, add_special_tokens=False)
    return torch.tensor([ids])


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.ckpt is None or cfg.prompt is None:
        raise ValueError(
            'usage: python -m tinyreason.generate ckpt=<.ckpt | run dir | HF dir> prompt="..."'
        )
    model, tokenizer = load_model(Path(cfg.ckpt), cfg.tokenizer)
    if cfg.device != "cpu":
        model = model.to(cfg.device)
    ids = prompt_ids(tokenizer, str(cfg.prompt), cfg.chat, cfg.system)
    new = generate(
        model,
        ids,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=cfg.use_cache,
        seed=cfg.seed,
    )
    print(tokenizer.decode(new[0].tolist(), skip_special_tokens=True))


if __name__ == "__main__":
    main()
