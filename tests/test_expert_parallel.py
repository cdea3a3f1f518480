"""Expert parallelism on 2 gloo CPU processes, fp32: each rank routes its own tokens; EP=2 must
give what EP=1 (the whole model on every rank) gives on that rank's tokens, and gradients equal
to EP=1's summed over both ranks' data (what the data-parallel all-reduce makes of them).

Every rank also computes the EP=1 reference on both ranks' batches itself, so the reference
involves no communication. Routing is made uneven on purpose: a rank that sends all its slots to
the other rank, an expert that receives no token, a rank whose experts receive none.
"""

from __future__ import annotations

import copy
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tinyreason.model import CausalLM, debug_config, init_weights
from tinyreason.model.expert_parallel import (
    check_expert_parallel,
    expert_parameters,
    shard_experts,
    shard_model_experts,
)
from tinyreason.model.moe import Experts, MoE
from tinyreason.training.parallel import clip_grad_norm_, grad_norm

WORLD, V, TIMEOUT_S = 2, 512, 120
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; EP applies the gate weight after the GEMM


def _spawn(worker, tmp_path: Path) -> None:
    """Run worker(rank, store) on WORLD processes; a child's exception fails the test."""
    ctx = mp.start_processes(
        worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {TIMEOUT_S} s")


def _init(rank: int, store: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    return init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))


def _summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _all_reduce_grads(model: torch.nn.Module) -> None:
    """The data-parallel step: sum the plain (replicated) gradients; the expert ones are summed
    over the ranks' tokens by the all_to_all backward already."""
    for p in model.parameters():
        if not isinstance(p, DTensor):
            dist.all_reduce(p.grad)


def _check_grads(ep: torch.nn.Module, ref: torch.nn.Module, rank: int) -> None:
    """Local expert shards == EP=1's slice; the rest == EP=1's (grads summed over both batches)."""
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        want = ref_params[name].grad
        if isinstance(p, DTensor):
            n = want.shape[0] // WORLD
            mine = want[rank * n : (rank + 1) * n]
            torch.testing.assert_close(p.grad.to_local(), mine, **TOL, msg=name)
        else:
            torch.testing.assert_close(p.grad, want, **TOL, msg=name)


def _check_norm_and_clip(ep: torch.nn.Module, ref: torch.nn.Module) -> None:
    want = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    torch.testing.assert_close(grad_norm(ep.parameters()), want, **TOL)
    max_norm = want.item() / 3  # clipping scales by 1/3
    torch.testing.assert_close(clip_grad_norm_(ep.parameters(), max_norm), want, **TOL)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    torch.testing.assert_close(grad_norm(ep.parameters()), torch.tensor(max_norm), **TOL)


# ---------------------------------------------------------------------------------------------
# one MoE layer, three routings


def _moe_inputs(scenario: str, ref: MoE) -> list[torch.Tensor]:
    """Both ranks' inputs [2, 8, D]. Feature 0 steers routing: the router weight's column 0 is
    +3 on rank 1's experts (8..15) and -3 on rank 0's, so x[..., 0] = 5 sends a token's K slots
    (2 groups of 4 experts, both on rank 1) to rank 1 only."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 8, ref.gate.weight.shape[1], generator=gen) for _ in range(WORLD)]
    if scenario == "random":
        return xs
    with torch.no_grad():
        E = ref.num_experts
        ref.gate.weight[:, 0] = torch.where(torch.arange(E) >= E // 2, 3.0, -3.0)
        ref.gate.e_score_correction_bias[5] = -1.0  # below every score in (0, 1): never chosen
    xs[0][..., 0] = 5.0  # rank 0: every slot to rank 1
    if scenario == "idle_rank":  # rank 1 too: rank 0's experts receive no row at all
        xs[1][..., 0] = 5.0
    return xs


def _moe_checks(rank: int, mesh) -> None:
    bad = Experts(3, 8, 4)  # 3 experts over 2 ranks: refused before any communication
    with pytest.raises(ValueError, match="num_experts=3"):
        shard_experts(bad, mesh)
    assert bad.ep_group is None and not isinstance(bad.gate_up_proj, DTensor)

    for scenario in ("random", "one_way", "idle_rank"):
        _moe_scenario(scenario, mesh, rank)


def _moe_scenario(scenario: str, mesh, rank: int) -> None:
    cfg = debug_config(V, "moe")
    torch.manual_seed(0)
    ref = MoE(cfg)
    init_weights(ref, cfg)
    xs = _moe_inputs(scenario, ref)
    ep = copy.deepcopy(ref)
    shard_experts(ep.experts, mesh)
    assert ep.experts.gate_up_proj.to_local().shape[0] == cfg.moe.num_experts // WORLD
    assert expert_parameters(ep) == [ep.experts.gate_up_proj, ep.experts.down_proj]
    gen = torch.Generator().manual_seed(2)
    proj = [torch.randn(xs[0].shape, generator=gen) for _ in range(WORLD)]

    def loss(model: MoE, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, balance = model(xs[r])
        return out, (out * proj[r]).sum() + balance

    ref_out = []
    for r in range(WORLD):
        out, value = loss(ref, r)
        value.backward()
        ref_out.append(out.detach())
    out, value = loss(ep, rank)
    value.backward()
    torch.testing.assert_close(out, ref_out[rank], **TOL)

    counts = ref.tokens_per_expert  # EP=1 over both batches
    torch.testing.assert_close(_summed(ep.tokens_per_expert), counts, rtol=0, atol=0)
    local = ep.experts.gate_up_proj.grad.to_local()
    if scenario == "one_way":  # rank 0 sends nothing to itself; expert 5 gets no token
        assert counts[5] == 0 and counts[:8].sum() > 0
        assert rank == 1 or ep.tokens_per_expert[:8].sum() == 0
    if scenario == "idle_rank":  # rank 0 receives no row: zero gradients, no error
        assert counts[:8].sum() == 0
        assert rank == 1 or (local == 0).all()
    _all_reduce_grads(ep)
    _check_grads(ep, ref, rank)
    _check_norm_and_clip(ep, ref)
    _check_grads(ep, ref, rank)  # clipped alike


# ---------------------------------------------------------------------------------------------
# a whole CausalLM (MoE layers + MTP depth 1), built on meta, sharded, then materialised


def _model_checks(rank: int, mesh) -> None:
    cfg = debug_config(V, "moe")
    torch.manual_seed(0)
    ref = CausalLM(cfg)  # EP=1, built whole
    with torch.device("meta"):
        ep = CausalLM(cfg)
    sharded = shard_model_experts(ep, mesh)
    assert len(sharded) == len(ep.moe_layers()) == 3  # 2 MoE blocks + the MTP block
    ep.to_empty(device="cpu")
    torch.manual_seed(0)
    init_weights(ep)
    for (name, t), want in zip(ep.state_dict().items(), ref.state_dict().values(), strict=True):
        full = t.full_tensor() if isinstance(t, DTensor) else t
        torch.testing.assert_close(full, want, rtol=0, atol=0, msg=name)

    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, V, (2, 17), generator=gen) for _ in range(WORLD)]
    ref_outs = []
    for ids in batches:
        out = ref(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        ref_outs.append(out)
    out = ep(batches[rank][:, :-1], batches[rank][:, 1:])
    out.loss.backward()
    want = ref_outs[rank]
    torch.testing.assert_close(out.logits, want.logits, **TOL)
    torch.testing.assert_close(out.mtp_logits[0], want.mtp_logits[0], **TOL)
    for key in ("loss", "ce", "mtp", "balance"):
        torch.testing.assert_close(getattr(out, key), getattr(want, key), **TOL)
    _all_reduce_grads(ep)
    _check_grads(ep, ref, rank)
    _check_norm_and_clip(ep, ref)
    _check_grads(ep, ref, rank)

    gamma, counts = ep.update_moe_biases(progress=0.0, reduce=_summed)
    ref_gamma, ref_counts = ref.update_moe_biases(progress=0.0)
    assert gamma == ref_gamma > 0
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    for m, r in zip(ep.moe_layers(), ref.moe_layers(), strict=True):
        assert r.gate.e_score_correction_bias.abs().sum() > 0
        torch.testing.assert_close(m.gate.e_score_correction_bias, r.gate.e_score_correction_bias)


def _worker(rank: int, store: str) -> None:
    mesh = _init(rank, store)
    _moe_checks(rank, mesh)
    _model_checks(rank, mesh)
    dist.destroy_process_group()


def test_expert_parallel_equals_ep1(tmp_path: Path) -> None:
    """One MoE layer under three routings, then a whole CausalLM (one spawn: its imports are
    most of the time)."""
    _spawn(_worker, tmp_path)


# ---------------------------------------------------------------------------------------------
# configuration errors (no processes needed)


@pytest.mark.parametrize(
    ("num_experts", "world_size", "ep", "match"),
    [
        (15, 2, 2, r"num_experts=15.*allowed on 2 rank\(s\) with 15 routed experts: \[1\]"),
        (16, 3, 2, r"world size 3.*allowed.*: \[1\]"),
        (16, 4, 0, r"must be >= 1.*: \[1, 2, 4\]"),
        (None, 2, 2, "needs an MoE model"),
        (16, 8, 16, r"world size 8.*\[1, 2, 4, 8\]"),
    ],
)
def test_check_expert_parallel_rejects(num_experts, world_size, ep, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_expert_parallel(num_experts, world_size, ep)


def test_check_expert_parallel_accepts() -> None:
    for args in [(16, 4, 2), (16, 2, 2), (16, 1, 1), (None, 4, 1), (6, 12, 3)]:
        check_expert_parallel(*args)


def test_clip_grad_norm_on_plain_tensors_equals_torch() -> None:
    def grads() -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
        b(a(torch.randn(5, 4))).square().sum().backward()
        return [*a.parameters(), *b.parameters()]

    ours, torchs = grads(), grads()
    want = torch.nn.utils.clip_grad_norm_(torchs, 0.1)
    assert want > 0.2  # it clips
    torch.testing.assert_close(clip_grad_norm_(ours, 0.1), want)
    for p, q in zip(ours, torchs, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
