"""KV cache == full forward, decoding options, and the run -> export -> generate -> init_from loop."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinyreason.checkpoints import load_checkpoint, load_model
from tinyreason.generate import generate
from tinyreason.model import CausalLM, debug_config
from tinyreason.model.attention import KVCache
from tinyreason.sampling import prompt_ids
from tinyreason.train import train

V = 256


def model_of(kind: str, **attention) -> CausalLM:
    torch.manual_seed(0)
    cfg = debug_config(V, kind)
    if attention:
        cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, **attention))
    return CausalLM(cfg).eval()


@pytest.mark.parametrize(
    "kind, attention", [("moe", {}), ("dense_mla", {"q_lora_rank": 0}), ("dense", {})]
)
def test_kv_cache_logits_equal_full_forward(kind, attention):
    model = model_of(kind, **attention)
    ids = torch.randint(0, V, (2, 15))
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        full = model(ids).logits
        chunks = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 6), (6, 10), (10, 11)]]
        chunks += [model(ids[:, t : t + 1], cache=cache).logits for t in range(11, 15)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 15
    tensors = cache.layers[0].tensors
    if kind == "dense":  # rotated k and v per kv head
        assert [t.shape for t in tensors] == [(2, 15, 2, 16), (2, 15, 2, 16)]
    else:  # MLA: the latent c^KV (C=16) and the shared rotated key (R=8), not per-head K/V
        assert [t.shape for t in tensors] == [(2, 15, 16 + 8)]  # [c^KV | k^R] per position


def test_kv_cache_refuses_targets_and_overflow():
    model = model_of("dense")
    cache = KVCache(len(model.layers))
    ids = torch.randint(0, V, (1, 100))
    with pytest.raises(ValueError, match="targets and a KV cache"):
        model(ids, ids, cache=cache)
    with torch.no_grad():
        model(ids, cache=cache)
    with pytest.raises(ValueError, match="after 100 cached ones > max_seq_len 128"):
        model(ids[:, :29], cache=cache)
    with pytest.raises(ValueError, match="exceed the model's max_seq_len=128"):
        generate(model, ids, 30)


def test_generate_stops_at_eos_samples_reproducibly_and_top_p_narrows_to_greedy():
    model = model_of("moe")
    prompt = torch.randint(0, V, (1, 5))
    greedy = generate(model, prompt, 12)
    assert greedy.shape == (1, 12)
    eos = greedy[0, 4].item()
    stopped = generate(model, prompt, 12, eos_token_id=eos)
    first = greedy[0].tolist().index(eos)
    assert stopped[0].tolist() == greedy[0, : first + 1].tolist()
    a = generate(model, prompt, 12, temperature=1.0, seed=7)
    assert torch.equal(a, generate(model, prompt, 12, temperature=1.0, seed=7, use_cache=False))
    assert not torch.equal(a, generate(model, prompt, 12, temperature=1.0, seed=8))
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_p=1e-6), greedy)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 4, top_p=0.0)


def test_prompt_ids_chat_template_or_bos_plus_text(tokenizer):
    chat = prompt_ids(tokenizer, "What is 2 + 3?", chat=True)[0].tolist()
    assert tokenizer.decode(chat) == "<|bos|><|user|>What is 2 + 3?<|assistant|>"
    raw = prompt_ids(tokenizer, "What is 2 + 3?", chat=False)[0].tolist()
    assert tokenizer.decode(raw) == "<|bos|>What is 2 + 3?"


@pytest.fixture(scope="module")
def tokenizer():
    from tinyreason.tokenizer import TokenizerConfig, chat_document, train_bpe

    docs = [chat_document(f"What is {i} + 3?", f"{i + 3}") for i in range(30)]
    return train_bpe(docs, TokenizerConfig(vocab_size=300))


@pytest.mark.slow
def test_run_exports_generates_and_continues_from_its_hf_folder(make_cfg, tmp_path):
    """A run writes <run>/hf; checkpoint, run dir and HF folder give the same model and tokens;
    `model.init_from=<run>/hf` starts where the run ended."""
    common = ("model=dense_mla", "precision=fp32", "debug=fast", "logger=none")
    run = tmp_path / "first"
    first = train(make_cfg(*common, run_dir=run))
    hf_dir = run / "hf"
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()

    ours = load_checkpoint(run)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-5

    outputs = []
    for source in (run, run / "checkpoints" / "last.ckpt", hf_dir):
        model, tok = load_model(source)
        new = generate(model, prompt_ids(tok, "What is 12 + 7?", chat=True), 16)
        outputs.append(tok.decode(new[0].tolist()))
    assert outputs[0] == outputs[1] == outputs[2]

    cli = subprocess.run(
        [sys.executable, "-m", "tinyreason.generate", f"ckpt={hf_dir}", "prompt=What is 12 + 7?"]
        + ["max_new_tokens=16"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
    skip = tok.decode(new[0].tolist(), skip_special_tokens=True)
    assert cli.stdout.strip() == skip.strip()
    assert not list(Path(tmp_path).glob("*.log"))  # the entry point writes no files

    short = ("trainer.max_steps=2", "trainer.val_check_interval=2")
    again = train(make_cfg(*common, *short, f"model.init_from={hf_dir}", run_dir=tmp_path / "2nd"))
    assert abs(again["val/bpb_first"] - first["val/bpb"]) < 1e-4  # the same model, continued
