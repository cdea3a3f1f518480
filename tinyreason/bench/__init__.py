"""Benchmarks: `python -m tinyreason.bench moe | generate | ce | memory`, ratios measured side by side in one
process (absolute times on shared machines are noise).

    moe       training-step and MoE-layer tokens/s, ours vs transformers, fp32 / bf16, MFU
    generate  batched decoding new tokens/s, ours vs transformers' generate, outputs compared
    ce        peak memory and time of the chunked output head + cross-entropy vs full logits
    memory    training tokens/s and peak memory with activation checkpointing and compile
"""
