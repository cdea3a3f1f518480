"""Activation checkpointing and torch.compile per block (`tinyreason.training.memory`): the same
losses, gradients and MoE token counts as eager over a few AdamW steps, unchanged parameter and
state_dict names, KV-cache decoding untouched, no recompiles after the first two steps; and the
`bench memory` CLI.

Tolerances: checkpointing recomputes the same kernels on the same shapes, so it is bit-exact
(atol = rtol = 0). Compile uses the "aot_eager" backend here (dynamo's capture, graph breaks and
AOT autograd's forward/backward graphs, without inductor's C++ code generation, which takes
minutes on this machine): 1e-6. Inductor itself (the default backend) is checked by the bench's
loss column (measured: gradients within 2e-7 of eager on the debug MoE model).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tinyreason.model import CausalLM, debug_config
from tinyreason.model.attention import KVCache
from tinyreason.model.transformer import Block
from tinyreason.training import memory

V, B, S, STEPS = 512, 2, 32, 3


def _model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(debug_config(V, "moe"))  # MLA + MoE, one dense layer, MTP depth 1


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (B, S + 1), generator=gen) for _ in range(STEPS)]


def _train(model: CausalLM) -> list[dict]:
    """Per AdamW step: the loss, every gradient and the MoE counts before the bias update."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = []
    for x in _batches():
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        steps.append(
            dict(
                loss=out.loss.detach(),
                grads={n: p.grad.clone() for n, p in model.named_parameters()},
                counts=[m.tokens_per_expert.clone() for m in model.moe_layers()],
                graphs=counters["stats"]["unique_graphs"],  # dynamo graphs built so far
            )
        )
        optimizer.step()
        optimizer.zero_grad()
        model.update_moe_biases(progress=0.0)  # gamma > 0: the bias, so routing, changes
    return steps


def _assert_same(steps: list[dict], ref: list[dict], atol: float) -> None:
    for got, want in zip(steps, ref, strict=True):
        torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=atol)
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=atol, msg=name)
        for counts, want_counts in zip(got["counts"], want["counts"], strict=True):
            assert torch.equal(counts, want_counts)


@pytest.fixture(scope="module")
def eager_steps() -> list[dict]:
    return _train(_model())


def _names(model: CausalLM) -> tuple[list[str], ...]:
    return (
        list(model.state_dict()),
        [n for n, _ in model.named_parameters()],
        [n for n, _ in model.named_modules()],
    )


@pytest.mark.parametrize(
    ("mode", "compile"), [("full", False), ("selective", False), ("full", True)]
)
def test_names_unchanged(mode: str, compile: bool) -> None:
    model = _model()
    before = _names(model)
    memory.apply(model, mode, compile)
    assert _names(model) == before
    blocks = [*model.layers, model.mtp[0].block]
    assert all(type(b) is Block and isinstance(b.forward, memory.BlockForward) for b in blocks)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_equals_eager(mode: str, eager_steps) -> None:
    model = _model()
    memory.apply_activation_checkpointing(model, mode)
    moe = model.layers[1].mlp
    calls = []
    moe.register_forward_pre_hook(lambda *_: calls.append(1))
    steps = _train(model)
    assert len(calls) == 2 * STEPS  # the recompute in backward ran MoE.forward again ..
    _assert_same(steps, eager_steps, atol=0)  # .. and its counts were not added twice


def test_selective_saves_gemm_and_attention_outputs_only() -> None:
    ctx = None
    mm = torch.ops.aten.mm.default
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    rms = torch.ops.aten._fused_rms_norm.default
    save, recompute = memory.CheckpointPolicy.MUST_SAVE, memory.CheckpointPolicy.PREFER_RECOMPUTE
    assert memory._policy(ctx, mm) == memory._policy(ctx, sdpa) == save
    assert memory._policy(ctx, torch.ops.mkldnn._linear_pointwise.default) == save
    assert memory._policy(ctx, torch.ops.aten.silu.default) == memory._policy(ctx, rms) == recompute


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_decoding_and_no_grad_run_as_written(mode: str) -> None:
    """Decoding with grad enabled (the cache is appended to in forward): the same logits as the
    plain model, token by token; a no-grad forward too; nothing is compiled for either."""
    ref, model = _model(), _model()
    memory.apply(model, mode, compile=False)
    memory.compile_blocks(model, backend="aot_eager")  # compiled for training only
    graphs = counters["stats"]["unique_graphs"]
    ids = _batches()[0][:, :8]
    caches = KVCache(len(ref.layers)), KVCache(len(model.layers))
    for start, end in ((0, 5), (5, 6), (6, 7), (7, 8)):  # a prefill, then one token at a time
        want, got = (
            m(ids[:, start:end], cache=c).logits for m, c in zip((ref, model), caches, strict=True)
        )
        assert torch.equal(got, want)
    with torch.no_grad():  # validation: as written too
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert caches[1].length == 8 and counters["stats"]["unique_graphs"] == graphs


def test_compile_equals_eager(eager_steps) -> None:
    """Compiled blocks, without and with full checkpointing (which then recomputes the compiled
    forward): the eager steps within 1e-6, the counts exact. For fixed shapes the graphs are all
    built in the first two steps (the dense block's dynamo cache entry is found in step 2 only:
    after a graph break dynamo tries the newest entry first), and the second model reuses them."""
    torch._dynamo.reset()
    counters.clear()
    models = [_model(), _model()]
    memory.apply(models[1], "full", compile=False)
    graphs = []
    for model in models:
        memory.compile_blocks(model, backend="aot_eager")
        steps = _train(model)
        _assert_same(steps, eager_steps, atol=1e-6)
        graphs += [step["graphs"] for step in steps]
    assert graphs[0] > 0 and set(graphs[1:]) == {graphs[1]}, graphs


def test_linear_pointwise_decomposition_equals_onednn() -> None:
    """The inductor backend replaces oneDNN's linear (which inductor lowers only when freezing)."""
    x, w = torch.randn(2, 70, 48), torch.randn(24, 48)
    want = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    torch.testing.assert_close(memory._linear_pointwise(x, w, None, "none", [], ""), want)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="none.*full.*selective"):
        memory.apply_activation_checkpointing(_model(), "some")


def test_bench_memory_cli(cache_dir, capsys) -> None:
    """`python -m tinyreason.bench memory` at a tiny size (none and full, compile off, to stay
    cheap): a row each, the same losses, and full checkpointing at a lower peak (measured 0.44x)."""
    from tinyreason.bench.memory import main

    sizes = ["debug=fast", "data.batch_size=2", "data.seq_len=128"]
    runs = ["--steps", "1", "--repeats", "1", "--warmup", "1"]
    main([*sizes, "--checkpointing", "none,full", "--compile", "off", *runs])
    text = capsys.readouterr().out
    row = r"^\| (\w+) \| off \| [\d,]+ \| [\d.]+x \| [\d,.]+ \| ([\d.]+)x \| ([\d.e+-]+) \| 0 \|$"
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(row, text, re.M)}
    assert set(rows) == {"none", "full"}, text
    assert float(rows["full"][0]) < 1.0 and float(rows["full"][1]) == 0.0, text
