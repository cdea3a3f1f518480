"""Beyond one device on existing engines: `trainer.strategy=fsdp` is FSDP2 (`fully_shard`, DTensor,
DCP checkpoints) through Lightning's `ModelParallelStrategy`; `trainer.expert_parallel=N` splits
the routed experts over N ranks (`tinyreason/model/expert_parallel.py`); `trainer.strategy=deepspeed`
is Lightning's `DeepSpeedStrategy` (ZeRO-2 / 3, GPU only). DDP stays Lightning's own `ddp`.

Under `fsdp` the LightningModule builds its model on the meta device in `configure_model`, applies
activation checkpointing and compile per block (`training/memory.py`), shards it (`shard_model`:
each decoder block, each MTP block, the embedding and the output head are FSDP units of their own;
with expert parallelism the routed experts are DTensors sharded over the EP mesh and stay out of
FSDP), then materialises it with `to_empty` and `init_weights`, which draws every full tensor as
an eager build does and keeps each rank's shard: the sharded model starts from the weights the
one-device run starts from (tested). Lightning's own meta materialisation (`to_empty` on the whole
LightningModule + `reset_parameters`) would also wipe the BPB byte table and the metric states,
so the module materialises its model itself before Lightning looks.

Checkpoints are DCP folders (`last.ckpt/`: one shard file per rank, `.metadata`, and Lightning's
`meta.pt` with everything but weights and optimizer state), written to `<name>.partial/` and
swapped in only once complete (`strategies.FSDP2Strategy.save_checkpoint`); `checkpoints.read_checkpoint`
consolidates one for `init_from`, export, evaluate and generate. Generation during training and the
final export gather the full weights onto every rank (`LitCausalLM.unsharded_model`), so exact
match runs with no collective inside, on every rank alike, as under DDP.

No Lightning import here (the strategies are `training/strategies.py`): the GPU check
(`experiments/gpu_check/scaling.py`) shards with `shard_model` on a bare torch image.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from tinyreason.errors import UserError

# What each strategy supports (README "Scaling out"; checked by `check_strategy`).
FSDP_PRECISIONS = ("fp32", "bf16")  # FSDP2 + torchao float8 (all-gather in fp8) is not wired
FSDP_STAGES = ("pretrain", "sft")  # DPO's reference model and GRPO's rollouts are not sharded


def check_strategy(run) -> None:
    """Refuse, before any work, a strategy asked for something it cannot do here."""
    t, precision, model = run.trainer, run.precision.name, run.model
    cuda = t.accelerator in ("gpu", "cuda") or (
        t.accelerator == "auto" and torch.cuda.is_available()
    )
    if t.strategy == "deepspeed":
        if not cuda:
            raise UserError(
                "trainer.strategy=deepspeed needs CUDA GPUs (DeepSpeed's ZeRO optimizers and "
                "kernels do not run on a CPU accelerator); on CPU use trainer.strategy=fsdp "
                "(FSDP2: the same sharding of weights, gradients and optimizer state) or ddp"
            )
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise UserError(
                "trainer.strategy=deepspeed needs the deepspeed package, an optional extra: "
                "pip install -c constraints.txt -e .[deepspeed] (it builds on a CUDA machine; "
                f"PyPI has no binary wheel): {err}"
            ) from err
        if t.expert_parallel > 1:
            raise UserError(
                "trainer.expert_parallel > 1 is built on FSDP2: use trainer.strategy=fsdp"
            )
        whole = {  # what reads the weights whole, and how to turn it off
            "export.hf=false": run.export_hf,
            "eval.at_end=false": run.eval.at_end,
            "eval.during_training.num_problems=0": run.eval.during_training_problems,
        }
        if t.deepspeed_stage == 3 and any(whole.values()):
            raise UserError(
                "trainer.deepspeed_stage=3 partitions the weights, and the end-of-run export and "
                f"exact match read them whole: set {' '.join(k for k, on in whole.items() if on)}, "
                "or use deepspeed_stage=2, or trainer.strategy=fsdp (which gathers them)"
            )
    if t.strategy == "fsdp" and run.stage.name not in FSDP_STAGES:
        raise UserError(
            f"trainer.strategy=fsdp runs stage={' or '.join(FSDP_STAGES)}, not "
            f"{run.stage.name}: DPO's frozen reference and GRPO's rollouts are not sharded; use "
            "trainer.strategy=ddp for DPO, one device for GRPO"
        )
    if t.strategy == "fsdp" and precision not in FSDP_PRECISIONS:
        raise UserError(
            f"trainer.strategy=fsdp supports precision={' or '.join(FSDP_PRECISIONS)}, not "
            f"{precision}: FP8 training with FSDP2 (torchao's float8 all-gather) is not wired "
            "here; use trainer.strategy=ddp for FP8"
        )
    if t.expert_parallel > 1:
        from tinyreason.model.expert_parallel import check_expert_parallel

        if t.strategy != "fsdp":
            raise UserError(
                f"trainer.expert_parallel={t.expert_parallel} needs trainer.strategy=fsdp (now "
                f"{t.strategy}): the experts become DTensor shards beside FSDP2's"
            )
        if model.moe is None:
            raise UserError(
                f"trainer.expert_parallel={t.expert_parallel} needs a model with routed experts "
                "(model=moe); this model is dense"
            )
        check_expert_parallel(model.moe.num_experts, t.world_size, t.expert_parallel)


def shard_model(model: nn.Module, mesh, bf16: bool, expert_parallel: int = 1) -> None:
    """FSDP2 over the data-parallel `mesh`, in place: each decoder block, each MTP block, the
    embedding and the output head are their own units (the head is shared by the main model and
    the MTP blocks: one unit with either fails in backward), the final norm goes with the root.
    bf16: parameters all-gathered in bf16, gradients reduced in fp32 (MixedPrecisionPolicy).
    expert_parallel > 1: the routed experts first become Shard(0) DTensors over the same ranks
    and stay out of FSDP (their gradients are complete on their owner: every token routed to an
    expert is sent to it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    ignored: set[nn.Parameter] = set()
    if expert_parallel > 1:
        from tinyreason.model.expert_parallel import expert_parameters, shard_model_experts

        for experts in shard_model_experts(model, mesh):
            # an expert's gradient sums the EP group's tokens; FSDP2 averages the others
            experts.ep_grad_scale = 1.0 / mesh.size()
        ignored = set(expert_parameters(model))
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
    tied = model.lm_head.weight is model.embed_tokens.weight
    units = [*model.layers, *model.mtp]
    if not tied:
        units += [model.embed_tokens, model.lm_head]
    for unit in units:
        mine = {p for p in unit.parameters() if p in ignored}
        fully_shard(unit, **kwargs, **({"ignored_params": mine} if mine else {}))
    fully_shard(model, **kwargs, **({"ignored_params": ignored} if ignored else {}))


def _by_mesh(tensors: Iterable[torch.Tensor]) -> dict[DeviceMesh | None, list[torch.Tensor]]:
    """Plain tensors under None, DTensors under their mesh: the groups torch's norms accept."""
    groups: dict[DeviceMesh | None, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return groups


def _as_list(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def grad_norm(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor | None:
    """The norm of all the gradients as one vector, a plain tensor equal on every rank: a
    DTensor's counts in full (its shards' norms combined over its mesh), a plain one as it is (it
    must be equal on every rank already: call after the data-parallel reduction). For p = 2,
    sqrt(sum_ep^2 + sum_rest^2). None when no parameter has a gradient. Every rank must call it
    with the same parameters (collectives). torch's own raises on a mix of DTensor and plain
    gradients, or DTensors on two meshes (torch 2.13)."""
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    norms = []
    for group in _by_mesh(grads).values():
        norm = torch.nn.utils.get_total_norm(group, norm_type, error_if_nonfinite)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return None
    return torch.nn.utils.get_total_norm(norms, norm_type)  # the p-norm of the group norms


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over a mix of plain and DTensor gradients (EP experts,
    FSDP2 shards): scales every gradient by min(1, max_norm / total) with `grad_norm`'s total.
    Returns the total norm before clipping."""
    params = [p for p in _as_list(parameters) if p.grad is not None]
    total = grad_norm(params, norm_type, error_if_nonfinite)
    if total is None:  # no gradient: the divergence guard dropped this step's
        return None
    for group in _by_mesh(params).values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
