"""Expert parallelism (EP): every MoE layer's routed experts split over the P ranks of a 1-D
device mesh; each token-expert slot travels to its expert's rank and back with all_to_all (the
expert-parallel branch of `Experts.forward`, tinyreason/model/moe.py). DeepSeek-V3 report §3.2.2
(arXiv 2412.19437); torchtitan splits its MoE the same way.

| tensor                                       | under EP                  | its gradient after backward  |
|----------------------------------------------|---------------------------|------------------------------|
| experts.gate_up_proj [E, 2F, D],             | DTensor Shard(0): rank r  | already summed over the EP   |
|   experts.down_proj [E, D, F]                |   holds experts r*E/P ..  |   ranks' tokens (the         |
|                                              |   (r+1)*E/P - 1           |   all_to_all backward)       |
| everything else (router and its bias, shared | replicated, plain tensors | this rank's tokens: the      |
|   experts, attention, norms, embeddings)     |                           |   data-parallel reduction's  |
| MoE.tokens_per_expert                        | global expert ids, this   | summed by the caller before  |
|                                              |   rank's tokens           |   the bias update (*)        |

(*) `CausalLM.update_moe_biases(progress, reduce=all_reduce_sum)`: routing is per token with
replicated router weights and bias, so the summed counts are those of the concatenated batch and
the update equals EP=1's on it (tested).

For the caller (the FSDP2 strategy):
- Order: build the model (meta device or not) -> `shard_model_experts` -> `fully_shard` with
  `ignored_params=set(expert_parameters(model))` (they are sharded already) -> `to_empty()` +
  `init_weights` (layers.init_normal_ draws each full tensor and keeps this rank's shard, so the
  weights equal an EP=1 build after the same seed). Sharding a materialised model works too:
  `distribute_tensor(..., src_data_rank=None)` keeps each rank's slice without communication,
  which needs the full tensors equal on every rank (same seed, or the same checkpoint).
- Scale: the expert gradients are sums over the EP group's tokens, where FSDP2 averages the
  others over the ranks: the strategy sets `Experts.ep_grad_scale = 1 / ranks`, which scales
  the local weights' gradient in the EP forward (`training/parallel.shard_model`). EP smaller
  than the world (ranks holding the same experts reducing among themselves) is not built.
- Clipping: `tinyreason.training.parallel.clip_grad_norm_`; torch's raises on a mix of DTensor and plain gradients, or of
  DTensors on different meshes (torch 2.13: "got mixed torch.Tensor and DTensor" / "must have
  the same mesh"). Likewise torch.optim's foreach path raises on a mix of DTensor and plain
  parameters (it accepts DTensors on different meshes): FSDP2 makes every other one a DTensor.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from .moe import Experts


def check_expert_parallel(num_experts: int | None, world_size: int, ep: int) -> None:
    """`trainer.expert_parallel=ep` is valid for a model with `num_experts` routed experts (None:
    no MoE) on `world_size` ranks: ep >= 1 dividing both. Raises ValueError saying what is allowed (a user error at the entry points: tinyreason.errors)."""
    allowed = [
        d for d in range(1, world_size + 1) if world_size % d == 0 and (num_experts or 1) % d == 0
    ]
    hint = f"allowed on {world_size} rank(s) with {num_experts} routed experts: {allowed}"
    if ep < 1:
        raise ValueError(f"trainer.expert_parallel must be >= 1, got {ep}; {hint}")
    if ep == 1:
        return
    if num_experts is None:
        raise ValueError(
            f"trainer.expert_parallel={ep} needs an MoE model (model.moe is null); set it to 1"
        )
    if world_size % ep:
        raise ValueError(
            f"trainer.expert_parallel={ep} does not divide the world size {world_size} "
            f"(devices x num_nodes); {hint}"
        )
    if num_experts % ep:
        raise ValueError(
            f"trainer.expert_parallel={ep} does not divide model.moe.num_experts={num_experts}; "
            f"{hint}"
        )


def shard_experts(experts: Experts, mesh: DeviceMesh) -> None:
    """Split `experts` over the 1-D `mesh`: its two weights become DTensor Parameters Shard(0)
    (E/P experts a rank), taken without communication from the full tensors, which must be equal
    on every rank (or on the meta device); `Experts.forward` then dispatches with all_to_all."""
    if mesh.ndim != 1:
        raise ValueError(f"expert parallelism needs a 1-D device mesh, got {mesh.ndim}-D {mesh}")
    if experts.ep_group is not None:
        raise ValueError("these experts are sharded already")
    check_expert_parallel(experts.num_experts, mesh.size(), mesh.size())
    for name in ("gate_up_proj", "down_proj"):
        full = getattr(experts, name)
        shard = distribute_tensor(full.detach(), mesh, [Shard(0)], src_data_rank=None)
        setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
    experts.ep_group, experts.ep_size = mesh.get_group(), mesh.size()
    experts.ep_rank = mesh.get_local_rank()


def shard_model_experts(model: nn.Module, mesh: DeviceMesh) -> list[Experts]:
    """`shard_experts` on every routed-expert module of `model` (MTP blocks included)."""
    found = [m for m in model.modules() if isinstance(m, Experts)]
    for experts in found:
        shard_experts(experts, mesh)
    return found


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert-parallel (sharded) parameters of `model`: FSDP2's `ignored_params`."""
    return [
        p
        for m in model.modules()
        if isinstance(m, Experts) and m.ep_group is not None
        for p in (m.gate_up_proj, m.down_proj)
    ]
