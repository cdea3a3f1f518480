"""Benchmarks: `python -m tinyreason.bench moe | generate`, ratios measured side by side in one
process (absolute times on shared machines are noise).

    moe       training-step and MoE-layer tokens/s, ours vs transformers, fp32 / bf16, MFU
    generate  batched decoding new tokens/s, ours vs transformers' generate, outputs compared
"""
