"""Self-speculative greedy decoding with the model's own MTP module (DeepSeek-V3 §2.2, arXiv
2412.19437): depth 1 reads h^0_i (the main model's final-normed state at position i) and
Emb(t_{i+1}) and predicts t_{i+2}, so after the main model has chosen the next token x_n it drafts
the one after it, d_{n+1}. One main forward over [x_n, d_{n+1}] then verifies the draft: its
logits at x_n give the greedy token g_{n+1}; if g_{n+1} == d_{n+1} the draft is accepted and the
logits at d_{n+1} give g_{n+2} as well (two tokens for one forward), else g_{n+1} is kept and the
draft's slot is wasted. Every kept token is the main model's argmax over a prefix of kept tokens,
so the output is plain greedy decoding's (`sampling.sample` at temperature 0), token for token, up
to float summation order (a 2-token forward sums in another order than a 1-token one; as the
cached sampler vs its uncached reference, a tie within rounding could flip).

Batching (left-padded prompts, rows accepting at different rates): the KV caches keep one shared
length. Every verification appends two slots to every running row; a row that rejects its draft
marks the draft's slot as a hole in its key mask (`keys_BT`, as `sampling` masks pad keys), and
its positions continue without a gap (the next token takes the position the draft had). Nothing
is ever rolled back or copied; the cost is attention over the holes. The MTP block keeps its own
cache (`LayerCache` over the h' sequence) whose slots mirror the main cache's: slot s pairs h^0 of
main slot s with the token after it, so one key mask serves both, and its attention sees exactly
what `CausalLM._mtp_states` sees in training (position i over positions <= i). Per step the MTP
block runs on two slots per row (after an accepted draft both are new positions; after a rejected
one the first is and the second is the hole), then the drafts of the next step come from the slot
of each row's last kept token.

Depth 1 only (a model with mtp.depth > 1 drafts with its first module); MLA and GQA alike.
Greedy only: temperature > 0 is refused (the distribution-preserving accept / reject rule of
Leviathan et al. 2023 is not implemented). Rows leave the batch when they finish, as in `sampling`.

Shape legend: B batch (rows still running), P longest prompt, T cache slots so far, D hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tinyreason.model import CausalLM, ModelConfig
from tinyreason.model.attention import KVCache, LayerCache
from tinyreason.sampling import (
    SamplingConfig,
    _pick,
    check_prompts,
    draw,
    filter_probs,
    left_pad,
    prefill_mask,
    uniforms,
)


@dataclass
class SpeculativeStats:
    """What the drafts bought; pass one object to several calls to add them up."""

    drafted: int = 0  # drafts a row could use (it still needed >= 2 tokens)
    accepted: int = 0  # of them, equal to the main model's greedy token
    row_forwards: int = 0  # main-model forwards, one per running row (the prefill included)
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward of a row: 1 for plain decoding, at most 2 here."""
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0

    def as_dict(self) -> dict[str, float]:
        rates = dict(
            acceptance_rate=self.acceptance_rate, tokens_per_forward=self.tokens_per_forward
        )
        return asdict(self) | rates


def check_speculative(config: ModelConfig) -> None:
    """Refuse a model that cannot draft (no MTP module)."""
    if config.mtp.depth < 1:
        raise ValueError(
            "speculative decoding drafts with the model's MTP module: it needs a model trained "
            "with model.mtp.depth >= 1 (MLA or GQA); this model has mtp.depth=0"
        )


@torch.no_grad()
def speculative_sample(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    *,
    eos_token_id: int | None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    stats: SpeculativeStats | None = None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """`sampling.sample(model, prompts, config, ...)`, MTP-drafted: at temperature 0 the same
    new token ids for each prompt; above it, tokens with the same distribution (row i draws
    from a generator seeded with seeds[i], default config.seed + i). `stats` (if given) counts
    drafts, acceptances and forwards."""
    check_speculative(model.config)
    check_prompts(model, prompts, config.max_new_tokens)
    model.eval()
    stats = stats if stats is not None else SpeculativeStats()
    device = next(model.parameters()).device
    seeds = seeds if seeds is not None else [config.seed + i for i in range(len(prompts))]
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    decode = _cached if use_cache else _uncached
    out = decode(model, prompts, config, eos_token_id, pad_token_id, stats, generators)
    stats.new_tokens += sum(map(len, out))
    return out


class _Verifier:
    """The accept / reject rule of one verification, for a batch of rows.

    Greedy: the draft is the MTP head's argmax; it is accepted when it equals the main model's
    argmax g0 after x_n, and then g1, the argmax after the draft, comes free.
    Sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318):
    the draft d ~ q (the MTP head's distribution, filtered like the main one) is accepted with
    probability min(1, p(d) / q(d)), p the main model's distribution after x_n; on acceptance
    the bonus token comes from p after d; on rejection the token comes from the residual
    max(0, p - q), renormalised. Every kept token is then distributed as plain sampling's. A
    row that needs only one more token ignores its draft and samples from p. Each row draws
    three uniforms per verification from its own generator (draft, accept, token)."""

    def __init__(self, config: SamplingConfig, generators: list[torch.Generator]) -> None:
        self.config, self.generators = config, generators

    def draft(self, mtp_logits_BV: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if self.config.greedy:
            return mtp_logits_BV.float().argmax(dim=-1)
        self.u_B3 = uniforms([self.generators[i] for i in rows], 3)
        self.q_BV = filter_probs(mtp_logits_BV, self.config)
        return draw(self.q_BV, self.u_B3[:, 0])

    def verify(
        self, logits_B2V: torch.Tensor, draft_B: torch.Tensor, usable_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(accepted [B], g0 [B]: the token after x_n on rejection, g1 [B]: the one after an
        accepted draft)."""
        if self.config.greedy:
            g_B2 = logits_B2V.float().argmax(dim=-1)
            return (g_B2[:, 0] == draft_B) & usable_B, g_B2[:, 0], g_B2[:, 1]
        u_B3, q_BV = self.u_B3.to(draft_B.device), self.q_BV
        p1_BV = filter_probs(logits_B2V[:, 0], self.config)
        p2_BV = filter_probs(logits_B2V[:, 1], self.config)
        rows = torch.arange(len(draft_B), device=draft_B.device)
        p_d, q_d = p1_BV[rows, draft_B], q_BV[rows, draft_B]
        accepted_B = (u_B3[:, 1] * q_d <= p_d) & usable_B
        residual_BV = (p1_BV - q_BV).clamp(min=0)
        # p == q leaves no residual (and then no rejection); a row without a usable draft: p
        plain_B = (residual_BV.sum(-1) <= 0) | ~usable_B
        residual_BV = torch.where(plain_B[:, None], p1_BV, residual_BV)
        return accepted_B, draw(residual_BV, u_B3[:, 2]), draw(p2_BV, u_B3[:, 2])


def _cached(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos: int | None,
    pad: int,
    stats: SpeculativeStats,
    generators: list[torch.Generator],
) -> list[list[int]]:
    device = next(model.parameters()).device
    limit, max_new = model.config.max_seq_len, config.max_new_tokens
    rule = _Verifier(config, generators)
    ids_BP, real_BP = left_pad(prompts, pad, device)
    B, P = ids_BP.shape
    capacity = P + 2 * (max_new - 1)  # the prefill, then two slots per verification
    cache = KVCache(len(model.layers), capacity=capacity)
    mtp_cache = LayerCache(capacity)
    keys_BT = torch.zeros(B, capacity, dtype=torch.bool, device=device)  # attendable slots
    keys_BT[:, :P] = real_BP
    mask_B1PP, positions_BP = prefill_mask(real_BP)
    main = model(ids_BP, cache=cache, position_ids=positions_BP, attn_mask=mask_B1PP)
    token_B = _pick(main.logits[:, -1], config, generators)  # chosen, not yet fed
    stats.row_forwards += B
    # The MTP block's next input: (h^0, the token after each slot, positions, mask) of the slots
    # the main model just wrote, and `take_B`, the slot whose h^1 drafts (the last kept token's).
    mtp_in = (main.hidden, torch.cat([ids_BP[:, 1:], token_B[:, None]], 1), positions_BP, mask_B1PP)
    take_B = torch.full((B,), P - 1, device=device)
    next_pos_B = real_BP.sum(-1)  # position of token_B
    rows = torch.arange(B, device=device)  # original index of each running row
    out = [[t] for t in token_B.tolist()]
    while True:
        running = [out[i][-1] != eos and len(out[i]) < max_new for i in rows.tolist()]
        if not any(running):
            break
        if not all(running):  # finished rows leave the batch (and both caches)
            keep = torch.tensor(running, device=device).nonzero().squeeze(-1)
            cache.select(keep)
            mtp_cache.select(keep)
            rows, token_B, take_B, next_pos_B = (
                t[keep] for t in (rows, token_B, take_B, next_pos_B)
            )
            keys_BT, mtp_in = keys_BT[keep], tuple(t[keep] for t in mtp_in)
        h_BSD, next_BS, positions_BS, mask_B1ST = mtp_in
        h1_BSD = model.mtp_hidden(h_BSD, next_BS, mtp_cache, positions_BS, mask_B1ST)
        here = torch.arange(len(rows), device=device)
        draft_B = rule.draft(model.lm_head(h1_BSD[here, take_B]), rows.tolist())

        T = cache.length + 2
        keys_BT[:, T - 2 : T] = True
        causal_2T = torch.ones(2, T, dtype=torch.bool, device=device).tril(T - 2)
        # A draft a row cannot use (one token left) still fills its slot; clamp its position.
        positions_B2 = torch.stack([next_pos_B, (next_pos_B + 1).clamp(max=limit - 1)], dim=1)
        main = model(
            torch.stack([token_B, draft_B], dim=1),
            cache=cache,
            position_ids=positions_B2,
            attn_mask=keys_BT[:, None, None, :T] & causal_2T,
        )
        usable_B = torch.tensor([max_new - len(out[i]) >= 2 for i in rows.tolist()], device=device)
        accept_B, g0_B, g1_B = rule.verify(main.logits, draft_B, usable_B)
        keys_BT[:, T - 1] = accept_B  # a rejected draft's slot becomes a hole
        stats.drafted += int(usable_B.sum())
        stats.accepted += int(accept_B.sum())
        stats.row_forwards += len(rows)
        kept = zip(
            rows.tolist(),
            accept_B.tolist(),
            draft_B.tolist(),
            g0_B.tolist(),
            g1_B.tolist(),
            strict=True,
        )
        for i, accepted, draft, g0, g1 in kept:
            for t in [draft, g1] if accepted else [g0]:
                out[i].append(t)
                if t == eos:
                    break
        token_B = torch.where(accept_B, g1_B, g0_B)
        # MTP slots of this step: after an accepted draft (x_n, d) -> d and g1 follow them; after
        # a rejected one x_n -> g0 follows, and the hole's slot is computed and never attended.
        after_B2 = torch.stack([torch.where(accept_B, draft_B, g0_B), g1_B], 1)
        mtp_in = (main.hidden, after_B2, positions_B2, keys_BT[:, None, None, :T] & causal_2T)
        take_B = accept_B.long()
        next_pos_B = next_pos_B + 1 + accept_B.long()
    return out


def _uncached(
    model: CausalLM,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos: int | None,
    pad: int,
    stats: SpeculativeStats,
    generators: list[torch.Generator],
) -> list[list[int]]:
    """The reference: each row alone, the main model and the MTP block recomputed over the whole
    sequence every step, no cache, no mask; the same draws from the row's generator."""
    device = next(model.parameters()).device
    max_new = config.max_new_tokens
    outs = []
    for prompt, generator in zip(prompts, generators, strict=True):
        rule = _Verifier(config, [generator])
        seq = list(prompt)
        main = model(torch.tensor([seq], device=device))
        stats.row_forwards += 1
        new = [int(_pick(main.logits[:, -1], config, [generator])[0])]
        seq.append(new[-1])
        while new[-1] != eos and len(new) < max_new:
            # h^0 of every slot whose token was kept, each with the token after it; h^1 of the
            # last drafts the token after seq[-1]
            m = len(seq)
            main = model(torch.tensor([seq[:-1]], device=device))
            next_ids = torch.tensor([seq[1:m]], device=device)
            h1 = model.mtp_hidden(main.hidden, next_ids)[:, -1]
            draft = rule.draft(model.lm_head(h1), [0])
            main = model(torch.tensor([seq + [int(draft[0])]], device=device))
            stats.row_forwards += 1
            usable = torch.tensor([max_new - len(new) >= 2], device=device)
            accepted, g0, g1 = rule.verify(main.logits[:, m - 1 :], draft, usable)
            stats.drafted += int(usable[0])
            stats.accepted += int(accepted[0])
            for t in [int(draft[0]), int(g1[0])] if accepted[0] else [int(g0[0])]:
                new.append(t)
                seq.append(t)
                if t == eos:
                    break
        outs.append(new)
    return outs
