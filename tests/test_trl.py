"""TRL runs on our exports: `SFTTrainer(assistant_only_loss=True)` trains on the mask our chat
template's generation markers give (equal to ours), and our DPO loss equals `DPOTrainer`'s on the
same pairs and weights (sigmoid and IPO)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tinyreason.checkpoints import export_model
from tinyreason.data import packing, synthetic
from tinyreason.data.sources import solution
from tinyreason.model import CausalLM, debug_config
from tinyreason.model.transformer import IGNORE_INDEX
from tinyreason.tokenizer import (
    BOS,
    EOS,
    ROLES,
    TokenizerConfig,
    chat_document,
    chat_prompt,
    train_bpe,
)
from tinyreason.training.dpo import dpo_loss, response_logps

trl = pytest.importorskip("trl")
PROBLEMS = synthetic.generate(synthetic.CorpusConfig(num_train=120, max_digits=2), "train")


@pytest.fixture(scope="module")
def tok():
    docs = [chat_document(p.question, solution(p)) for p in PROBLEMS]
    return train_bpe(docs, TokenizerConfig(vocab_size=400))


def models(tok, tmp_path, kind="moe") -> tuple[CausalLM, CausalLM, object, object]:
    """(our policy, our reference, the same two as transformers models): the policy is the
    reference with its weights moved, so the log-ratios are not zero."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = dataclasses.replace(debug_config(vocab_size=448, kind=kind), max_seq_len=512)
    reference = CausalLM(config).eval()
    policy = CausalLM(config).eval()
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf = [
        AutoModelForCausalLM.from_pretrained(export_model(m, tok, tmp_path / name)).eval()
        for m, name in ((policy, "policy"), (reference, "reference"))
    ]
    return policy, reference, *hf


def pair_ids(tok, p) -> dict:
    rejected = str(int(p.answer) + 1) if p.answer.lstrip("-").isdigit() else p.answer + "0"
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    return {
        "prompt_ids": encode(chat_prompt(p.question)),
        "chosen_ids": encode(solution(p) + EOS),
        "rejected_ids": encode(solution(p).replace(f": {p.answer}", f": {rejected}") + EOS),
    }


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_our_dpo_loss_equals_trl(tok, tmp_path, loss_type):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    # dense_mla: MoE logits agree to ~1e-7, but a moved router can sit on a top-k tie
    policy, reference, hf_policy, hf_reference = models(tok, tmp_path, kind="dense_mla")
    examples = [pair_ids(tok, p) for p in PROBLEMS[:4]]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    beta = 0.1
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        report_to="none",
        use_cpu=True,
        max_length=512,
        per_device_train_batch_size=4,
    )
    stub = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4)
    trainer = DPOTrainer(
        model=hf_policy, ref_model=hf_reference, args=args, train_dataset=stub, processing_class=tok
    )
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        ids = batch["input_ids"]
        targets = ids[:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, IGNORE_INDEX)
        logps, counts = response_logps(policy(ids[:, :-1]).logits, targets)
        ref, _ = response_logps(reference(ids[:, :-1]).logits, targets)
        (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
        ours, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss_type, nc, nr)
    assert (chosen != rejected).all()  # the policy moved: a loss away from ln 2
    torch.testing.assert_close(ours.mean(), theirs.float(), rtol=1e-4, atol=1e-5)


def test_trl_sft_trainer_trains_on_our_assistant_mask(tok, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    _, _, hf, _ = models(tok, tmp_path, kind="dense_mla")
    rows = [
        {
            "messages": [
                {"role": "user", "content": p.question},
                {"role": "assistant", "content": solution(p)},
            ]
        }
        for p in PROBLEMS[:16]
    ]
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        assistant_only_loss=True,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        max_length=512,
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=hf, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    ids_of = tok.convert_tokens_to_ids
    turn_ids = {ids_of(t) for t in (BOS, ROLES["system"], ROLES["user"])}
    for example in trainer.train_dataset:
        ours = packing.assistant_mask(
            example["input_ids"], ids_of(ROLES["assistant"]), turn_ids, ids_of(EOS)
        )
        theirs = [label != -100 for label in example["labels"]]  # TRL folds the mask in
        assert sum(theirs) > 0 and theirs == ours
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert result.global_step == 3
