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

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from tinyreason.model import CausalLM
from tinyreason.model.attention import SlotCache

log = logging.getLogger(__name__)


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


def draw(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Tokens [B] by inverse CDF: row b takes the first token whose cumulative probability
    reaches u_B[b] (uniform in [0, 1)) times the row's total (so unnormalised rows work too)."""
    cdf_BV = probs_BV.cumsum(dim=-1)
    token_B = torch.searchsorted(cdf_BV, u_B.to(cdf_BV.device)[:, None] * cdf_BV[:, -1:])
    return token_B.squeeze(-1).clamp(max=probs_BV.shape[-1] - 1)


def uniforms(generators: list[torch.Generator], n: int = 1) -> torch.Tensor:
    """[B, n] uniforms, row b from its own generator (what makes a row's draws independent of
    the batch it is in)."""
    return torch.stack([torch.rand(n, generator=g, device=g.device) for g in generators])


def _pick(
    logits_BV: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]
) -> torch.Tensor:
    if config.greedy:
        return logits_BV.float().argmax(dim=-1)
    return draw(filter_probs(logits_BV, config), uniforms(generators)[:, 0])


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
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    fit_window: bool = False,
    compile: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (ending at the first eos, included, or at max_new_tokens).

    `batch_size` rows decode at once (default: every prompt); `progress(k)` is called as k more
    rows finish. `fit_window`: a row whose prompt leaves less room than max_new_tokens in the
    model's window writes what fits instead of being refused. `compile`: decode steps through
    `torch.compile` (`compiled_step`; the same tokens, up to float summation order)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (or None: every prompt at once)")
    limits = [config.max_new_tokens] * len(prompts)
    if fit_window:
        room = model.config.max_seq_len + 1
        limits = [min(config.max_new_tokens, room - len(p)) for p in prompts]
        if min(limits, default=1) < 1:
            raise ValueError(f"a prompt of {max(map(len, prompts))} tokens fills the window")
    check_prompts(model, prompts, 1 if fit_window else config.max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    seeds = seeds if seeds is not None else [config.seed + i for i in range(len(prompts))]
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    if use_cache:
        return _sample_cached(
            model,
            prompts,
            config,
            limits,
            eos_token_id,
            pad_token_id,
            generators,
            batch_size,
            progress,
            compile,
        )
    out = _sample_uncached(model, prompts, config, limits, eos_token_id, generators)
    if progress is not None:
        progress(len(out))
    return out


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


# Decode steps attend to the first `view` cache columns, rounded up to a multiple of this: a
# handful of shapes per call (what a compiled step is specialised on), little attention wasted.
VIEW_BUCKET = 32


def _sample_cached(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    limits: list[int],
    eos: int | None,
    pad: int,
    generators: list[torch.Generator],
    batch_size: int | None,
    progress: Callable[[int], None] | None,
    compile: bool = False,
) -> list[list[int]]:
    """Continuous batching: `batch_size` slots decode together; a slot whose row ends takes the
    next prompt (prefilled once enough slots are free), so the batch stays full until the
    prompts run out, and then shrinks as rows end."""
    device = next(model.parameters()).device
    n = len(prompts)
    B = min(batch_size or n, n)
    refill_at = max(1, B // 8)  # prefill this many new prompts at once (or whatever is left)
    capacity = max(len(p) + k - 1 for p, k in zip(prompts, limits, strict=True))  # last: not fed
    cache = SlotCache(len(model.layers), B, capacity)
    queue = deque(range(n))
    held = [-1] * B  # the prompt each slot decodes, -1 = free
    token_B = torch.zeros(B, dtype=torch.long, device=device)  # the next input of each slot
    pos_B = torch.zeros(B, dtype=torch.long, device=device)  # its position (= its cache column)
    out: list[list[int]] = [[] for _ in prompts]
    columns = torch.arange(capacity, device=device)
    step = compiled_step(device.type) if compile else decode_step
    model.rope_table(device)  # filled once, outside the (compiled) step

    def emit(slot: int, token: int) -> None:
        i = held[slot]
        out[i].append(token)
        if token == eos or len(out[i]) == limits[i]:
            held[slot] = -1
            if progress is not None:
                progress(1)

    while True:
        free = [s for s, i in enumerate(held) if i < 0]
        while queue and free and (len(free) >= min(refill_at, len(queue)) or len(free) == B):
            slots = free[: len(queue)]
            rows = [queue.popleft() for _ in slots]
            for s, i in zip(slots, rows, strict=True):
                held[s] = i
            firsts = _prefill(model, cache, [prompts[i] for i in rows], slots, pad, device)
            first_B = _pick(firsts, config, [generators[i] for i in rows])
            slots_t = torch.tensor(slots, device=device)
            token_B[slots_t] = first_B
            pos_B[slots_t] = torch.tensor([len(prompts[i]) for i in rows], device=device)
            for s, t in zip(slots, first_B.tolist(), strict=True):
                emit(s, t)
            free = [s for s, i in enumerate(held) if i < 0]
        busy = [s for s, i in enumerate(held) if i >= 0]
        if not busy:
            return out
        if not queue and len(busy) <= len(held) // 2:  # the tail: the batch shrinks
            keep = torch.tensor(busy, device=device)
            cache.select(keep)
            token_B, pos_B, held = token_B[keep], pos_B[keep], [held[s] for s in busy]
            busy = list(range(len(held)))
        view = min(capacity, -(-(int(pos_B.max()) + 1) // VIEW_BUCKET) * VIEW_BUCKET)
        view_T = columns[:view]
        logits_BV = step(model, cache.decode(pos_B, view_T), token_B, pos_B, view_T)
        if len(busy) < len(held):  # free slots ran too (a fixed shape); their logits go
            busy_t = torch.tensor(busy, device=device)
            token_B[busy_t] = _pick(logits_BV[busy_t], config, [generators[held[s]] for s in busy])
        else:
            token_B = _pick(logits_BV, config, [generators[i] for i in held])
        for s, t in zip(busy, token_B[busy].tolist(), strict=True):
            emit(s, t)
        # a free slot writes its (ignored) token at column 0 until a prompt fills it
        running_B = torch.tensor([i >= 0 for i in held], device=device)
        pos_B = torch.where(running_B, pos_B + 1, 0)


def decode_step(
    model: CausalLM,
    cache: SlotCache,
    token_B: torch.Tensor,
    pos_B: torch.Tensor,
    columns_T: torch.Tensor,
) -> torch.Tensor:
    """One token per slot at its position -> the next logits [B, V]; a slot attends to the
    cache columns up to its position."""
    mask_B11T = (columns_T <= pos_B[:, None])[:, None, None]
    return model(
        token_B[:, None], cache=cache, position_ids=pos_B[:, None], attn_mask=mask_B11T
    ).logits[:, -1]


_COMPILED: dict[str, Callable | None] = {}  # device type -> the compiled step; None: it failed


def compiled_step(device_type: str = "cpu") -> Callable[..., torch.Tensor]:
    """`decode_step` through `torch.compile`, or `decode_step` itself, with one warning, where
    compile is not available (no C++ compiler, an unsupported platform). On CPU inductor writes
    C++/OpenMP kernels and a C++ wrapper that calls them (`cpp_wrapper`: no Python between the
    ~100 kernels of a step); on CUDA, Triton kernels replayed as CUDA graphs
    (`mode="reduce-overhead"`; the slot cache's buffers are static addresses). Shapes: the first
    call compiles for its batch and view; a second view marks that dimension dynamic (torch's
    automatic dynamic shapes), so a run compiles about twice in all."""
    if device_type not in _COMPILED:
        if device_type == "cuda":
            _COMPILED[device_type] = torch.compile(decode_step, mode="reduce-overhead")
        else:
            options = {"cpp_wrapper": True}
            _COMPILED[device_type] = torch.compile(decode_step, dynamic=None, options=options)
    compiled = _COMPILED[device_type]
    if compiled is None:
        return decode_step

    def step(*args) -> torch.Tensor:
        try:
            return compiled(*args)
        except Exception as e:  # no C++ compiler, an unsupported op: decode eagerly
            if _COMPILED[device_type] is not None:
                log.warning("decoding without torch.compile (it failed: %s)", str(e)[:300])
            _COMPILED[device_type] = None
            return decode_step(*args)

    return step


def _prefill(
    model: CausalLM,
    cache: SlotCache,
    prompts: list[list[int]],
    slots: list[int],
    pad: int,
    device,
) -> torch.Tensor:
    """Run new prompts (right-padded) into their slots' cache columns 0..len-1; -> the logits
    [N, V] after each one's last token."""
    L = max(map(len, prompts))
    ids_NL = torch.full((len(prompts), L), pad, dtype=torch.long, device=device)
    for j, p in enumerate(prompts):
        ids_NL[j, : len(p)] = torch.tensor(p, device=device)
    last_N = torch.tensor([len(p) - 1 for p in prompts], device=device)
    rows = torch.tensor(slots, device=device)
    out = model(ids_NL, cache=cache.prefill(rows), logits_at=last_N)
    return out.logits[:, 0]


def _sample_uncached(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    limits: list[int],
    eos: int | None,
    generators: list[torch.Generator],
) -> list[list[int]]:
    """The reference: each row alone, the whole prefix recomputed every step."""
    device = next(model.parameters()).device
    out = []
    for prompt, generator, limit in zip(prompts, generators, limits, strict=True):
        seq = torch.tensor([prompt], device=device)
        new: list[int] = []
        for _ in range(limit):
            token = int(_pick(model(seq).logits[:, -1], config, [generator])[0])
            new.append(token)
            if token == eos:
                break
            seq = torch.cat([seq, torch.tensor([[token]], device=device)], dim=1)
        out.append(new)
    return out


@contextmanager
def progress_bar(total: int, label: str | None):
    """A callback `done(k)` for k more finished rows: a tqdm bar on a terminal, a log line per
    tenth of the rows otherwise (a log file), nothing without a label."""
    if label is None:
        yield None
        return
    if sys.stderr.isatty():
        with tqdm(total=total, desc=label, unit="problem", leave=False, mininterval=0.5) as bar:
            yield bar.update
        return
    start, done, shown = time.perf_counter(), 0, 0

    def update(k: int) -> None:
        nonlocal done, shown
        done += k
        if done * 10 // total > shown or done == total:
            shown = done * 10 // total
            log.info("%s: %d / %d done (%.0f s)", label, done, total, time.perf_counter() - start)

    yield update


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
