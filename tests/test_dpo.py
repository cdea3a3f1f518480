"""`stage=dpo`: wrong-by-the-checker rejected solutions, pairs from jsonl, [chosen | rejected]
shards, the loss (ln 2 when policy == reference, its gradient == a finite difference), and the
stage end to end from a pretrained run (resume keeps the reference; MoE + FP8)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter

import pytest
import torch
from litdata import StreamingDataset, TokensLoader

from tinyreason.data import packing, shards, synthetic
from tinyreason.data.pairs import DPOConfig, PairsCorpus, read_pairs, rejected_solution
from tinyreason.data.sources import ReasoningCorpus, solution
from tinyreason.model import debug_config
from tinyreason.tokenizer import EOS, TokenizerConfig, chat_document, train_bpe
from tinyreason.train import train
from tinyreason.training.dpo import DPOModule, dpo_loss

CONFIG = synthetic.CorpusConfig(num_train=60, num_val=20, num_test=0, max_digits=2)


def test_rejected_solutions_are_wrong_and_chosen_right_by_the_checker():
    problems = synthetic.generate(synthetic.CorpusConfig(num_train=900), "train")
    how = Counter()
    for p in problems:
        rejected, name = rejected_solution(p)
        assert synthetic.check(p, solution(p)) and not synthetic.check(p, rejected), p.key
        assert rejected_solution(p) == (rejected, name)  # seeded by the problem
        how[name] += 1
    assert set(how) == {"wrong_operand", "dropped_carry", "off_by_one"}
    kinds = {p.kind for p in problems}
    assert len(kinds) == 9


def test_pairs_from_jsonl_skip_identical_and_name_bad_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "Answer: 4", "rejected": "Answer: 5"},
        {"prompt": "What is 2 + 3?", "chosen": "Answer: 5", "rejected": "Answer: 5"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = read_pairs(str(path))
    assert skipped == 1 and pairs == [
        (chat_document("What is 2 + 2?", "Answer: 4"), chat_document("What is 2 + 2?", "Answer: 5"))
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a prompt / chosen / rejected"):
        read_pairs(str(bad))
    with pytest.raises(ValueError, match="dpo.loss_type"):
        DPOConfig(loss_type="hinge")


@pytest.fixture(scope="module")
def pairs_shards(tmp_path_factory):
    corpus = PairsCorpus(DPOConfig(), ReasoningCorpus(CONFIG))
    root = tmp_path_factory.mktemp("pairs")
    tok = train_bpe(corpus.tokenizer_texts(), TokenizerConfig(vocab_size=400))
    tok.save_pretrained(root / "tok")
    window = 257
    manifest = shards.prepare(
        root,
        corpus.fingerprint,
        "tok",
        root / "tok",
        len(tok),
        corpus.documents,
        window,
        pairs=True,
    )
    return corpus, tok, shards.shard_dir(root, corpus.fingerprint, "tok", window, True), manifest


def test_pair_shards_hold_chosen_then_rejected_with_the_responses_flagged(pairs_shards):
    corpus, tok, root, manifest = pairs_shards
    flag, window = manifest["loss_flag"], 257
    items = StreamingDataset(str(root / "train"), item_loader=TokensLoader(block_size=2 * window))
    expected = {
        (c.split("<|assistant|>")[1], r.split("<|assistant|>")[1]) for c, r in corpus.pairs("train")
    }
    seen = set()
    for item in items:
        ids, supervised = packing.split_flags(item[None], flag)
        sides = []
        for half in (slice(0, window), slice(window, 2 * window)):
            sides.append(tok.decode(ids[0, half][supervised[0, half]].tolist()))
        assert all(s.endswith(EOS) for s in sides)
        seen.add(tuple(sides))
    assert seen <= expected and len(seen) == manifest["splits"]["train"]["windows"] > 0


def test_dpo_loss_is_ln2_at_the_start_and_its_gradient_a_finite_difference(pairs_shards):
    _, tok, root, manifest = pairs_shards
    batch = torch.stack(
        list(StreamingDataset(str(root / "train"), item_loader=TokensLoader(block_size=514)))[:3]
    )
    config = dataclasses.replace(debug_config(vocab_size=448, kind="dense_mla"), max_seq_len=512)
    module = DPOModule(
        config.to_dict(), {"betas": (0.9, 0.95)}, {"name": "fp32"}, manifest["loss_flag"]
    )
    module.configure_model()
    module.model.double()
    module.reference.load_state_dict(module.model.state_dict())
    module.reference.double()
    loss, stats, _, _ = module._loss(batch, "dpo")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert stats["dpo/margin"] == 0
    with torch.no_grad():  # move the policy off the reference
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weight = module.model.lm_head.weight
    loss, _, _, _ = module._loss(batch, "dpo")
    loss.backward()
    h, (i, j) = 1e-6, (int(batch[0, 300].long() % manifest["loss_flag"]), 5)
    with torch.no_grad():
        weight[i, j] += h
        up = module._loss(batch, "dpo")[0]
        weight[i, j] -= 2 * h
        down = module._loss(batch, "dpo")[0]
        weight[i, j] += h
    # rel 1e-4: the RoPE tables stay fp32 inside the float64 model
    assert weight.grad[i, j].item() == pytest.approx(((up - down) / (2 * h)).item(), rel=1e-4)


def test_precomputed_reference_gives_the_in_memory_loss(pairs_shards, tmp_path):
    """dpo.precompute_ref: the saved table of reference log-probs == the reference forward."""
    from tinyreason.data.datamodule import DPODataModule
    from tinyreason.training.dpo import reference_table

    _, _, root, manifest = pairs_shards
    config = dataclasses.replace(debug_config(vocab_size=448, kind="moe"), max_seq_len=512)
    module = DPOModule(
        config.to_dict(), {"betas": (0.9, 0.95)}, {"name": "fp32"}, manifest["loss_flag"]
    )
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():  # the policy moved off its reference
            p.add_(0.05 * torch.randn_like(p))
    datamodule = DPODataModule(str(root), 256, 2)
    batch = next(iter(datamodule.val_dataloader()))
    in_memory = module._loss(batch, "dpo")[0]
    module.ref_table = reference_table(module, datamodule, tmp_path / "ref_logps.pt")
    assert (tmp_path / "ref_logps.pt").is_file()
    torch.testing.assert_close(module._loss(batch, "dpo")[0], in_memory, rtol=1e-5, atol=1e-6)
    assert reference_table(module, datamodule, tmp_path / "ref_logps.pt") == module.ref_table


def test_ipo_and_sigmoid_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * (1.0 + 0.5)))))
    assert (chosen.item(), rejected.item()) == pytest.approx((0.1, -0.05))
    n = torch.tensor([4]), torch.tensor([2])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, "ipo", *n)
    assert ipo.item() == pytest.approx((1.0 / 4 - (-0.5) / 2 - 1 / 0.2) ** 2)


# --- the stage end to end --------------------------------------------------------------------


def test_dpo_stage_runs_and_resumes_with_its_reference(make_cfg, pretrained, tmp_path):
    from test_sft import StopAfterValidation

    run, _ = pretrained
    base = ("stage=dpo", "debug=fast", f"model.init_from={run}", "logger=csv")
    full = train(make_cfg(*base, run_dir=tmp_path / "full"))
    with open(tmp_path / "full" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    first = next(r for r in rows if r.get("val/dpo_loss"))
    assert float(first["val/dpo_loss"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == ref
    header = set(rows[0])
    assert "dpo/accuracy" in header and "dpo/rewards_chosen" in header
    assert (tmp_path / "full" / "hf" / "config.json").is_file()
    split = tmp_path / "split"
    train(make_cfg(*base, "export.hf=false", run_dir=split), callbacks=[StopAfterValidation(5)])
    resumed = train(make_cfg(*base, "export.hf=false", "ckpt_path=last", run_dir=split))
    assert resumed["val/dpo_loss"] == pytest.approx(full["val/dpo_loss"], abs=1e-6)
    assert resumed["val/bpb"] == pytest.approx(full["val/bpb"], abs=1e-6)


def test_dpo_trains_moe_under_fp8(make_cfg, pretrained):
    run, _ = pretrained  # debug=fast's default model is the MoE
    cfg = make_cfg(
        "stage=dpo",
        "debug=fast",
        f"model.init_from={run}",
        "logger=none",
        "precision=fp8_blockwise",
        "export.hf=false",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "eval.at_end=false",
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["val/dpo_loss"]) and metrics["moe/max_vio"] >= 0


def test_dpo_refuses_to_start_from_scratch(make_cfg):
    with pytest.raises(ValueError, match="stage=dpo starts from a trained model"):
        train(make_cfg("stage=dpo", "debug=fast", "logger=none"))
