"""`python -m tinyreason.bench generate` compares speeds on the premise that our batched sampler
and transformers' `generate` decode the same greedy tokens from one export, and that MTP
speculative decoding decodes ours: check those premises on a debug model (no timing asserts)."""

from __future__ import annotations

import dataclasses

import torch

from tinyreason.bench.generate import bench_generate, report
from tinyreason.checkpoints import export_model
from tinyreason.model import CausalLM, debug_config
from tinyreason.tokenizer import TokenizerConfig, chat_document, train_bpe


def test_ours_and_transformers_generate_identical_tokens(tmp_path):
    docs = [
        chat_document(f"What is {i} + {i + 1}?", f"<think>{i}+{i + 1}</think>{2 * i + 1}")
        for i in range(40)
    ]
    tokenizer = train_bpe(docs, TokenizerConfig(vocab_size=320))
    torch.manual_seed(0)
    model = CausalLM(dataclasses.replace(debug_config(512, "moe"), max_seq_len=512))
    folder = export_model(model, tokenizer, tmp_path / "hf")
    result = bench_generate(
        folder,
        num_prompts=4,
        max_new_tokens=6,
        batch_sizes=(1, 4),
        batch1_prompts=2,
        repeats=1,
        steps=False,
        compiled=False,  # compiled == eager tokens: tests/test_sampling.py
    )
    rows = {r["batch"]: r for r in result["rows"]}
    assert rows[1]["prompts"] == 2 and rows[4]["prompts"] == 4
    for r in rows.values():
        assert r["mismatches"] == [] and r["identical"] == 1.0
        assert 0 < r["new_tokens"] <= r["prompts"] * 6
        # the export keeps the MTP layer: speculative decoding ran beside, same tokens as ours
        spec = r["speculative"]
        assert spec["mismatches"] == [] and spec["identical"] == 1.0
        assert spec["new_tokens"] == r["new_tokens"] and 0 <= spec["acceptance_rate"] <= 1
        assert spec["speedup"] > 0 and 1 <= spec["tokens_per_forward"] <= 2
    text = report(result)
    assert "| 4 | 4 |" in text and "speculative / plain" in text
