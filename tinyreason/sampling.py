"""Batched, KV-cached sampling: what `generate`, `evaluate` and the in-training exact match use.

Prompts of different lengths are left-padded into one batch. Every row keeps its own positions
(its first real token is position 0, as when it runs alone) and its pad keys are masked, so a row
decodes the same tokens in a batch as on its own. The KV cache is allocated once for the longest
sequence (prompt + max_new_tokens) and written in place; a row that emits eos leaves the batch
(its cache rows are dropped), so a batch costs what its still-running rows cost.

Decoding: greedy at temperature 0; else softmax(logits / T) restricted to the top_k tokens and the
nucleus top_p (arXiv 1904.09751), drawn by inverse CDF from one seeded generator per row, so that
a row's sample does not depend on the other rows of the batch either.

Shape legend: B batch (rows still running), P longest prompt, T positions so far, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from tinyreason.model import CausalLM
from tinyreason.model.attention import KVCache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int = 0  # row i draws from a generator seeded with seed + i (sampling only)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_probs(logits_BV: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Sampling probabilities [B, V]: temperature, then top-k, then the nucleus top_p."""
    logits_BV = logits_BV.float() / config.temperature
    if 0 < config.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(config.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    if config.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= config.top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
        probs_BV = probs_BV / probs_BV.sum(dim=-1, keepdim=True)
    return probs_BV


def _pick(
    logits_BV: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]
) -> torch.Tensor:
    if config.greedy:
        return logits_BV.float().argmax(dim=-1)
    probs_BV = filter_probs(logits_BV, config)
    u_B1 = torch.stack([torch.rand(1, generator=g, device=g.device) for g in generators])
    cdf_BV = probs_BV.cumsum(dim=-1)
    token_B = torch.searchsorted(cdf_BV, u_B1.to(cdf_BV.device) * cdf_BV[:, -1:]).squeeze(-1)
    return token_B.clamp(max=probs_BV.shape[-1] - 1)


@torch.no_grad()
def sample(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    *,
    eos_token_id: int | None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (ending at the first eos, included, or at max_new_tokens)."""
    check_prompts(model, prompts, config.max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    seeds = seeds if seeds is not None else [config.seed + i for i in range(len(prompts))]
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    if use_cache:
        return _sample_cached(model, prompts, config, eos_token_id, pad_token_id, generators)
    return _sample_uncached(model, prompts, config, eos_token_id, generators)


def check_prompts(model: CausalLM, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse an empty batch or prompt, and prompts that leave no room for max_new_tokens (the
    last new token is never fed back)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, each with at least one token")
    limit = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens - 1 > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} "
            f"exceed the model's max_seq_len={limit}"
        )


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] (left-padded) and the mask of real tokens [B, P]."""
    P = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), P), pad, dtype=torch.long, device=device)
    real_BP = torch.zeros(len(prompts), P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids_BP[i, P - len(p) :] = torch.tensor(p, device=device)
        real_BP[i, P - len(p) :] = True
    return ids_BP, real_BP


def prefill_mask(real_BP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, 1, P, P], positions [B, P]) of a left-padded prefill: causal over the real
    tokens, a pad query sees only itself (no empty softmax row); a row's first real token is
    position 0."""
    P = real_BP.shape[1]
    causal_PP = torch.ones(P, P, dtype=torch.bool, device=real_BP.device).tril()
    eye_PP = torch.eye(P, dtype=torch.bool, device=real_BP.device)
    mask_B1PP = (causal_PP & (real_BP[:, None, :] | eye_PP))[:, None]
    return mask_B1PP, (real_BP.long().cumsum(-1) - 1).clamp(min=0)


def _sample_cached(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos: int | None,
    pad: int,
    generators: list[torch.Generator],
) -> list[list[int]]:
    device = next(model.parameters()).device
    ids_BP, real_BP = left_pad(prompts, pad, device)
    B, P = ids_BP.shape
    capacity = P + config.max_new_tokens
    cache = KVCache(len(model.layers), capacity=capacity)
    keys_BT = torch.zeros(B, capacity, dtype=torch.bool, device=device)  # attendable positions
    keys_BT[:, :P] = real_BP
    mask_B1PP, positions_BP = prefill_mask(real_BP)
    logits_BV = model(ids_BP, cache=cache, position_ids=positions_BP, attn_mask=mask_B1PP).logits[
        :, -1
    ]
    next_pos_B = real_BP.sum(-1)
    rows = torch.arange(B, device=device)  # original index of each running row
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(config.max_new_tokens):
        token_B = _pick(logits_BV, config, [generators[i] for i in rows.tolist()])
        for i, t in zip(rows.tolist(), token_B.tolist(), strict=True):
            out[i].append(t)
        running_B = (
            token_B != eos if eos is not None else torch.ones_like(token_B, dtype=torch.bool)
        )
        if step == config.max_new_tokens - 1 or not running_B.any():
            break
        keys_BT[:, P + step] = True
        if not running_B.all():  # finished rows leave the batch
            keep = running_B.nonzero().squeeze(-1)
            cache.select(keep)
            rows, token_B, next_pos_B = rows[keep], token_B[keep], next_pos_B[keep]
            keys_BT = keys_BT[keep]
        T = P + step + 1
        logits_BV = model(
            token_B[:, None],
            cache=cache,
            position_ids=next_pos_B[:, None],
            attn_mask=keys_BT[:, None, None, :T],
        ).logits[:, -1]
        next_pos_B = next_pos_B + 1
    return out


def _sample_uncached(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos: int | None,
    generators: list[torch.Generator],
) -> list[list[int]]:
    """The reference: each row alone, the whole prefix recomputed every step."""
    device = next(model.parameters()).device
    out = []
    for prompt, generator in zip(prompts, generators, strict=True):
        seq = torch.tensor([prompt], device=device)
        new: list[int] = []
        for _ in range(config.max_new_tokens):
            token = int(_pick(model(seq).logits[:, -1], config, [generator])[0])
            new.append(token)
            if token == eos:
                break
            seq = torch.cat([seq, torch.tensor([[token]], device=device)], dim=1)
        out.append(new)
    return out


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
