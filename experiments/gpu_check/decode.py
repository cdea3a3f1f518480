"""Decoding on one GPU (`gpu_check.py --checks decode`): new tokens/s of `tinyreason.sampling.sample`
with its eager decode step vs the step compiled and replayed as CUDA graphs
(`compile=True`: torch.compile mode="reduce-overhead"), at batch 1 / 16 / 64 (continuous
batching over 64 prompts: a finished row's slot takes the next one), on the CPU-default MoE
(MLA + DeepSeekMoE, hidden 192, 4 layers) and a ~100 M-parameter one, randomly initialised (no
eos: every row writes all its tokens), fp32 (so the two decode the same tokens up to rounding).
A row per (model, batch): tokens/s of each, compiled / eager, the rows whose tokens are
identical, the compile time (untimed in the rounds), median of 3 rounds each, alternating.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import torch

from tinyreason.model import CausalLM, MLAConfig, ModelConfig, MoEConfig, MTPConfig
from tinyreason.sampling import SamplingConfig, sample

BATCHES = (1, 16, 64)


def configs(smoke: bool) -> dict[str, ModelConfig]:
    small = ModelConfig(
        vocab_size=4096,
        hidden_size=192,
        num_layers=4,
        num_dense_layers=1,
        intermediate_size=512,
        max_seq_len=640,
        attention=MLAConfig(
            num_heads=4,
            q_lora_rank=96,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        ),
        moe=MoEConfig(
            num_experts=8,
            num_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            num_groups=2,
            topk_groups=1,
        ),
        mtp=MTPConfig(depth=0),
    )
    if smoke:
        return {"cpu-default MoE": dataclasses.replace(small, num_layers=2)}
    big = dataclasses.replace(
        small,
        vocab_size=32768,
        hidden_size=768,
        num_layers=8,
        intermediate_size=2048,
        attention=dataclasses.replace(
            small.attention, num_heads=12, q_lora_rank=384, kv_lora_rank=256, v_head_dim=64
        ),
        moe=dataclasses.replace(small.moe, num_experts=16, moe_intermediate_size=512),
    )
    return {"cpu-default MoE": small, "~100M MoE": big}


def run(device: torch.device, smoke: bool) -> dict:
    """Rows (the table) and failures (a compiled row with tokens other than eager's)."""
    new, prompt_len, rounds = (8, 16, 1) if smoke else (128, 96, 3)
    rows, failures = [], []
    for name, cfg in configs(smoke).items():
        torch.manual_seed(0)
        model = CausalLM(cfg).to(device).float().eval()
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, cfg.vocab_size, (prompt_len,), generator=g).tolist()] * 64
        prompts = [p[: prompt_len - i % (prompt_len // 2)] for i, p in enumerate(prompts)]
        config = SamplingConfig(new)

        decode = functools.partial(_decode, model, prompts, config, device)

        start = time.perf_counter()
        for b in BATCHES:  # compile (and capture) every shape before the timed rounds
            decode(b, True)
        compile_s = time.perf_counter() - start
        for b in BATCHES:
            times: dict[bool, list[float]] = {False: [], True: []}
            outs = {}
            for _ in range(rounds):
                for compiled in (False, True):
                    tps, outs[compiled] = decode(b, compiled)
                    times[compiled].append(tps)
            same = sum(a == c for a, c in zip(outs[False], outs[True], strict=True))
            eager, graphs = (statistics.median(times[c]) for c in (False, True))
            rows.append(
                dict(model=name, batch=b, eager=eager, compiled=graphs, ratio=graphs / eager)
                | dict(identical=same / len(outs[False]), compile_s=compile_s)
            )
            if same < len(outs[False]):
                failures.append(f"decode {name} batch {b}: {len(outs[False]) - same} rows differ")
    return {"rows": rows, "failures": failures}


def _decode(
    model, prompts, config, device, batch: int, compile: bool
) -> tuple[float, list[list[int]]]:
    """(new tokens/s, the tokens) of the prompts (8 of them at batch 1) with `batch` slots."""
    use = prompts[:8] if batch == 1 else prompts
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = sample(model, use, config, eos_token_id=None, batch_size=batch, compile=compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(map(len, out)) / (time.perf_counter() - start), out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | batch | eager tokens/s | compiled (CUDA graphs) tokens/s | compiled / eager "
        "| identical rows | compile + capture (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['eager']:,.0f} | {r['compiled']:,.0f} | "
            f"{r['ratio']:.2f}x | {100 * r['identical']:.0f}% | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)
