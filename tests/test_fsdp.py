"""`trainer.strategy=fsdp` (FSDP2 through Lightning's ModelParallelStrategy) on 2 gloo processes:
the sharded model starts from the one-device weights (meta-device init == eager init), trains to
the same losses, gradients and weights as one process (fp32), clips by the global norm, writes
DCP checkpoint folders that resume exactly, and exports to Hugging Face consolidated.

Tolerances: fp32 with the same reductions in another order (FSDP2's reduce-scatter, DDP's
all-reduce, one process's sum of two halves): 1e-6 relative on losses, 2e-6 absolute on weights;
with expert parallelism in the run (the gate weight applied after the down projection) 1e-5 on
losses and 1e-4 on weights after 10 AdamW steps at lr 3e-3: Adam divides each gradient by its
own scale, so rounding in the smallest gradients moves a weight by up to ~1% of a step
(measured 2.6e-5).
"""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import run_train_cli

from tinyreason.checkpoints import read_checkpoint
from tinyreason.model import CausalLM, debug_config, init_weights
from tinyreason.training.parallel import clip_grad_norm_, grad_norm, shard_model

V, STEPS, CLIP = 160, 3, 0.05  # CLIP: small enough that every step clips


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of 4 rows: rank r takes rows 2r, 2r+1."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, V, (4, 17), generator=g)
        targets = ids[:, 1:].clone()
        targets[0, :5] = -100  # some ignored targets: the halves' means weigh tokens alike
        targets[3, :5] = -100
        out.append((ids[:, :-1], targets))
    return out


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        with torch.device("meta"):
            model = CausalLM(debug_config(V, "moe"))
        shard_model(model, mesh, bf16=False)
        model.to_empty(device="cpu")
        init_weights(model)
        full = {"init": get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))}
        opt = _optimizer(model)
        losses, norms = [], []
        for ids, targets in _batches():
            rows = slice(2 * rank, 2 * rank + 2)
            loss = model(ids[rows], targets[rows]).loss
            loss.backward()
            norms.append(grad_norm(model.parameters()).item())
            clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        full["trained"] = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True)
        )
        if rank == 0:
            torch.save({"losses": losses, "norms": norms, **full}, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    return torch.load(out, weights_only=True)


def test_meta_device_init_of_the_sharded_model_equals_the_eager_model(sharded_run) -> None:
    torch.manual_seed(0)
    eager = CausalLM(debug_config(V, "moe")).state_dict()
    init = sharded_run["init"]
    assert init.keys() == eager.keys()
    for name, tensor in eager.items():
        assert torch.equal(init[name], tensor), name


def test_two_rank_fsdp_trains_like_one_process_with_clipping(sharded_run) -> None:
    """One process: each step the mean of the two halves' losses, their gradients averaged
    (what FSDP2's reduce-scatter does), clipped by the global norm, AdamW."""
    torch.manual_seed(0)
    model = CausalLM(debug_config(V, "moe"))
    opt = _optimizer(model)
    losses, norms = [], []
    for ids, targets in _batches():
        halves = [model(ids[r : r + 2], targets[r : r + 2]).loss for r in (0, 2)]
        loss = (halves[0] + halves[1]) / 2
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(n > CLIP for n in norms)  # every step clipped
    assert sharded_run["norms"] == pytest.approx(norms, rel=1e-6)
    assert sharded_run["losses"] == pytest.approx(losses, rel=1e-6)
    trained = sharded_run["trained"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, atol=2e-6, rtol=0, msg=name)
    assert not torch.equal(trained["lm_head.weight"], sharded_run["init"]["lm_head.weight"])


def _rows(run: Path, key: str) -> dict[int, float]:
    with open(run / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _cli(run: Path, cache_dir: Path, *args: str) -> None:
    proc = run_train_cli(
        "debug=fast",
        "logger=csv",
        "trainer.devices=2",
        "optim.schedule=constant",  # 5 + 5 resumed steps follow the 10-step run's lr
        "optim.warmup_steps=0",
        "eval.during_training.num_problems=0",
        "eval.at_end=false",
        f"hydra.run.dir={run}",
        f"cache_dir={cache_dir}",
        *args,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_cli_equals_ddp_resumes_exactly_and_exports(cache_dir, tmp_path) -> None:
    """DDP for 10 steps (Lightning relaunches the command as a second process; rank 0 writes the
    run); FSDP2 with the experts split over the 2 ranks (expert_parallel=2) for 5, then resumed
    from its DCP folder to 10 without expert parallelism (DCP reshards the experts): the same
    losses at every step, the same final weights, and an HF export of them. Expert parallelism
    applies the gate weight after the down projection: rel 3e-5 on its losses (the masked
    attention of packed conversations adds its own rounding: 1.4e-5 seen)."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _cli(ddp, cache_dir, "trainer.strategy=ddp")
    assert (ddp / "train_ddp_process_1.log").is_file(), "no second process"
    tokens = _rows(ddp, "tokens")
    assert tokens[max(tokens)] == 10 * 2 * 320 * 2  # steps x batch x window x ranks
    assert (ddp / "hf" / "config.json").is_file()
    assert (ddp / "tokenizer" / "tokenizer.json").is_file()
    half = ("trainer.max_steps=5", "trainer.val_check_interval=5", "trainer.expert_parallel=2")
    _cli(fsdp, cache_dir, "trainer.strategy=fsdp", "export.hf=false", *half)
    last = fsdp / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"meta.pt", ".metadata"} <= {p.name for p in last.iterdir()}
    assert len(list(last.glob("*.distcp"))) == 2  # one shard file per rank
    first_half = _rows(fsdp, "train/loss")
    _cli(fsdp, cache_dir, "trainer.strategy=fsdp", "ckpt_path=last")
    assert not list((fsdp / "checkpoints").glob("*.partial"))

    ddp_loss, fsdp_loss = _rows(ddp, "train/loss"), first_half | _rows(fsdp, "train/loss")
    assert sorted(fsdp_loss) == sorted(ddp_loss) and len(ddp_loss) == 10
    for step, loss in ddp_loss.items():
        assert fsdp_loss[step] == pytest.approx(loss, rel=3e-5), step
    assert _rows(fsdp, "val/bpb")[9] == pytest.approx(_rows(ddp, "val/bpb")[9], rel=3e-5)

    want = read_checkpoint(ddp / "checkpoints" / "last.ckpt")
    got = read_checkpoint(last)  # consolidated from the DCP shards
    assert got["global_step"] == want["global_step"] == 10
    weights = {k: v for k, v in want["state_dict"].items() if k.startswith("model.")}
    assert weights.keys() <= got["state_dict"].keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(got["state_dict"][name], tensor, atol=1e-4, rtol=0, msg=name)

    from safetensors.torch import load_file

    exported = load_file(fsdp / "hf" / "model.safetensors")
    embed = got["state_dict"]["model.embed_tokens.weight"]
    assert torch.equal(exported["model.embed_tokens.weight"], embed)


def test_a_dcp_folder_reads_consolidated_and_a_damaged_one_is_named(tmp_path) -> None:
    """`read_checkpoint` on a DCP folder (one process writes it here: DCP needs no process
    group): the full weights and Lightning's meta.pt; without its .metadata, the damage message."""
    import torch.distributed.checkpoint as dcp

    weights = {"model.w": torch.arange(6.0).view(2, 3), "model.b": torch.ones(4)}
    folder = tmp_path / "checkpoints" / "last.ckpt"
    dcp.save(
        {"state_dict": weights, "optimizer_0": {"step": torch.tensor(3.0)}}, checkpoint_id=folder
    )
    torch.save({"global_step": 3, "run_config": {"seed": 0}}, folder / "meta.pt")
    (tmp_path / "checkpoints" / "best-2.ckpt").mkdir()
    (tmp_path / "checkpoints" / "best-2.ckpt" / "meta.pt").write_bytes(b"")
    state = read_checkpoint(folder)
    assert state["global_step"] == 3 and state["run_config"] == {"seed": 0}
    assert state["state_dict"].keys() == weights.keys()
    assert all(torch.equal(state["state_dict"][k], v) for k, v in weights.items())
    assert "state_dict" not in read_checkpoint(folder, mmap=True)  # a look at meta.pt only
    (folder / ".metadata").unlink()
    with pytest.raises(
        ValueError,
        match=r"last.ckpt is damaged or incomplete \(it has no .metadata\); the previous one is .*best-2.ckpt",
    ):
        read_checkpoint(folder)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["trainer.strategy=fsdp", "precision=fp8"],
            "fsdp supports precision=fp32 or bf16, not fp8",
        ),
        (["trainer.strategy=deepspeed"], "deepspeed needs CUDA GPUs"),
        (["trainer.expert_parallel=2", "trainer.devices=2"], "needs trainer.strategy=fsdp"),
        (
            ["trainer.strategy=fsdp", "trainer.expert_parallel=2"],
            "does not divide the world size 1",
        ),
        (
            ["trainer.strategy=fsdp", "trainer.expert_parallel=3", "trainer.devices=3"],
            r"does not divide model.moe.num_experts=8; allowed on 3 rank\(s\) with 8 routed experts: \[1\]",
        ),
        (
            ["trainer.strategy=fsdp", "trainer.expert_parallel=2", "model=dense"],
            "needs a model with routed experts",
        ),
        (["trainer.strategy=fsdp2"], r"trainer.strategy='fsdp2' is not one of \['auto', 'ddp'"),
        (
            ["trainer.activation_checkpointing=some"],
            "is not one of \\['none', 'full', 'selective'\\]",
        ),
        (["trainer.loss_chunk_size=-1"], "loss_chunk_size must be auto, 0 \\(off\\) or a positive"),
    ],
)
def test_scaling_options_it_cannot_honour_fail_before_any_work(make_cfg, overrides, message):
    from tinyreason.training.run_config import RunConfig

    with pytest.raises(ValueError, match=message):
        RunConfig.from_hydra(make_cfg(*overrides))


def test_fsdp_refuses_the_stages_it_does_not_shard(make_cfg, pretrained):
    from tinyreason.training.run_config import RunConfig

    run, _ = pretrained
    for stage in ("dpo", "grpo"):
        cfg = make_cfg(
            f"stage={stage}", "debug=fast", f"model.init_from={run}", "trainer.strategy=fsdp"
        )
        with pytest.raises(ValueError, match=f"fsdp runs stage=pretrain or sft, not {stage}"):
            RunConfig.from_hydra(cfg)
