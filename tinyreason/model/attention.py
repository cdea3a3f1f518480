"""Rotary embeddings and the two attention slots: MLA (DeepSeek-V3) and GQA (Llama / Qwen3).

Shape legend: B batch, S sequence, D hidden size, H query heads, G key/value heads,
Q q/k head dim, P no-RoPE part of a MLA q/k head, R RoPE dims, U value head dim,
C kv latent rank (kv_lora_rank), T positions attended (cached + new; T = S without a KV cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GQAConfig, MLAConfig, ModelConfig
from .layers import Linear, RMSNorm

# HF DeepseekV3 builds q_a_layernorm / kv_a_layernorm without config.rms_norm_eps, i.e. eps=1e-6.
LATENT_NORM_EPS = 1e-6
# MLA attends in the latent space (absorbed) for a chunk of fewer new positions after a KV cache;
# expanding K and V for every cached position costs less per query only for long chunks.
ABSORBED_MAX_CHUNK = 16

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos_SR, sin_SR), fp32


def rope_cos_sin(seq_len: int, dim: int, theta: float, device: torch.device | None = None) -> Rope:
    """cos/sin tables [S, R] in fp32 for positions 0..S-1; inv_freq_i = theta^(-2i/R) (RoFormer, arXiv 2104.09864).

    Each frequency appears twice, [f_0..f_{R/2-1}, f_0..f_{R/2-1}], matching the half-split pairing
    used by `apply_rope`. Computed per forward (cheap) so that `model.to(bf16)` cannot round it.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs_SF = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb_SR = torch.cat([freqs_SF, freqs_SF], dim=-1)
    return emb_SR.cos(), emb_SR.sin()


def apply_rope(x_BSHR: torch.Tensor, rope: Rope, *, interleaved: bool) -> torch.Tensor:
    """Rotate pairs of dims by position-dependent angles.

    Half-split (Llama, Qwen3): pairs (x_i, x_{i+R/2}). Interleaved (DeepSeek): pairs (x_{2i}, x_{2i+1}),
    i.e. the official complex product view_as_complex(x.view(..., R/2, 2)) * e^{i pos f}. We
    de-interleave first, so the output is that rotation with its dims permuted to [evens, odds]
    (as HF rope_interleave=True does); q and k get the same permutation, so q.k is unchanged.
    """
    if interleaved:
        x_BSHR = x_BSHR.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    # [S, R] tables (one position per column) or [B, S, R] (per-row positions, left-padded batches)
    cos_S1R, sin_S1R = (t.unsqueeze(-2).to(x_BSHR.dtype) for t in rope)
    x1, x2 = x_BSHR.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BSHR * cos_S1R + rotated * sin_S1R


def causal_attention(
    q_BHSQ: torch.Tensor,
    k_BGTQ: torch.Tensor,
    v_BGTU: torch.Tensor,
    scale: float,
    mask_B1ST: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v -> [B, H, S, U]; head h reads kv head h // (H/G).

    With a KV cache the keys cover T >= S positions and the queries are the last S of them.
    SDPA's kernels accumulate the softmax in fp32; tests check it against an explicit fp32 softmax
    reference. Its flash kernels (CPU and CUDA) need U == Q, otherwise SDPA falls back to the
    unfused math path (which also computes the masked half of q k^T): for MLA (U < Q) v is
    zero-padded to Q and the output sliced back, as HF does for flash-attention. The padded
    columns of the output are exactly zero and only add U..Q to the p v product.
    An explicit boolean `mask_B1ST` (True = attend; batched decoding with padding) replaces the
    causal mask: the caller builds causality and key padding into it.
    """
    S, T = q_BHSQ.shape[2], k_BGTQ.shape[2]
    Q, U = q_BHSQ.shape[-1], v_BGTU.shape[-1]
    gqa = q_BHSQ.shape[1] != k_BGTQ.shape[1]
    mask_ST = mask_B1ST
    if (
        mask_ST is None and S != T and S > 1
    ):  # a chunk after cached positions: query i sees keys <= T - S + i
        mask_ST = torch.ones(S, T, dtype=torch.bool, device=q_BHSQ.device).tril(T - S)
    if U < Q:
        v_BGTU = F.pad(v_BGTU, (0, Q - U))
    o_BHSU = F.scaled_dot_product_attention(
        q_BHSQ,
        k_BGTQ,
        v_BGTU,
        attn_mask=mask_ST,
        is_causal=mask_ST is None and S == T,
        scale=scale,
        enable_gqa=gqa,
    )
    return o_BHSU[..., :U]


class LayerCache:
    """One layer's cached tensors for incremental decoding, along dim 1 (positions).

    Without `capacity` the tensors grow by concatenation; with it, buffers [B, capacity, ...] are
    allocated at the first `extend` and written in place (batched sampling: no copy per token).
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.tensors: tuple[torch.Tensor, ...] = ()
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def extend(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new positions; return the tensors of every position so far."""
        start, end = self._length, self._length + new[0].shape[1]
        self._length = end
        if self.capacity is None:
            if self.tensors:
                new = tuple(
                    torch.cat([old, n], dim=1) for old, n in zip(self.tensors, new, strict=True)
                )
            self.tensors = new
            return new
        if end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({end} positions)")
        if not self.tensors:
            self.tensors = tuple(
                n.new_empty((n.shape[0], self.capacity, *n.shape[2:])) for n in new
            )
        for buf, n in zip(self.tensors, new, strict=True):
            buf[:, start:end] = n
        return tuple(buf[:, :end] for buf in self.tensors)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        self.tensors = tuple(t.index_select(0, rows) for t in self.tensors)


class KVCache:
    """What attention keeps of the positions already processed, one `LayerCache` per main-model
    layer (MTP blocks do not run when decoding).

    MLA keeps its normalised latent c^KV and rotated shared key k^R (eqs. 1, 3) side by side in
    one tensor [B, T, C + R]: the small cache that MLA exists for; K^C and V are expanded from the latent again
    each step (the "naive" form HF computes). GQA keeps rotated keys and values [B, T, G, Q].
    `capacity` preallocates every layer for that many positions.
    """

    def __init__(self, num_layers: int, capacity: int | None = None) -> None:
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions cached, i.e. the position of the next input token."""
        return self.layers[0].length

    def select(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select(rows)


class SlotCache:
    """The KV cache of continuous batching (`tinyreason.sampling`): B slots, each holding one
    sequence from column 0, with buffers [B, capacity, ...] per layer allocated once (zeroed: a
    column nobody wrote is masked, and 0 * 0 adds nothing to p v where NaN garbage would).

    Before each forward the sampler says what it writes: `prefill(rows)` (the new prompts of
    slots `rows`, right-padded, take columns 0..S-1 and attend only to themselves: their pad
    tokens come after every real one, so causality hides them) or `decode(columns, view_T)` (one
    token per slot written at its own column, then every slot attends to its first `view`
    columns, the attention mask hiding what lies beyond its sequence). Slots are refilled in
    place; nothing is copied when a sequence ends, only `select` when the batch shrinks.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int) -> None:
        self.batch, self.capacity = batch, capacity
        self.layers = [_SlotLayer(self) for _ in range(num_layers)]
        self.rows: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None
        self.view_T: torch.Tensor | None = None

    length = 0  # the positions come from `position_ids` (decode) or start at 0 (prefill)

    def prefill(self, rows: torch.Tensor) -> SlotCache:
        self.rows, self.columns = rows, None
        return self

    def decode(self, columns: torch.Tensor, view_T: torch.Tensor) -> SlotCache:
        """Write at `columns` [B]; attend to the first len(view_T) columns (a tensor, not an
        int: a compiled step reads its length as a shape, which may vary, not as a constant)."""
        if len(view_T) > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({len(view_T)} columns)")
        self.rows, self.columns, self.view_T = None, columns, view_T
        return self

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these slots (the batch shrinks once no prompt is left to fill them)."""
        self.batch = len(rows)
        for layer in self.layers:
            layer.tensors = tuple(t.index_select(0, rows) for t in layer.tensors)


class _SlotLayer:
    def __init__(self, owner: SlotCache) -> None:
        self.owner = owner
        self.tensors: tuple[torch.Tensor, ...] = ()

    def extend(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        o = self.owner
        if not self.tensors:
            self.tensors = tuple(n.new_zeros((o.batch, o.capacity, *n.shape[2:])) for n in new)
            if new[0].is_cuda:  # written in place by a CUDA-graphed step: a fixed address
                for t in self.tensors:
                    torch._dynamo.mark_static_address(t)
        if o.rows is not None:
            if new[0].shape[1] > o.capacity:
                raise ValueError(f"KV cache capacity {o.capacity} exceeded ({new[0].shape[1]})")
            for buf, n in zip(self.tensors, new, strict=True):
                buf[o.rows, : n.shape[1]] = n
            return new
        slots = torch.arange(new[0].shape[0], device=new[0].device)
        for buf, n in zip(self.tensors, new, strict=True):
            buf.index_put_((slots, o.columns), n[:, 0])
        return tuple(buf[:, : o.view_T.shape[0]] for buf in self.tensors)


class MLA(nn.Module):
    """Multi-head Latent Attention, DeepSeek-V3 eqs. 1-11 (arXiv 2412.19437), "naive" form:
    K/V are expanded from the latent (as HF does), not absorbed into q / o_proj."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        a = config.attention
        assert isinstance(a, MLAConfig)
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = (
            a.num_heads,
            a.q_lora_rank,
            a.kv_lora_rank,
        )
        self.nope_dim, self.rope_dim, self.v_dim = (
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
        )
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = qk_dim**-0.5
        d = config.hidden_size
        if self.q_lora_rank > 0:
            self.q_a_proj = Linear(d, self.q_lora_rank)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * qk_dim)
        else:
            self.q_proj = Linear(d, self.num_heads * qk_dim)
        # Rows [latent c^KV | shared k^R], eqs. 1 and 3.
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        # Per head: [k^C (P rows) | v^C (U rows)], eqs. 2 and 5.
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(self.num_heads * self.v_dim, d)

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope: Rope,
        cache: LayerCache | None = None,
        mask_B1ST: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, D] at the positions of `rope`; with `cache`, after its T - S cached positions."""
        B, S, _ = x_BSD.shape
        H, P, R, U = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        if self.q_lora_rank > 0:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))  # eqs. 6-7
        else:
            q = self.q_proj(x_BSD)
        q_nope_BSHP, q_rope_BSHR = q.view(B, S, H, P + R).split([P, R], dim=-1)
        c_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, R], dim=-1)
        c_BSC = self.kv_a_layernorm(c_BSC)
        k_rope_BS1R = apply_rope(k_rope_BSR[:, :, None, :], rope, interleaved=True)  # eq. 3
        q_rope_BSHR = apply_rope(q_rope_BSHR, rope, interleaved=True)  # eq. 8
        c_BTC, k_rope_BT1R = c_BSC, k_rope_BS1R
        if cache is not None:  # one cached tensor per position: [c^KV | k^R]
            (ckv_BTX,) = cache.extend(torch.cat([c_BSC, k_rope_BS1R[:, :, 0]], dim=-1))
            T = ckv_BTX.shape[1]
            # Decoding (one token, or a short chunk after cached ones: speculative verification):
            # attend in the latent space. A prefill (S == T) or a long chunk expands K and V.
            if S == 1 or S < min(T, ABSORBED_MAX_CHUNK):
                o_BSHU = self._absorbed(q_nope_BSHP, q_rope_BSHR, ckv_BTX, mask_B1ST)
                return self.o_proj(o_BSHU.reshape(B, S, H * U))
            c_BTC, k_rope_BTR = ckv_BTX.split([self.kv_lora_rank, R], dim=-1)
            k_rope_BT1R = k_rope_BTR[:, :, None, :]
        T = c_BTC.shape[1]
        k_nope_BTHP, v_BTHU = self.kv_b_proj(c_BTC).view(B, T, H, P + U).split([P, U], dim=-1)

        q_BSHQ = torch.cat([q_nope_BSHP, q_rope_BSHR], dim=-1)  # eq. 9
        k_BTHQ = torch.cat([k_nope_BTHP, k_rope_BT1R.expand(B, T, H, R)], dim=-1)  # eq. 4
        o_BHSU = causal_attention(
            q_BSHQ.transpose(1, 2),
            k_BTHQ.transpose(1, 2),
            v_BTHU.transpose(1, 2),
            self.scale,
            mask_B1ST,
        )  # eq. 10
        return self.o_proj(o_BHSU.transpose(1, 2).reshape(B, S, H * U))  # eq. 11

    def _absorbed(
        self,
        q_nope_BSHP: torch.Tensor,
        q_rope_BSHR: torch.Tensor,
        ckv_BTX: torch.Tensor,
        mask_B1ST: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention over the cached latent without expanding it (DeepSeek-V2 §2.1.2's absorbed
        form): q_nope . (W_UK c) = (W_UK^T q_nope) . c and sum_t p_t (W_UV c_t) = W_UV sum_t p_t c_t,
        so a decoding step costs O(T C) per head instead of recomputing K and V for all T
        positions. The same function as the expanded form, up to float summation order.

        `ckv_BTX` is the cache as it is stored, [c^KV | k^R] (X = C + R) per position, read in
        place: the heads of a row share it, so the scores are one batched GEMM of the row's S*H
        queries against its T cached positions, [B, S*H, X] @ [B, X, T], with no copy of the
        cache per head (a broadcast [B, H, T, X] operand would be copied H times every step)."""
        B, S, H, _ = q_nope_BSHP.shape
        P, U, C = self.nope_dim, self.v_dim, self.kv_lora_rank
        w_HXC = self.kv_b_proj.weight.view(H, P + U, C)
        w_uk_HPC, w_uv_HUC = w_HXC.split([P, U], dim=1)
        q_lat_BSHC = torch.einsum("bshp,hpc->bshc", q_nope_BSHP, w_uk_HPC)
        q_BQX = torch.cat([q_lat_BSHC, q_rope_BSHR], dim=-1).view(B, S * H, -1)  # Q = S*H
        T = ckv_BTX.shape[1]
        scores_BSHT = (q_BQX @ ckv_BTX.transpose(1, 2)).view(B, S, H, T) * self.scale
        if mask_B1ST is None and S > 1:  # a chunk after cached keys: query i sees keys <= T-S+i
            mask_B1ST = torch.ones(S, T, dtype=torch.bool, device=ckv_BTX.device).tril(T - S)
        if mask_B1ST is not None:  # [S, T] or [B, 1, S, T] -> broadcast over the heads
            mask_BS1T = mask_B1ST[:, None] if mask_B1ST.dim() == 2 else mask_B1ST.transpose(1, 2)
            scores_BSHT = scores_BSHT.masked_fill(~mask_BS1T, float("-inf"))
        p_BQT = scores_BSHT.float().softmax(dim=-1).to(ckv_BTX.dtype).view(B, S * H, T)
        o_lat_BSHC = (p_BQT @ ckv_BTX[..., :C]).view(B, S, H, C)
        return torch.einsum("bshc,huc->bshu", o_lat_BSHC, w_uv_HUC)


class GQA(nn.Module):
    """Grouped-query attention (arXiv 2305.13245); with qk_norm it is Qwen3's attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        a = config.attention
        assert isinstance(a, GQAConfig)
        self.num_heads, self.num_kv_heads = a.num_heads, a.num_kv_heads
        self.head_dim = a.resolved_head_dim(config.hidden_size)
        self.scale = self.head_dim**-0.5
        d, hd = config.hidden_size, self.head_dim
        self.q_proj = Linear(d, self.num_heads * hd)
        self.k_proj = Linear(d, self.num_kv_heads * hd)
        self.v_proj = Linear(d, self.num_kv_heads * hd)
        self.o_proj = Linear(self.num_heads * hd, d)
        self.qk_norm = a.qk_norm
        if a.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        rope: Rope,
        cache: LayerCache | None = None,
        mask_B1ST: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, G, Q = self.num_heads, self.num_kv_heads, self.head_dim
        q_BSHQ = self.q_proj(x_BSD).view(B, S, H, Q)
        k_BSGQ = self.k_proj(x_BSD).view(B, S, G, Q)
        v_BSGQ = self.v_proj(x_BSD).view(B, S, G, Q)
        if self.qk_norm:  # Qwen3 normalises each head before RoPE
            q_BSHQ, k_BSGQ = self.q_norm(q_BSHQ), self.k_norm(k_BSGQ)
        q_BSHQ = apply_rope(q_BSHQ, rope, interleaved=False)
        k_BSGQ = apply_rope(k_BSGQ, rope, interleaved=False)
        k_BTGQ, v_BTGQ = k_BSGQ, v_BSGQ
        if cache is not None:
            k_BTGQ, v_BTGQ = cache.extend(k_BSGQ, v_BSGQ)
        o_BHSQ = causal_attention(
            q_BSHQ.transpose(1, 2),
            k_BTGQ.transpose(1, 2),
            v_BTGQ.transpose(1, 2),
            self.scale,
            mask_B1ST,
        )
        return self.o_proj(o_BHSQ.transpose(1, 2).reshape(B, S, H * Q))


def build_attention(config: ModelConfig) -> MLA | GQA:
    return MLA(config) if isinstance(config.attention, MLAConfig) else GQA(config)
