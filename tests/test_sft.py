"""`stage=sft`: the chat template's generation markers and thinking switch, conversations from
chat / GSM8K jsonl, packed == one conversation at a time, skipped empty batches, and the stage end
to end from a pretrained run (resume, MoE + FP8)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import lightning as L
import pytest
import torch

from tinyreason.data import packing, synthetic
from tinyreason.data.conversations import (
    ConversationsCorpus,
    SFTConfig,
    gsm8k_solution,
    read_conversations,
    render,
)
from tinyreason.data.sources import ReasoningCorpus
from tinyreason.model import CausalLM, debug_config
from tinyreason.model.transformer import IGNORE_INDEX
from tinyreason.tokenizer import (
    BOS,
    EMPTY_THINK,
    EOS,
    ROLES,
    TokenizerConfig,
    chat_document,
    chat_prompt,
    train_bpe,
    without_think,
)
from tinyreason.train import train
from tinyreason.training.sft import SFTModule

MESSAGES = [
    {"role": "system", "content": "Think step by step."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "<think>\n12 + 7 = 19\n</think>\nAnswer: 19"},
    {"role": "user", "content": "And 19 + 1?"},
    {"role": "assistant", "content": "<think>\n19 + 1 = 20\n</think>\nAnswer: 20"},
]


@pytest.fixture(scope="module")
def tok():
    problems = synthetic.generate(synthetic.CorpusConfig(num_train=200), "train")
    texts = [chat_document(p.question, synthetic.format_text(p)) for p in problems]
    return train_bpe(texts + [render(MESSAGES)] * 5, TokenizerConfig(vocab_size=400))


def long_config(vocab: int, kind: str):
    """debug_config with room for whole conversations (its 128 positions are too few)."""
    return dataclasses.replace(debug_config(vocab_size=vocab, kind=kind), max_seq_len=1024)


def special(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return {
        "assistant_id": ids(ROLES["assistant"]),
        "turn_ids": {ids(t) for t in (BOS, ROLES["system"], ROLES["user"])},
        "eos_id": ids(EOS),
    }


# --- the chat template -----------------------------------------------------------------------


def test_template_renders_our_text_and_switches_thinking_off(tok):
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == render(MESSAGES)
    one = [{"role": "user", "content": "What is 2 + 3?"}]
    on = tok.apply_chat_template(one, tokenize=False, add_generation_prompt=True)
    assert on == chat_prompt("What is 2 + 3?") == BOS + "<|user|>What is 2 + 3?<|assistant|>"
    explicit = tok.apply_chat_template(
        one, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert explicit == on  # thinking on is the default, byte for byte
    off = tok.apply_chat_template(
        one, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off == chat_prompt("What is 2 + 3?", thinking=False) == on + EMPTY_THINK


def test_generation_markers_give_hf_our_assistant_mask(tok):
    """`return_assistant_tokens_mask` (what TRL's assistant_only_loss reads) == our mask."""
    out = tok.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ours = packing.assistant_mask(out["input_ids"], **special(tok))
    assert sum(ours) > 0 and list(map(bool, out["assistant_masks"])) == ours
    text = tok.decode([t for t, m in zip(out["input_ids"], ours, strict=True) if m])
    assert text == "".join(m["content"] + EOS for m in MESSAGES if m["role"] == "assistant")


def test_without_think_empties_the_block_and_keeps_the_answer():
    p = synthetic.generate(synthetic.CorpusConfig(num_train=5), "train")[0]
    doc = chat_document(p.question, synthetic.format_text(p).removeprefix(p.question + "\n"))
    short = without_think(doc)
    assert EMPTY_THINK in short and len(short) < len(doc) and short.endswith(EOS)
    assert synthetic.check(p, without_think(synthetic.format_text(p)))
    assert without_think("no think block") == "no think block"


# --- conversations from files ----------------------------------------------------------------


def test_gsm8k_annotations_become_steps_and_the_answer_line():
    answer = "She has 3 * 4 = <<3*4=12>>12 eggs.\nThen 12 - 2 = <<12-2=10>>10 left.\n#### 1,0"
    text, final = gsm8k_solution(answer)
    assert final == "10"
    assert text == (
        "<think>\nShe has 3 * 4 = 12 eggs.\n3 * 4 = 12\nThen 12 - 2 = 10 left.\n12 - 2 = 10\n"
        "</think>\nAnswer: 10"
    )
    assert synthetic.parse_answer(text) == "10"


def test_chat_and_gsm8k_files_read_with_counts_and_clear_errors(tmp_path):
    good = tmp_path / "mixed.jsonl"
    rows = [
        {"messages": MESSAGES},
        {"messages": MESSAGES[:2]},  # no assistant turn: skipped, counted
        {"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
    ]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs, skipped = read_conversations(str(good))
    assert skipped == 1 and docs[0] == render(MESSAGES)
    assert docs[1] == chat_document("How many?", gsm8k_solution(rows[2]["answer"])[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": MESSAGES}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a chat record"):
        read_conversations(str(bad))
    roles = tmp_path / "roles.jsonl"
    roles.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="roles must be"):
        read_conversations(str(roles))
    with pytest.raises(ValueError, match="not a .jsonl file"):
        SFTConfig(files=(str(tmp_path / "absent.jsonl"),))


def test_conversations_corpus_splits_files_and_drops_think_by_share(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {
            "question": f"What is {i} + 1?",
            "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}",
        }
        for i in range(400)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ReasoningCorpus(synthetic.CorpusConfig(num_train=50, num_val=10, num_test=0))
    corpus = ConversationsCorpus(SFTConfig(files=(str(path),), drop_think=0.5), base)
    train_docs, val_docs = corpus.documents("train"), corpus.documents("validation")
    assert len(train_docs) + len(val_docs) == 400 + 60 and 0 < len(val_docs) - 10 < 60
    assert not set(train_docs) & set(val_docs)
    dropped = sum(EMPTY_THINK in d for d in train_docs + val_docs)
    assert 0.4 < dropped / 460 < 0.6
    again = ConversationsCorpus(SFTConfig(files=(str(path),), drop_think=0.5), base)
    assert again.documents("train") == train_docs and again.fingerprint == corpus.fingerprint
    other = ConversationsCorpus(SFTConfig(files=(str(path),)), base)
    assert other.fingerprint != corpus.fingerprint


# --- packed == one conversation at a time ----------------------------------------------------


@pytest.mark.parametrize("kind", ["dense_mla", "dense", "moe"])
def test_packed_window_loss_equals_each_conversation_alone(tok, kind):
    torch.manual_seed(0)
    vocab = -(-len(tok) // 64) * 64
    model = CausalLM(long_config(vocab, kind)).eval()
    problems = synthetic.generate(synthetic.CorpusConfig(num_train=30, max_digits=2), "train")[:3]
    docs = [
        tok.encode(chat_document(p.question, synthetic.format_text(p)), add_special_tokens=False)
        for p in problems
    ]
    masks = [packing.assistant_mask(d, **special(tok)) for d in docs]
    flag = packing.loss_flag(len(tok))
    window = sum(map(len, docs)) + 5  # three conversations and padding
    [packed], _ = packing.pack(docs, masks, window, tok.pad_token_id, flag, seed=0)
    module = SFTModule(
        model.config.to_dict(), {"betas": (0.9, 0.95)}, {"name": "fp32"}, flag, tok.bos_token_id
    )
    module.model = model
    with torch.no_grad():
        out, targets = module._forward(packed[None])
        n_packed = (targets != IGNORE_INDEX).sum()
        ce_sum, mtp_sum, n_alone = 0.0, 0.0, 0
        for ids, mask in zip(docs, masks, strict=True):
            x = torch.tensor([ids])
            y = x[:, 1:].masked_fill(~torch.tensor([mask])[:, 1:], IGNORE_INDEX)
            alone = model(x[:, :-1], y)
            n = (y != IGNORE_INDEX).sum()
            ce_sum, n_alone = ce_sum + alone.ce * n, n_alone + n
            mtp_sum = mtp_sum + alone.mtp * (y[:, 1:] != IGNORE_INDEX).sum()
    assert n_packed == n_alone
    torch.testing.assert_close(out.ce * n_packed, ce_sum, rtol=1e-5, atol=1e-4)
    n_mtp = (targets[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(out.mtp * n_mtp, mtp_sum, rtol=1e-5, atol=1e-4)
    without_masks = model(*module._inputs_targets(packed[None]))  # attending across: differs
    assert not torch.allclose(without_masks.ce, out.ce, atol=1e-4)


class _Windows(L.LightningDataModule):
    """Fixed windows as a DataModule (batch_size and seq_len as the module reads them)."""

    def __init__(self, windows: list[torch.Tensor]) -> None:
        super().__init__()
        self.windows, self.batch_size, self.seq_len = windows, 1, windows[0].numel() - 1

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.stack(self.windows), batch_size=1)


def test_a_batch_without_supervised_tokens_is_skipped_not_nan(tok, tmp_path):
    model = CausalLM(long_config(-(-len(tok) // 64) * 64, "dense"))
    flag = packing.loss_flag(len(tok))
    p = synthetic.generate(synthetic.CorpusConfig(num_train=5, max_digits=2), "train")[0]
    ids = tok.encode(chat_document(p.question, synthetic.format_text(p)), add_special_tokens=False)
    [window], _ = packing.pack(
        [ids], [packing.assistant_mask(ids, **special(tok))], len(ids), 0, flag, 0
    )
    empty = window % flag  # the same tokens, nothing supervised
    optim = {"betas": (0.9, 0.95), "lr": 1e-3, "warmup_steps": 0, "total_steps": 2}
    module = SFTModule(model.config.to_dict(), optim, {"name": "fp32"}, flag, tok.bos_token_id)
    module.model = model
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fit(windows: list[torch.Tensor]) -> list[str]:
        trainer = L.Trainer(
            max_steps=len(windows),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            default_root_dir=tmp_path,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=_Windows(windows))
        return [str(w.message) for w in caught]

    assert any("without supervised tokens, skipped" in m for m in fit([empty]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update, no NaN
    fit([window])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


# --- the stage end to end --------------------------------------------------------------------


def test_sft_starts_from_the_pretrained_weights_and_learns(make_cfg, pretrained, tmp_path):
    run, before = pretrained
    cfg = make_cfg("stage=sft", "debug=fast", f"model.init_from={run}", "logger=csv")
    after = train(cfg)
    # the first validation is the pretrained model's (not an untrained one's: ~3.7 bits)
    assert after["val/bpb_first"] < 0.9 * before["val/bpb_first"]
    assert after["val/bpb"] < after["val/bpb_first"]
    metrics = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "train/supervised_tokens" in metrics
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


class StopAfterValidation(L.Callback):
    """Stops the fit after the validation (and so the checkpoint) of step `step`, as a crash
    would, with the learning-rate schedule of the whole run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_sft_resume_mid_stage_equals_uninterrupted(make_cfg, pretrained, tmp_path):
    run, _ = pretrained
    base = ("stage=sft", "debug=fast", f"model.init_from={run}", "logger=none", "export.hf=false")
    full = train(make_cfg(*base, run_dir=tmp_path / "full"))
    split = tmp_path / "split"
    train(make_cfg(*base, run_dir=split), callbacks=[StopAfterValidation(5)])
    ckpt = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5
    resumed = train(make_cfg(*base, "ckpt_path=last", run_dir=split))
    assert resumed["val/bpb"] == pytest.approx(full["val/bpb"], abs=1e-6)
    assert resumed["tokens"] == full["tokens"]


def test_sft_trains_moe_under_fp8(make_cfg, pretrained):
    run, _ = pretrained  # debug=fast's default model is the MoE
    cfg = make_cfg(
        "stage=sft",
        "debug=fast",
        f"model.init_from={run}",
        "logger=none",
        "precision=fp8_blockwise",
        "export.hf=false",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        # no warmup: a few steps of the stage's 20-step warmup barely move the weights, and the
        # MoE bias update (which ignores lr) then decides the sign of the change in val/bpb
        "optim.warmup_steps=0",
    )
    metrics = train(cfg)
    assert metrics["val/bpb"] < metrics["val/bpb_first"] and metrics["moe/max_vio"] >= 0
