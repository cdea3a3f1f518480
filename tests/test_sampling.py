"""The batched sampler: a row decodes the same tokens in a left-padded batch as alone, and the same
as the uncached reference; eos ends its own row only; the preallocated KV cache == the growing one
== the full forward; the sampling filters are the distributions they claim to be."""

from __future__ import annotations

import pytest
import torch

from tinyreason import sampling
from tinyreason.model import CausalLM, debug_config
from tinyreason.model.attention import KVCache
from tinyreason.sampling import SamplingConfig, filter_probs, sample

V = 256
KINDS = ("moe", "dense_mla", "dense")
LENGTHS = (3, 11, 6, 1, 17)  # different lengths: every row but the longest is left-padded
NEW = 14
SAMPLED = dict(temperature=1.0, top_p=0.9, top_k=50)


@pytest.fixture(scope="module", params=KINDS)
def model(request) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(debug_config(V, request.param)).float().eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    # ids from 3 up: 0 is the pad id of the batch, and eos is chosen among generated tokens
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in LENGTHS]


def one_by_one(model, prompts, config, **kw) -> list[list[int]]:
    """Each prompt alone, with the seed row i of a batch would get (config.seed + i)."""
    return [
        sample(model, [p], config, seeds=[config.seed + i], **kw)[0] for i, p in enumerate(prompts)
    ]


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_batched_equals_one_by_one_equals_uncached_reference(model, prompts, mode):
    config = SamplingConfig(NEW, seed=5, **(SAMPLED if mode == "sampled" else {}))
    batched = sample(model, prompts, config, eos_token_id=None)
    assert [len(r) for r in batched] == [NEW] * len(prompts)  # no eos: every row runs to the end
    alone = one_by_one(model, prompts, config, eos_token_id=None)
    reference = sample(model, prompts, config, eos_token_id=None, use_cache=False)
    assert batched == alone == reference
    # the pad id is invisible (pad keys are masked), and so is the order of the other rows
    assert sample(model, prompts, config, eos_token_id=None, pad_token_id=V - 1) == batched
    order = [4, 2, 0, 3, 1]
    shuffled = sample(
        model,
        [prompts[i] for i in order],
        config,
        eos_token_id=None,
        seeds=[config.seed + i for i in order],
    )
    assert shuffled == [batched[i] for i in order]
    if mode == "sampled":  # the draws are seeded: another seed gives other tokens
        other = sample(model, prompts, SamplingConfig(NEW, seed=6, **SAMPLED), eos_token_id=None)
        assert other != batched
        greedy = sample(model, prompts, SamplingConfig(NEW), eos_token_id=None)
        assert batched != greedy


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_a_row_stops_at_its_eos_and_the_others_continue(model, prompts, mode):
    config = SamplingConfig(NEW, seed=3, **(SAMPLED if mode == "sampled" else {}))
    full = sample(model, prompts, config, eos_token_id=None)
    # an eos that row 0 emits mid-way and that some other row never emits
    others = [set(r) for r in full[1:]]
    candidates = [t for t in full[0][2:-2] if any(t not in s for s in others)]
    assert candidates, f"no usable eos in {full}"
    eos = candidates[0]
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in full]
    assert expected[0][-1] == eos and len(expected[0]) < NEW
    assert any(len(r) == NEW for r in expected), "some row must run on after row 0 stopped"
    stopped = sample(model, prompts, config, eos_token_id=eos)
    assert stopped == expected
    assert stopped == one_by_one(model, prompts, config, eos_token_id=eos)
    assert stopped == sample(model, prompts, config, eos_token_id=eos, use_cache=False)
    # eos as the very first token: that row is one token long, the others are as before
    first = full[1][0]
    early = sample(model, prompts, config, eos_token_id=first)
    assert early[1] == [first]
    assert early == [r[: r.index(first) + 1] if first in r else r for r in full]


def test_top_k_1_is_greedy_and_a_tiny_nucleus_is_greedy(model, prompts):
    greedy = sample(model, prompts, SamplingConfig(NEW), eos_token_id=None)
    for seed in (0, 9):
        top1 = SamplingConfig(NEW, temperature=1.5, top_k=1, seed=seed)
        assert sample(model, prompts, top1, eos_token_id=None) == greedy
        nucleus = SamplingConfig(NEW, temperature=1.5, top_p=1e-6, seed=seed)
        assert sample(model, prompts, nucleus, eos_token_id=None) == greedy


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_with_capacity_equals_growing_cache_and_full_forward(kind):
    torch.manual_seed(0)
    model = CausalLM(debug_config(V, kind)).float().eval()
    ids = torch.randint(0, V, (3, 16))
    spans = [(0, 7), (7, 8), (8, 12), (12, 13), (13, 14), (14, 16)]
    with torch.no_grad():
        full = model(ids).logits
        outs = {}
        for name, cache in (
            ("growing", KVCache(len(model.layers))),
            ("capacity", KVCache(len(model.layers), capacity=20)),
        ):
            outs[name] = torch.cat([model(ids[:, a:b], cache=cache).logits for a, b in spans], 1)
            assert cache.length == 16
        torch.testing.assert_close(outs["capacity"], outs["growing"], atol=1e-6, rtol=0)
        torch.testing.assert_close(outs["capacity"], full, atol=1e-5, rtol=0)

        # finished rows leave: selecting rows keeps exactly their cache (== those rows alone)
        cache = KVCache(len(model.layers), capacity=20)
        model(ids[:, :12], cache=cache)
        cache.select(torch.tensor([2, 0]))
        tail = model(ids[[2, 0], 12:], cache=cache).logits
        torch.testing.assert_close(tail, full[[2, 0], 12:], atol=1e-5, rtol=0)

        small = KVCache(len(model.layers), capacity=10)
        model(ids[:, :8], cache=small)
        with pytest.raises(ValueError, match="capacity 10 exceeded"):
            model(ids[:, 8:11], cache=small)


def test_prompt_plus_new_tokens_beyond_the_window_raises(model):
    limit = model.config.max_seq_len  # 128
    prompt = list(range(3, 103))  # 100 tokens
    # the last new token is never fed back: 100 + 29 tokens need 128 positions, which fit
    fits = SamplingConfig(limit - len(prompt) + 1)
    out = sample(model, [prompt, prompt[:5]], fits, eos_token_id=None)
    assert [len(r) for r in out] == [29, 29]
    assert out == sample(model, [prompt, prompt[:5]], fits, eos_token_id=None, use_cache=False)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="exceed the model's max_seq_len=128"):
            sample(
                model,
                [prompt[:5], prompt],
                SamplingConfig(limit - len(prompt) + 2),
                eos_token_id=None,
                use_cache=use_cache,
            )
    with pytest.raises(ValueError, match="exceed the model's max_seq_len=128"):
        sample(model, [list(range(3, 3 + limit + 1))], SamplingConfig(1), eos_token_id=None)
    with pytest.raises(ValueError, match="at least one prompt"):
        sample(model, [], SamplingConfig(4), eos_token_id=None)
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[5, 6], []], SamplingConfig(4), eos_token_id=None)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_the_edges():
    assert SamplingConfig(1, temperature=0.0).greedy
    assert not SamplingConfig(1, temperature=1e-3, top_p=1.0, top_k=0).greedy


# probabilities 0.5, 0.3, 0.15, 0.05 (sum 1) as logits of one row
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])


def test_filter_probs_top_k_and_nucleus_keep_the_right_tokens():
    logits = PROBS.log()[None]
    plain = filter_probs(logits, SamplingConfig(1, temperature=1.0))
    torch.testing.assert_close(plain[0], PROBS)
    # top_k=2 keeps the two most likely (0.5, 0.3), renormalised
    top2 = filter_probs(logits, SamplingConfig(1, temperature=1.0, top_k=2))
    torch.testing.assert_close(top2[0], torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)
    # the nucleus: the fewest tokens whose mass reaches top_p (0.5 + 0.3 < 0.9 <= 0.95)
    nucleus = filter_probs(logits, SamplingConfig(1, temperature=1.0, top_p=0.9))
    torch.testing.assert_close(nucleus[0], torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95)
    half = filter_probs(logits, SamplingConfig(1, temperature=1.0, top_p=0.4))
    torch.testing.assert_close(half[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # temperature 2 = softmax(log p / 2) = sqrt(p), normalised
    hot = filter_probs(logits, SamplingConfig(1, temperature=2.0))
    torch.testing.assert_close(hot[0], PROBS.sqrt() / PROBS.sqrt().sum())


def test_draws_follow_the_filtered_distribution():
    """Many independent one-row draws (one generator each) match the nucleus probabilities."""
    from tinyreason.sampling import _pick

    n = 6000
    logits = PROBS.log()[None].expand(n, -1)
    config = SamplingConfig(1, temperature=1.0, top_p=0.9)
    generators = [torch.Generator().manual_seed(s) for s in range(n)]
    tokens = _pick(logits, config, generators)
    freq = torch.bincount(tokens, minlength=4).float() / n
    expected = torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95
    assert freq[2] == 0  # outside the nucleus: never drawn
    torch.testing.assert_close(freq, expected, atol=0.025, rtol=0)  # ~4 standard errors


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_continuous_batching_equals_one_batch_and_one_by_one(model, prompts, mode):
    """Two slots for five prompts (rows ending at eos at different steps, so slots are refilled
    at different times and the batch then shrinks): the same tokens as every prompt in one batch
    and as each alone; progress counts every row once."""
    config = SamplingConfig(NEW, seed=3, **(SAMPLED if mode == "sampled" else {}))
    full = sample(model, prompts, config, eos_token_id=None)
    eos = next(t for t in full[0][1:-1] if any(t not in r for r in full[1:]))
    whole = sample(model, prompts, config, eos_token_id=eos)
    assert len({len(r) for r in whole}) > 1  # rows end at different steps
    done: list[int] = []
    for slots in (1, 2, 4):
        slotted = sample(
            model, prompts, config, eos_token_id=eos, batch_size=slots, progress=done.append
        )
        assert slotted == whole
        assert sum(done) == len(prompts)
        done.clear()
    assert whole == one_by_one(model, prompts, config, eos_token_id=eos)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        sample(model, prompts, config, eos_token_id=eos, batch_size=0)


def test_fit_window_writes_what_fits_in_the_window(model):
    """`fit_window`: a prompt that leaves fewer than max_new_tokens positions writes exactly
    what fits (its last token never fed back), the others their max_new_tokens; the same as
    each row alone with its own budget."""
    window = model.config.max_seq_len
    long, short = list(range(3, 3 + window - 5)), [5, 6, 7]
    config = SamplingConfig(10)
    out = sample(model, [long, short], config, eos_token_id=None, fit_window=True, batch_size=1)
    assert [len(r) for r in out] == [6, 10]
    assert out[0] == sample(model, [long], SamplingConfig(6), eos_token_id=None)[0]
    assert out[1] == sample(model, [short], config, eos_token_id=None)[0]
    with pytest.raises(ValueError, match="fills the window"):
        sample(model, [list(range(window + 1))], config, eos_token_id=None, fit_window=True)


@pytest.fixture
def fresh_compile():
    """A fresh compiled step (and dynamo state) for the test, and after it."""
    sampling._COMPILED.clear()
    torch._dynamo.reset()
    yield
    sampling._COMPILED.clear()
    torch._dynamo.reset()


def test_compiled_decode_step_gives_the_eager_tokens(prompts, fresh_compile, caplog):
    """The decode step through torch.compile (inductor's C++ kernels), on the DeepSeek-V3 layout
    (MLA's absorbed attention, the MoE's dense decode path): the same greedy tokens as eager
    decoding on every row, twice (the compiled step is reused), and no fallback warning. (One
    batch shape, so one compile: the full evaluation's tokens are compared in `bench generate`.)"""
    torch.manual_seed(0)
    model = CausalLM(debug_config(V, "moe")).float().eval()
    config = SamplingConfig(NEW)
    eager = sample(model, prompts, config, eos_token_id=None)
    graphs = torch._dynamo.utils.counters["stats"]
    with caplog.at_level("WARNING", logger="tinyreason.sampling"):
        assert sample(model, prompts, config, eos_token_id=None, compile=True) == eager
        compiled = graphs["unique_graphs"]
        assert compiled >= 1
        sample(model, prompts[:3], config, eos_token_id=None)  # eager calls in between
        assert sample(model, prompts, config, eos_token_id=None, compile=True) == eager
        assert graphs["unique_graphs"] == compiled  # the compiled step was reused as it was
    assert sampling._COMPILED["cpu"] is not None
    assert not [r for r in caplog.records if "without torch.compile" in r.message]


def test_compile_unavailable_falls_back_to_eager_and_says_so_once(prompts, fresh_compile, caplog):
    """No C++ compiler for inductor (a path that does not exist, no cached kernels): decoding
    falls back to the eager step, gives its tokens, and warns once."""
    from torch._inductor import config as inductor

    torch.manual_seed(0)
    model = CausalLM(debug_config(V, "dense")).float().eval()
    config = SamplingConfig(6)
    eager = sample(model, prompts, config, eos_token_id=None)
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
    with inductor.patch(no_compiler), caplog.at_level("WARNING", logger="tinyreason.sampling"):
        first = sample(model, prompts, config, eos_token_id=None, compile=True)
        second = sample(model, prompts, config, eos_token_id=None, compile=True)
    assert first == second == eager
    warnings = [r for r in caplog.records if "without torch.compile" in r.message]
    assert len(warnings) == 1


def test_progress_bar_logs_each_tenth_when_not_a_terminal(caplog):
    """Without a terminal (a log file, CI) progress is a log line per tenth of the rows, the
    last at the total; without a label, no callback at all."""
    with caplog.at_level("INFO", logger="tinyreason.sampling"):
        with sampling.progress_bar(20, "test") as done:
            for _ in range(20):
                done(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[-1].startswith("test: 20 / 20 done")
    with sampling.progress_bar(20, None) as done:
        assert done is None
