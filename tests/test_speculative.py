"""MTP self-speculative decoding: on a model trained until its MTP head drafts, greedy output ==
plain greedy decoding token for token (batched, KV-cached and the uncached reference, prompts of
different lengths, rows ending at eos at different times); drafts that are always wrong change
nothing; the incremental MTP block == the training forward's, and a masked hole slot is invisible
to both caches; a model without MTP, and sampling, are refused; `eval.speculative` gives the
same completions and fails before any work without MTP."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tinyreason.data import synthetic
from tinyreason.data.sources import solution
from tinyreason.data.synthetic import CorpusConfig
from tinyreason.evaluation import EvalConfig, EvalOptions, corpus_items, evaluate_items
from tinyreason.model import CausalLM, MTPConfig, debug_config
from tinyreason.model.attention import KVCache, LayerCache
from tinyreason.sampling import SamplingConfig, prompt_ids, sample
from tinyreason.speculative import SpeculativeStats, check_speculative, speculative_sample
from tinyreason.tokenizer import TokenizerConfig, chat_document, model_vocab_size, train_bpe

# the column format: its 25-step models draft part of their tokens right and end rows at
# different steps, what these tests need (the decoding does not depend on the format)
CORPUS = CorpusConfig(
    kinds=("add", "compare"),
    langs=("en",),
    max_digits=2,
    num_train=64,
    num_val=0,
    num_test=8,
    format="column",
)
NEW = 40
KINDS = ("moe", "dense_mla", "dense")


@pytest.fixture(scope="module")
def corpus():
    """A BPE tokenizer and windows (inputs, targets) of the corpus' training conversations, and
    the chat prompts of the 8 held-out problems (different lengths)."""
    docs = [chat_document(p.question, solution(p)) for p in synthetic.generate(CORPUS, "train")]
    tokenizer = train_bpe(docs, TokenizerConfig(vocab_size=300))
    width = debug_config().max_seq_len
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"][: width + 1] for d in docs]
    inputs = torch.full((len(ids), width), tokenizer.pad_token_id)
    targets = torch.full((len(ids), width), -100)
    for i, seq in enumerate(ids):
        inputs[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets[i, : len(seq) - 1] = torch.tensor(seq[1:])
    items = corpus_items(CORPUS, "test")
    prompts = [prompt_ids(tokenizer, it.question, chat=True)[0].tolist() for it in items]
    assert len({len(p) for p in prompts}) > 2
    return tokenizer, inputs, targets, prompts, items


def train(corpus, kind: str, steps: int = 25) -> CausalLM:
    """A debug model of `kind` (MTP depth 1) after `steps` AdamW steps (fp32, seeded) on the
    corpus' conversations: its MTP head drafts part of its greedy tokens right."""
    tokenizer, inputs, targets, _, _ = corpus
    torch.manual_seed(0)
    model = CausalLM(debug_config(model_vocab_size(tokenizer), kind)).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (8,), generator=g)
        loss = model(inputs[batch], targets[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(corpus):
    """The DeepSeek-V3 layout (MLA + DeepSeekMoE + MTP), trained; tokenizer, prompts, items."""
    tokenizer, _, _, prompts, items = corpus
    return train(corpus, "moe"), tokenizer, prompts, items


def test_speculative_equals_greedy_batched_cached_and_uncached(trained):
    model, _, prompts, _ = trained
    config = SamplingConfig(NEW)
    greedy = sample(model, prompts, config, eos_token_id=None)
    stats = SpeculativeStats()
    assert speculative_sample(model, prompts, config, eos_token_id=None, stats=stats) == greedy
    # the head drafts, not always right: rows of one batch accept and reject in the same step
    assert 0.2 < stats.acceptance_rate < 0.95, stats
    assert stats.new_tokens == len(prompts) * NEW
    # every main forward of a row yields its own token, plus the draft when it is accepted
    assert stats.new_tokens == stats.row_forwards + stats.accepted
    assert stats.row_forwards < stats.new_tokens
    # the uncached reference (each row alone, everything recomputed) agrees, counts included
    few, short = prompts[:3], SamplingConfig(16)
    cached, uncached = SpeculativeStats(), SpeculativeStats()
    expected = sample(model, few, short, eos_token_id=None)
    assert speculative_sample(model, few, short, eos_token_id=None, stats=cached) == expected
    out = speculative_sample(model, few, short, eos_token_id=None, use_cache=False, stats=uncached)
    assert out == expected and uncached == cached
    # the pad id is invisible (pad keys are masked)
    assert speculative_sample(model, few, short, eos_token_id=None, pad_token_id=7) == expected


def test_rows_ending_at_eos_at_different_times(trained):
    model, _, prompts, _ = trained
    config = SamplingConfig(NEW)
    full = sample(model, prompts, config, eos_token_id=None)
    # the eos that ends the rows at the most different steps (a row without it runs to NEW)
    tokens = sorted({t for r in full for t in r})
    eos = max(tokens, key=lambda t: len({r.index(t) if t in r else NEW for r in full}))
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in full]
    assert len({len(r) for r in expected}) > 3 and any(len(r) == NEW for r in expected)
    assert sample(model, prompts, config, eos_token_id=eos) == expected
    stats = SpeculativeStats()
    assert speculative_sample(model, prompts, config, eos_token_id=eos, stats=stats) == expected
    assert stats.new_tokens == sum(map(len, expected)) and stats.accepted > 0
    few = prompts[:4]
    uncached = speculative_sample(model, few, config, eos_token_id=eos, use_cache=False)
    assert uncached == expected[:4]
    # eos as the very first token (every row starts with the same one): one token each
    assert {r[0] for r in full} == {full[0][0]}
    first = speculative_sample(model, prompts, config, eos_token_id=full[0][0])
    assert first == [[full[0][0]]] * len(prompts)


def test_drafts_that_are_always_wrong_change_nothing(trained):
    """A zero output norm makes every MTP logit 0: each draft is token 0 (the pad id, which the
    model never writes), so every draft is rejected and every step keeps one token."""
    model, _, prompts, _ = trained
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.mtp[0].norm.weight.zero_()
    config = SamplingConfig(24)
    greedy = sample(model, prompts, config, eos_token_id=None)
    assert not any(0 in r for r in greedy)  # the premise: no draft can be right
    stats = SpeculativeStats()
    assert speculative_sample(wrong, prompts, config, eos_token_id=None, stats=stats) == greedy
    assert stats.accepted == 0 and stats.drafted > 0 and stats.tokens_per_forward == 1.0


def test_a_trained_gqa_model_drafts_and_decodes_the_greedy_tokens(corpus):
    """GQA (Qwen3-like) with MTP works the same way: its drafts are accepted in part."""
    _, _, _, prompts, _ = corpus
    model = train(corpus, "dense")
    config = SamplingConfig(24)
    full = sample(model, prompts, config, eos_token_id=None)
    eos = full[0][len(full[0]) // 2]
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in full]
    assert sample(model, prompts, config, eos_token_id=eos) == expected
    stats = SpeculativeStats()
    assert speculative_sample(model, prompts, config, eos_token_id=eos, stats=stats) == expected
    assert 0 < stats.acceptance_rate <= 1 and stats.tokens_per_forward > 1


@pytest.mark.parametrize("kind", KINDS)
def test_random_models_of_every_attention_decode_the_greedy_tokens(kind):
    """MLA and GQA alike; a random MTP head drafts (almost) only wrong tokens."""
    torch.manual_seed(0)
    model = CausalLM(debug_config(256, kind)).float().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    config = SamplingConfig(12)
    greedy = sample(model, prompts, config, eos_token_id=None)
    assert speculative_sample(model, prompts, config, eos_token_id=None) == greedy
    uncached = speculative_sample(model, prompts[:2], config, eos_token_id=None, use_cache=False)
    assert uncached == greedy[:2]
    eos = greedy[0][4]
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in greedy]
    assert speculative_sample(model, prompts, config, eos_token_id=eos) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_mtp_and_holes_equal_the_training_forward(kind):
    """The MTP block over its own cache, chunk by chunk, == `_mtp_states` of the training forward
    (position i over positions <= i); a slot masked out as a hole (another position's junk) is
    invisible to later queries of the main model and of the MTP block alike."""
    torch.manual_seed(0)
    model = CausalLM(debug_config(256, kind)).float().eval()
    ids = torch.randint(0, 256, (2, 14))
    with torch.no_grad():
        full = model(ids, ids)
        expected_BSV = full.mtp_logits[0]  # [2, 13, V]: position i predicts ids[i + 2]
        cache, parts = LayerCache(), []
        for a, b in [(0, 6), (6, 7), (7, 10), (10, 13)]:
            h1 = model.mtp_hidden(full.hidden[:, a:b], ids[:, a + 1 : b + 1], cache)
            parts.append(model.lm_head(h1))
        torch.testing.assert_close(torch.cat(parts, 1), expected_BSV, atol=1e-5, rtol=0)

        # slots: positions 0..7, then a junk slot at position 8 (masked), then positions 8..9
        junk = torch.randint(0, 256, (2, 1))
        slots = torch.cat([ids[:, :8], junk, ids[:, 8:10]], 1)
        positions = torch.tensor([[*range(9), 8, 9]] * 2)
        keys = torch.ones(2, 11, dtype=torch.bool)
        keys[:, 8] = False
        mask = torch.ones(11, 11, dtype=torch.bool).tril() & (
            keys[:, None, :] | torch.eye(11, dtype=torch.bool)
        )
        main_cache, mtp_cache, logits, h1s = KVCache(len(model.layers)), LayerCache(), [], []
        hidden = []
        for a, b in [(0, 8), (8, 10), (10, 11)]:
            m = mask[:, None, a:b, :b]
            out = model(
                slots[:, a:b], cache=main_cache, position_ids=positions[:, a:b], attn_mask=m
            )
            logits.append(out.logits)
            hidden.append(out.hidden)
        logits, hidden = torch.cat(logits, 1), torch.cat(hidden, 1)
        real = [*range(8), 9, 10]  # the slots of positions 0..9
        torch.testing.assert_close(logits[:, real], full.logits[:, :10], atol=1e-5, rtol=0)
        after = torch.cat(
            [slots[:, 1:8], ids[:, 8:9], junk, ids[:, 9:11]], 1
        )  # token after each slot
        for a, b in [(0, 8), (8, 10), (10, 11)]:
            m = mask[:, None, a:b, :b]
            h1 = model.mtp_hidden(hidden[:, a:b], after[:, a:b], mtp_cache, positions[:, a:b], m)
            h1s.append(h1)
        mtp_logits = model.lm_head(torch.cat(h1s, 1))
        torch.testing.assert_close(mtp_logits[:, real], expected_BSV[:, :10], atol=1e-5, rtol=0)


def test_speculative_sampling_batched_cached_and_one_by_one_equal_the_reference(trained):
    """At temperature > 0 each row draws from its own generator in the same order on every path:
    the batched KV-cached decoder, each row alone, and the uncached reference give the same
    tokens, and drafts are both accepted and rejected (both branches of the rule run)."""
    model, _, prompts, _ = trained
    config = SamplingConfig(16, temperature=1.0, top_p=0.95, seed=3)
    few = prompts[:4]
    cached, uncached = SpeculativeStats(), SpeculativeStats()
    out = speculative_sample(model, few, config, eos_token_id=None, stats=cached)
    reference = speculative_sample(
        model, few, config, eos_token_id=None, use_cache=False, stats=uncached
    )
    assert out == reference and cached == uncached
    alone = [
        speculative_sample(model, [p], config, eos_token_id=None, seeds=[3 + i])[0]
        for i, p in enumerate(few)
    ]
    assert alone == out
    assert 0.1 < cached.acceptance_rate < 0.95, cached
    assert out != speculative_sample(
        model, few, dataclasses.replace(config, seed=4), eos_token_id=None
    )


def _homogeneity_p(a: list[int], b: list[int]) -> float:
    """p-value of the chi-square test that two samples of tokens share one distribution
    (tokens seen fewer than 10 times in both together pooled into one category)."""
    from scipy.stats import chi2_contingency

    counts = torch.zeros(2, max(a + b) + 1)
    for row, sample_ in enumerate((a, b)):
        counts[row].index_add_(0, torch.tensor(sample_), torch.ones(len(sample_)))
    common = counts.sum(0) >= 10
    table = torch.cat([counts[:, common], counts[:, ~common].sum(1, keepdim=True)], 1)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table.numpy()).pvalue)


def test_speculative_sampling_keeps_the_model_distribution(trained):
    """Leviathan et al.'s rule keeps the target distribution: over 1,500 seeded rows of one
    prompt, the token frequencies at each of 6 positions of speculative sampling and of plain
    sampling (other seeds) pass a chi-square homogeneity test at p > 0.001; the same test tells
    plain sampling at temperature 1 from temperature 1.5 (p < 0.001: it has the power to see a
    wrong distribution). Fixed seeds: the test is deterministic."""
    model, _, prompts, _ = trained
    n, new = 1500, 6
    config = SamplingConfig(new, temperature=1.0)
    rows = [prompts[0]] * n
    plain = sample(model, rows, config, eos_token_id=None, seeds=list(range(n)))
    stats = SpeculativeStats()
    spec = speculative_sample(
        model, rows, config, eos_token_id=None, seeds=list(range(n, 2 * n)), stats=stats
    )
    hotter = sample(
        model,
        rows,
        dataclasses.replace(config, temperature=1.5),
        eos_token_id=None,
        seeds=list(range(n, 2 * n)),
    )
    assert 0.1 < stats.acceptance_rate < 0.95, stats  # both the accept and the residual branch
    same = [_homogeneity_p([r[j] for r in plain], [r[j] for r in spec]) for j in range(new)]
    assert min(same) > 1e-3, same
    other = [_homogeneity_p([r[j] for r in plain], [r[j] for r in hotter]) for j in range(new)]
    assert min(other) < 1e-3, other


def test_refuses_a_model_without_mtp_and_prompts_beyond_the_window():
    no_mtp = dataclasses.replace(debug_config(64, "dense"), mtp=MTPConfig(depth=0))
    model = CausalLM(no_mtp).eval()
    with pytest.raises(ValueError, match=r"model.mtp.depth >= 1 \(MLA or GQA\)"):
        speculative_sample(model, [[3, 4]], SamplingConfig(4), eos_token_id=None)
    with pytest.raises(ValueError, match="mtp.depth=0"):
        check_speculative(no_mtp)
    with_mtp = CausalLM(debug_config(64, "dense")).eval()
    with pytest.raises(ValueError, match="max_seq_len=128"):
        speculative_sample(with_mtp, [list(range(3, 103))], SamplingConfig(30), eos_token_id=None)
    # decoding with holes: the window bounds the positions, not the cache slots
    one, cache = torch.zeros(1, 1, dtype=torch.long), KVCache(len(with_mtp.layers))
    with pytest.raises(ValueError, match="position_ids reach 128 >= max_seq_len 128"):
        with_mtp(one, cache=cache, position_ids=torch.tensor([[128]]))


def test_eval_speculative_gives_the_same_completions(trained):
    model, tokenizer, _, items = trained
    items, options = items[:5], EvalOptions(max_new_tokens=32, batch_size=3)
    plain, plain_records = evaluate_items(model, tokenizer, items, options)
    fast = dataclasses.replace(options, speculative=True)
    drafted, drafted_records = evaluate_items(model, tokenizer, items, fast)
    assert drafted_records == plain_records
    assert drafted["exact_match"] == plain["exact_match"]
    assert 0 < drafted["speculative"]["acceptance_rate"] <= 1
    new_tokens = drafted["speculative"]["new_tokens"]
    assert new_tokens == drafted["mean_completion_tokens"] * len(items)
    assert "speculative" not in plain


def test_eval_speculative_without_mtp_fails_before_any_work(trained, make_cfg):
    from tinyreason.training.run_config import RunConfig

    _, tokenizer, _, items = trained
    no_mtp = dataclasses.replace(
        debug_config(model_vocab_size(tokenizer), "moe"), mtp=MTPConfig(depth=0)
    )
    model = CausalLM(no_mtp).eval()
    with pytest.raises(ValueError, match="mtp.depth"):
        evaluate_items(model, tokenizer, items, EvalOptions(speculative=True))
    with pytest.raises(ValueError, match="mtp.depth"):
        EvalConfig.from_dict({"speculative": True}, no_mtp)
    assert EvalConfig.from_dict({"speculative": True}).options.speculative  # model unknown yet
    with pytest.raises(ValueError, match="eval.speculative must be true or false"):
        EvalOptions(speculative="yes")
    # train: refused while the config is typed, before a tokenizer or a shard is built
    with pytest.raises(ValueError, match="mtp.depth"):
        RunConfig.from_hydra(make_cfg("eval.speculative=true"))  # the default MoE has no MTP
    RunConfig.from_hydra(make_cfg("eval.speculative=true", "model.mtp.depth=1"))
