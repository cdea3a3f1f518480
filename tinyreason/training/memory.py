"""Activation checkpointing and torch.compile per decoder block (`trainer.activation_checkpointing`,
`trainer.compile`), applied in place before FSDP2 (torchtitan's order: AC, compile, FSDP).

Names stay unchanged. torch's `checkpoint_wrapper` and `torch.compile(module)` wrap each block in
a module (`_checkpoint_wrapped_module.`, `_orig_mod.` in every name), which checkpoints, the HF
export and the optimizer's no-decay grouping would all see. Here each block (`model.layers[i]`,
`model.mtp[k].block`) gets an instance attribute `forward`, a `BlockForward`, that calls the
class's forward eagerly, compiled, or under `torch.utils.checkpoint` (non-reentrant); no module
is added or renamed, `state_dict()` is the same.

Both apply in training only: grad enabled and no KV cache. Decoding (a cache, which forward
appends to; compiled, its growth would recompile every token) and no-grad forwards (validation,
rollouts, a DPO reference) run the block as written, so dynamo holds only the training graphs
(its recompile_limit is 8 entries per function).

`selective` is torchtitan's op-level SAC (`_policy`): the outputs of the GEMMs and attention
(`SAVED_OPS`) are kept, everything else in the block is recomputed in backward.

The MoE counter: `MoE.forward` adds the routed tokens to `tokens_per_expert` in training, and a
recompute in backward would add them again. The checkpoint's recompute context saves every MoE
counter of the block when the recompute starts and restores it when it ends (also when torch
stops the recompute early), so the counts equal a run without checkpointing; moe.py is as it was.

Compile: `torch.compile(dynamic=False)` of the block's forward, held by its `BlockForward` (not
`block.compile()`, which compiles the whole `__call__`: decoding would go through dynamo).
Blocks share graphs when their structure and shapes agree; at fixed training shapes all graphs
are built in the first two steps (the MTP block's S-1 positions have their own) and reused.
With checkpointing, the checkpoint runs eagerly around the compiled forward and the recompute
runs the compiled forward again. torchtitan's nesting (compile over the checkpoint) needs a
block without graph breaks: for the MoE block (breaks below) dynamo would run the whole
checkpointed block eagerly. Under compile `selective` becomes `full`: the op-level policy
would cache outputs of the ops inductor still dispatches (extern GEMMs), whose buffers inductor
may reuse; within a graph, inductor's partitioner already recomputes the pointwise ops it fuses
rather than saving them.

Graph breaks seen in the MoE block (torch 2.13, CPU): `torch.bincount` (data-dependent output
shape: the expert counts and the grouped-GEMM offsets), and on CPU in fp32 each grouped GEMM
(torch's fake kernel for `_grouped_mm` takes bf16 only, so `compile_blocks` runs it eagerly).
Dense blocks compile to one graph. Also on CPU, inductor cannot lower oneDNN's
`mkldnn._linear_pointwise` (`layers.linear` in fp32) outside freezing, so the backend
decomposes it into a matmul (inductor then picks the GEMM).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from tinyreason.model.moe import Experts, MoE

log = logging.getLogger(__name__)

MODES = ("none", "full", "selective")


def _ops(*names: str) -> frozenset:
    """The OpOverloads `namespace.op.overload` that this torch build has."""
    found = []
    for name in names:
        namespace, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and overload in packet.overloads():
            found.append(getattr(packet, overload))
    return frozenset(found)


# Selective AC keeps the outputs of these ops and recomputes every other op of the block.
SAVED_OPS = _ops(
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten._grouped_mm.default",  # routed experts
    "aten._scaled_mm.default",  # FP8 GEMMs
    "aten._scaled_grouped_mm.default",
    "mkldnn._linear_pointwise.default",  # layers.linear on CPU in fp32
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "_c10d_functional.all_to_all_single.default",  # expert parallelism: no second exchange
)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """torchtitan's op-level SAC, with every GEMM saved (torchtitan also recomputes every other
    mm): a block's FLOPs are its GEMMs and attention, so saving their outputs and recomputing
    the rest (norms, RoPE, SiLU, products, routing, casts: memory-bound, cheap) keeps most of
    the memory saving of full AC at a small share of its recompute time."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _counters_kept(block: nn.Module):
    """Restore the block's MoE `tokens_per_expert` to their value at entry (the recompute's)."""
    moes = [m for m in block.modules() if isinstance(m, MoE)]
    saved = [m.tokens_per_expert.clone() for m in moes]
    try:
        yield
    finally:
        for m, counts_E in zip(moes, saved, strict=True):
            m.tokens_per_expert.copy_(counts_E)


@contextlib.contextmanager
def _recomputing(block: nn.Module, sac_recompute: contextlib.AbstractContextManager):
    with _counters_kept(block), sac_recompute:
        yield


def _contexts(block: nn.Module, selective: bool):
    """checkpoint's context_fn: (forward context, recompute context), called per forward."""
    if selective:
        forward, recompute = create_selective_checkpoint_contexts(_policy)
    else:
        forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
    return forward, _recomputing(block, recompute)


def _eager_forward(block: nn.Module, *args):
    return type(block).forward(block, *args)


class BlockForward:
    """A block's `forward` (its signature: x, rope, cache=None, mask=None -> (x, balance)).

    `checkpointing`: none | full | selective; `compiled`: the compiled class forward, or None."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.checkpointing = "none"
        self.compiled: Callable | None = None

    def __call__(self, x_BSD, rope, cache=None, mask_B1ST=None):
        if cache is not None or not torch.is_grad_enabled():  # not training: as written
            return _eager_forward(self.block, x_BSD, rope, cache, mask_B1ST)
        run = self.compiled or _eager_forward
        if self.checkpointing == "none":
            return run(self.block, x_BSD, rope, None, mask_B1ST)
        selective = self.checkpointing == "selective" and self.compiled is None
        return checkpoint(
            run,
            self.block,
            x_BSD,
            rope,
            None,
            mask_B1ST,
            use_reentrant=False,
            context_fn=functools.partial(_contexts, self.block, selective),
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a `CausalLM`: main layers, then the MTP blocks."""
    return [*model.layers, *(m.block for m in model.mtp)]


def _block_forward(block: nn.Module) -> BlockForward:
    forward = block.__dict__.get("forward")
    if not isinstance(forward, BlockForward):
        forward = block.forward = BlockForward(block)
    return forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block in backward: `full` all of it, `selective` all but the GEMM and
    attention outputs (`SAVED_OPS`); `none` undoes either."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is not one of {list(MODES)}")
    for block in blocks(model):
        _block_forward(block).checkpointing = mode


def _linear_pointwise(x, weight, bias, attr, scalars, algorithm):
    assert attr == "none", attr  # layers.linear's only use: no fused epilogue
    y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


@functools.cache
def _decompositions() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table.update({op: _linear_pointwise for op in _ops("mkldnn._linear_pointwise.default")})
    return table


def _inductor(graph, example_inputs):
    """torch.compile's default backend, with oneDNN's linear decomposed into a matmul (see the
    module docstring); inductor is imported at the first compilation."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, example_inputs, decompositions=_decompositions())


class _GroupedMMOutsideGraph:
    """An `Experts.grouped_mm` hook that runs non-bf16 GEMMs eagerly (a graph break): torch's
    fake `_grouped_mm` kernel rejects them, so dynamo cannot trace them. bf16 is traced."""

    def __init__(self, hook: Callable) -> None:
        self.hook = hook
        self.eager = torch.compiler.disable(hook)

    def __call__(self, x_MI, w_EIO, offsets_E):
        if x_MI.dtype == torch.bfloat16:
            return self.hook(x_MI, w_EIO, offsets_E)
        return self.eager(x_MI, w_EIO, offsets_E)


@functools.cache
def _compiled_forward(backend: str | None) -> Callable:
    """One compiled `_eager_forward` for every block: dynamo keeps a graph per block structure
    and input shape (guards on the block's type and structure, weights as graph inputs)."""
    return torch.compile(_eager_forward, backend=backend or _inductor, dynamic=False)


def compile_blocks(model: nn.Module, backend: str | None = None) -> None:
    """torch.compile each block's forward in place (names unchanged); see the module docstring.
    `backend`: torch.compile's, default inductor (tests use "aot_eager": dynamo's capture and
    AOT autograd's graphs without inductor's code generation)."""
    for block in blocks(model):
        for experts in block.modules():
            if isinstance(experts, Experts) and not isinstance(
                experts.grouped_mm, _GroupedMMOutsideGraph
            ):
                experts.grouped_mm = _GroupedMMOutsideGraph(experts.grouped_mm)
        _block_forward(block).compiled = _compiled_forward(backend)


def apply(model: nn.Module, activation_checkpointing: str, compile: bool) -> None:
    """The run's `trainer.activation_checkpointing` and `trainer.compile`, in torchtitan's order
    (both before FSDP2's `fully_shard`)."""
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        if activation_checkpointing == "selective":
            log.warning(
                "trainer.compile=true with activation_checkpointing=selective: each compiled "
                "block is recomputed whole (full), see tinyreason/training/memory.py"
            )
        compile_blocks(model)
