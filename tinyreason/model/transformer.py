"""Decoder block, causal LM with optional multi-token prediction, and weight init.

Ablations are slots on one model: the block's attention is MLA or GQA, its FFN dense or MoE.
Parameter names are HF's (DeepseekV3 / Llama / Qwen3), so export is a rename-free mapping.

Shape legend: B batch, S sequence, D hidden size, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, LayerCache, Rope, build_attention, rope_cos_sin
from .config import ModelConfig
from .layers import MLP, Embedding, Linear, RMSNorm, init_normal_
from .loss import IGNORE_INDEX, OutputHead
from .moe import Experts, MoE, Router
from .mtp import MTPModule


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += ffn(norm(x))."""

    def __init__(self, config: ModelConfig, use_moe: bool) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = build_attention(config)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MoE(config) if use_moe else MLP(d, config.intermediate_size)

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope: Rope,
        cache: LayerCache | None = None,
        mask_B1ST: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (x [B, S, D], balance loss of the MoE FFN, or None for a dense FFN)."""
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), rope, cache, mask_B1ST)
        h_BSD = self.post_attention_layernorm(x_BSD)
        if isinstance(self.mlp, MoE):
            h_BSD, balance = self.mlp(h_BSD)
            return x_BSD + h_BSD, balance
        return x_BSD + self.mlp(h_BSD), None


@dataclass
class ModelOutput:
    """In training with `CausalLM.loss_chunk_size` (targets given, grad enabled) the losses come
    from the chunked head: `logits` is then None and `mtp_logits` empty."""

    logits: torch.Tensor | None  # [B, S, V], main head
    loss: torch.Tensor | None = None  # ce + mtp.loss_weight * mtp + balance; None without targets
    ce: torch.Tensor | None = None  # main next-token CE
    mtp: torch.Tensor | None = None  # mean over depths of each depth's CE (L_MTP / lambda)
    balance: torch.Tensor | None = None  # alpha-weighted balance loss, mean over MoE layers
    mtp_logits: tuple[
        torch.Tensor, ...
    ] = ()  # depth k: [B, S-k, V]; position i predicts targets[i+k]
    hidden: torch.Tensor | None = None  # [B, S, D] final-normed state: h^0 of MTP (drafting)


def cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions whose target is not IGNORE_INDEX; 0 (not NaN) when there are none."""
    total = F.cross_entropy(
        logits_BSV.flatten(0, 1).float(),
        targets_BS.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / (targets_BS != IGNORE_INDEX).sum().clamp(min=1)


class CausalLM(nn.Module):
    # Set by the training module (`trainer.loss_chunk_size`): with targets and grad enabled, each
    # head's CE is computed this many tokens at a time, without the [B, S, V] logits.
    loss_chunk_size: int | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is None: set it with config.with_vocab(n)")
        self.config = config
        self._rope_tables: dict[torch.device, Rope] = {}
        d, eps, has_moe = config.hidden_size, config.rms_norm_eps, config.moe is not None
        self.embed_tokens = Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(
            Block(config, use_moe=has_moe and i >= config.num_dense_layers)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(d, eps)
        self.lm_head = OutputHead(d, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # MTP blocks use MoE whenever the model has MoE (HF forces first_k_dense_replace=0 for them).
        self.mtp = nn.ModuleList(
            MTPModule(d, eps, Block(config, use_moe=has_moe)) for _ in range(config.mtp.depth)
        )
        init_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, S] -> logits; with targets [B, S] (targets[t] = token after input_ids[t],
        IGNORE_INDEX to skip) also the losses and the MTP logits (in training with
        `loss_chunk_size`, the losses without any logits: see ModelOutput). With a KV cache
        (decoding), the inputs continue the cached positions and are appended to the cache.

        Batched decoding of left-padded prompts passes `position_ids` [B, S] (each row's own
        positions) and `attn_mask` [B, 1, S, T] (bool, True = attend: causal and not padding).
        `logits_at` [B] (no targets): the logits [B, 1, V] of one position per row only (the last
        real token of a right-padded prefill), not the [B, S, V] of every position."""
        start = 0 if cache is None else cache.length
        decoding_positions = position_ids if cache is not None else None
        _check_inputs(input_ids, targets, self.config.max_seq_len, start, decoding_positions)
        if cache is not None and targets is not None:
            raise ValueError("targets and a KV cache do not mix: the cache is for decoding")
        rope = self._rope(start, input_ids, position_ids)
        x_BSD = self.embed_tokens(input_ids)
        balances: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x_BSD, balance = layer(x_BSD, rope, layer_cache, attn_mask)
            if balance is not None:
                balances.append(balance)
        h_BSD = self.norm(x_BSD)  # also h^0 of MTP
        if logits_at is not None and targets is None:
            rows = torch.arange(len(h_BSD), device=h_BSD.device)
            return ModelOutput(logits=self.lm_head(h_BSD[rows, logits_at][:, None]), hidden=h_BSD)
        chunked = targets is not None and bool(self.loss_chunk_size) and torch.is_grad_enabled()
        out = ModelOutput(logits=None if chunked else self.lm_head(h_BSD), hidden=h_BSD)
        zero = torch.zeros((), device=input_ids.device)
        if targets is not None:
            out.ce = self._ce(h_BSD, targets, out.logits)
            mtp_BSD = self._mtp_states(input_ids, h_BSD, rope, balances, attn_mask)
            if not chunked:
                out.mtp_logits = tuple(self.lm_head(h) for h in mtp_BSD)
            mtp_ces = [
                self._ce(h, targets[:, k:], None if chunked else out.mtp_logits[k - 1])
                for k, h in enumerate(mtp_BSD, start=1)
            ]
            out.mtp = torch.stack(mtp_ces).mean() if mtp_ces else zero
        # Mean over every MoE layer that ran, MTP blocks included.
        out.balance = torch.stack(balances).mean() if balances else zero
        if out.ce is not None:
            out.loss = out.ce + self.config.mtp.loss_weight * out.mtp + out.balance
        return out

    def _rope(self, start: int, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> Rope:
        """cos/sin [S, R] for positions start..start+S-1, or [B, S, R] gathered at position_ids."""
        c = self.config
        if position_ids is None:
            cos, sin = rope_cos_sin(
                start + input_ids.shape[1], c.rope_dim, c.rope_theta, input_ids.device
            )
            return cos[start:], sin[start:]
        if position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        cos, sin = self.rope_table(input_ids.device)
        return cos[position_ids], sin[position_ids]

    def rope_table(self, device: torch.device) -> Rope:
        """cos/sin [max_seq_len, R] of the whole window, kept per device (plain fp32 tensors, not
        buffers: a cast of the model cannot round them): decoding gathers from it every step.
        A sampler fills it before compiling its step, so the compiled step finds it there."""
        table = self._rope_tables.get(device)
        if table is None:
            c = self.config
            table = rope_cos_sin(c.max_seq_len, c.rope_dim, c.rope_theta, device)
            if not torch.compiler.is_compiling():
                self._rope_tables[device] = table
        return table

    def _ce(
        self, h_BSD: torch.Tensor, targets_BS: torch.Tensor, logits_BSV: torch.Tensor | None
    ) -> torch.Tensor:
        """`cross_entropy` of the head's logits at h_BSD; None: computed by the chunked head."""
        if logits_BSV is not None:
            return cross_entropy(logits_BSV, targets_BS)
        total, count = self.lm_head(h_BSD, targets_BS, self.loss_chunk_size)
        return total / count.clamp(min=1)

    def _mtp_states(
        self,
        input_ids: torch.Tensor,
        h_BSD: torch.Tensor,
        rope: Rope,
        balances: list[torch.Tensor],
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """h^k [B, S-k, D] of each depth k, the shared head's input (the MTP logits are
        lm_head(h^k)). Depth k covers positions i = 0..S-k-1 (nothing wraps around): position i
        sees h^{k-1}_i and Emb(input_ids[i+k]) and predicts targets[i+k], i.e. input token
        i+k+1 (eqs. 21-24). Appends each MTP block's balance loss to `balances`."""
        states: list[torch.Tensor] = []
        for k, module in enumerate(self.mtp, start=1):
            n = input_ids.shape[1] - k
            if n <= 0:
                break
            emb_BnD = self.embed_tokens(input_ids[:, k:])
            rope_n = (rope[0][..., :n, :], rope[1][..., :n, :])  # [S, R] or [B, S, R]
            mask_n = None if attn_mask is None else attn_mask[..., :n, :n]
            h_BSD, balance = module(emb_BnD, h_BSD[:, :n], rope_n, mask_n)
            if balance is not None:
                balances.append(balance)
            states.append(h_BSD)
        return tuple(states)

    def mtp_hidden(
        self,
        h_BSD: torch.Tensor,
        next_ids: torch.Tensor,
        cache: LayerCache | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Depth 1 of MTP run as a drafter: h^1 [B, S, D] (the head's input) at positions i whose
        h^0 is h_BSD [B, S, D] and whose next token t_{i+1} is next_ids [B, S]; lm_head(h^1_i)
        predicts t_{i+2}. As `_mtp_states` trains it, position i attends over positions <= i.
        With `cache` (the MTP block's own LayerCache over the h' sequence) the positions continue
        the cached ones, as a KV cache does for the main model."""
        if not self.mtp:
            raise ValueError("this model has no MTP module (model.mtp.depth=0)")
        start = 0 if cache is None else cache.length
        rope = self._rope(start, next_ids, position_ids)
        h_BSD, _ = self.mtp[0](self.embed_tokens(next_ids), h_BSD, rope, attn_mask, cache)
        return h_BSD

    def moe_layers(self) -> list[MoE]:
        """Every MoE FFN, main layers first, then MTP blocks (for the per-step bias update)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_moe_biases(
        self, progress: float, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[float, torch.Tensor | None]:
        """DeepSeek-V3's aux-loss-free balancing, once per optimizer step, outside forward:
        every MoE layer's bias += gamma * sign(mean load - load), from the tokens it routed since
        the last update (`reduce` sums those counts over data-parallel ranks). gamma follows
        `config.moe.bias_gamma(progress)`, progress in [0, 1). Returns (gamma, counts [L, E])."""
        layers = self.moe_layers()
        if not layers:
            return 0.0, None
        counts_LE = torch.stack([m.tokens_per_expert for m in layers])
        if reduce is not None:
            counts_LE = reduce(counts_LE)
        gamma = self.config.moe.bias_gamma(progress)
        for m, counts_E in zip(layers, counts_LE, strict=True):
            m.tokens_per_expert.copy_(counts_E)
            m.update_bias(gamma)
        return gamma, counts_LE

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n


def _check_inputs(
    input_ids: torch.Tensor,
    targets: torch.Tensor | None,
    max_seq_len: int,
    start: int = 0,
    decoding_positions: torch.Tensor | None = None,
) -> None:
    """With a KV cache and explicit positions (batched decoding) the window bounds the positions,
    not the cache slots: speculative decoding leaves holes (`tinyreason.speculative`). Without a
    cache, the input's length (no device sync in training)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    position_ids = decoding_positions
    if position_ids is not None and not torch.compiler.is_compiling():  # (a host sync)
        if position_ids.numel() and int(position_ids.max()) >= max_seq_len:
            raise ValueError(
                f"position_ids reach {int(position_ids.max())} >= max_seq_len {max_seq_len}"
            )
    elif start + input_ids.shape[1] > max_seq_len:
        cached = f" after {start} cached ones" if start else ""
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} positions{cached} > max_seq_len {max_seq_len}"
        )
    if targets is not None and targets.shape != input_ids.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )


def init_weights(model: nn.Module, config: ModelConfig | None = None) -> None:
    """Initialise every tensor of `model` (a CausalLM, or any sub-module given `config`).

    | tensor                                              | init                               |
    |-----------------------------------------------------|------------------------------------|
    | embed_tokens.weight                                 | N(0, init_std)                     |
    | nn.Linear weights (q/kv/k/v projections, gate_proj, | N(0, init_std)                     |
    |   up_proj, eh_proj, lm_head)                        |                                    |
    | mlp.experts.gate_up_proj (routed, [E, 2F, D])       | N(0, init_std)                     |
    | o_proj.weight, down_proj.weight (dense MLP, shared  | N(0, init_std / sqrt(2*num_layers))|
    |   experts, MTP blocks), mlp.experts.down_proj       |                                    |
    | mlp.gate.weight (router)                            | N(0, init_std)                     |
    | mlp.gate.e_score_correction_bias                    | 0                                  |
    | every RMSNorm weight                                | 1                                  |
    | mlp.tokens_per_expert, mlp.last_load (counters)     | 0                                  |

    o_proj and down_proj write into the residual stream. Each block adds two such branches, so
    the stream is a sum of 2*num_layers terms; scaling their init by 1/sqrt(2*num_layers) keeps
    its variance at init independent of depth (GPT-2, Radford et al. 2019, §2.3).
    A tied lm_head shares the embedding tensor and is initialised once with the same law.

    Each row is the module's `reset_parameters()`, with the std this table gives it (set here as
    `init_std`): the modules draw nothing when they are built, so a model built on the meta
    device, sharded (FSDP2, expert parallelism), materialised with `to_empty()` and initialised
    here draws the same numbers, in the same order, as the model built whole (tested), and a
    DTensor keeps its own shard of each full draw (`layers.init_normal_`).
    """
    config = config if config is not None else model.config
    std = config.init_std
    residual_std = std / math.sqrt(2 * config.num_layers)
    for name, module in model.named_modules():
        is_residual = name.rsplit(".", 1)[-1] in ("o_proj", "down_proj")
        if isinstance(module, (Linear, Embedding, Router)):
            module.init_std = residual_std if is_residual else std
        elif isinstance(module, Experts):
            module.init_std, module.residual_std = std, residual_std
        elif isinstance(module, nn.Linear | nn.Embedding):  # not ours (e.g. FP8-converted)
            init_normal_(module.weight, residual_std if is_residual else std)
            continue
        if isinstance(module, (Linear, Embedding, Router, Experts, RMSNorm, MoE)):
            module.reset_parameters()
