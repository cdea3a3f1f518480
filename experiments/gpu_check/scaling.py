"""Scaling out and memory on one GPU (gpu_check.py `--checks scaling`): FSDP2 vs DDP, torch.compile
per block, activation checkpointing, the chunked cross-entropy at a 151,936-token vocabulary, and
DeepSpeed ZeRO-2 when `import deepspeed` works; the same model, init and batches for each, bf16
autocast on CUDA (fp32 on CPU). README.md beside this file has the table and the bounds.

A process group of world size 1 lives in this process (NCCL on CUDA, gloo on CPU): DDP, FSDP2 and
DeepSpeed run their own code (bucketed all-reduce, all-gather / reduce-scatter, ZeRO partitions)
over one rank, so the math is one device's and what differs is each engine's cost. Models are
built as training builds them: eagerly after `torch.manual_seed(0)` (DDP, DeepSpeed), or on the
meta device, `shard_model`, `to_empty`, `init_weights` after the same seed (FSDP2, as
LitCausalLM.configure_model), which draws the same weights; `memory`'s options go on before DDP.

Per run: the median step time after `warmup` steps, tokens/s, the run's peak memory above what was
allocated before it (weights, gradients, optimizer state, activations), the last step's peak above
what is held between steps (activations, gradients, temporaries: what checkpointing and the
chunked head shrink), the mean loss of the `last` steps vs the check's baseline under a bound.
Memory: CUDA `max_memory_allocated` after `reset_peak_memory_stats`; CPU the resident set (VmHWM
after /proc/self/clear_refs) with glibc mapping each allocation >= 64 KiB on its own, so that RSS
follows the live tensors (`tinyreason.bench.ce`'s method); n/a without /proc or glibc. A run that
raises is a FAIL row (its traceback printed) and the next one runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tinyreason.model import CausalLM, ModelConfig, debug_config, init_weights
from tinyreason.model.config import MLAConfig, MoEConfig, MTPConfig
from tinyreason.training import memory
from tinyreason.training.optim import OptimConfig, build_optimizer
from tinyreason.training.parallel import clip_grad_norm_, shard_model

# |mean loss of the last steps - the baseline's| / the baseline's:
# SAME_MATH: the same ops in the same precision under another engine or recomputed (FSDP2 with
#   fp32 weights, checkpointing). CPU fp32 agrees to ~1e-7; in bf16 on CUDA the backward's atomic
#   adds (MoE scatter, embedding) make any two runs differ by rounding that 40 AdamW steps grow.
# ROUNDING: other roundings (FSDP2's bf16 all-gather, which training uses, rounds the weights of
#   the ops autocast keeps in fp32: norms, the router; inductor's fusions): the FP8 check's 1%.
# BF16_WEIGHTS: DeepSpeed's bf16 mode casts the whole model, so the residual stream, embedding
#   and norms run in bf16 too.
SAME_MATH, ROUNDING, BF16_WEIGHTS = 2e-3, 1e-2, 2e-2
CE_VOCAB = 151_936  # Qwen's vocabulary
CE_LOSS_BOUND = 1e-3  # one step, same weights: only the head's GEMM shapes and log-sum-exp differ
CE_MEMORY_BOUND = 0.5  # chunked step peak / full-logits step peak
DEEPSPEED_SKIP = "skipped: deepspeed not importable (pip install .[deepspeed])"
CHECKS = ("1 FSDP2 vs DDP", "2 compile", "3 activation ckpt", "4 chunked CE", "5 ZeRO-2")
MIB = 2**20


@dataclass(frozen=True)
class Shape:
    steps: int  # AdamW steps per run
    batch: int
    seq: int
    warmup: int  # first steps left out of the median (compilation, allocator, lazy kernels)
    last: int  # steps whose mean loss is compared
    ce_batch: int  # rows of the chunked-CE check's forward + backward
    chunk: int  # its `loss_chunk_size`


SHAPES = {
    False: Shape(steps=40, batch=8, seq=1024, warmup=10, last=10, ce_batch=8, chunk=512),
    True: Shape(steps=5, batch=2, seq=32, warmup=2, last=2, ce_batch=8, chunk=32),
}


def model_config(smoke: bool) -> ModelConfig:
    """0.52 B parameters (0.14 B active per token): MLA + 32 routed experts of width 512, top-4
    of 8 groups, 8 layers (first dense), MTP depth 1, vocabulary 32768. --smoke: `debug_config`."""
    if smoke:
        return debug_config(512, "moe")
    mla = MLAConfig(num_heads=8, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)  # fmt: skip
    moe = MoEConfig(num_experts=32, num_shared_experts=1, num_experts_per_tok=4,
                    moe_intermediate_size=512, num_groups=8, topk_groups=4)  # fmt: skip
    dims = dict(vocab_size=32768, hidden_size=1024, num_layers=8, intermediate_size=2816)
    return ModelConfig(
        **dims, attention=mla, moe=moe, max_seq_len=1024, num_dense_layers=1, mtp=MTPConfig(depth=1)
    )


class Memory:
    """Bytes in use now and at the peak since `reset()` (see the module docstring); NaN: n/a."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ok = device.type == "cuda" or _rss_follows_tensors()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS

    def now(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.device))
        return _status_kib("VmRSS") * 1024.0 if self.ok else math.nan

    def peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        return _status_kib("VmHWM") * 1024.0 if self.ok else math.nan


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _rss_follows_tensors() -> bool:
    """glibc: mmap every allocation >= 64 KiB (M_MMAP_THRESHOLD = -3), unmapped when freed."""
    try:
        if ctypes.CDLL("libc.so.6").mallopt(-3, 65536) != 1:
            return False
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") > 0
    except (OSError, StopIteration, AttributeError):
        return False


@dataclass
class Bench:
    """What every run shares."""

    cfg: ModelConfig
    shape: Shape
    device: torch.device
    data: list[torch.Tensor]  # `shape.steps` windows [batch, seq + 1]
    mesh: object = None
    memory: Memory = field(init=False)

    def __post_init__(self) -> None:
        self.memory = Memory(self.device)
        steps = self.shape.steps
        self.optim = OptimConfig(lr=1e-3, warmup_steps=steps // 5, total_steps=steps)

    def autocast(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()  # fp32 on CPU
        return torch.autocast("cuda", dtype=torch.bfloat16)


@dataclass
class Engine:
    """One run's trainer: `forward` runs a batch (the DDP / FSDP2 / DeepSpeed module), `step`
    does backward, clipping, the optimizer and schedule steps and frees the gradients; `model` is
    the CausalLM inside (the MoE bias update)."""

    model: CausalLM
    forward: Callable
    step: Callable[[torch.Tensor], None]


def _eager(b: Bench, cfg: ModelConfig | None = None) -> CausalLM:
    torch.manual_seed(0)
    with torch.device(b.device):
        return CausalLM(cfg or b.cfg)


def _adamw(b: Bench, model: CausalLM) -> Callable[[torch.Tensor], None]:
    optimizer, scheduler = build_optimizer(model, b.optim)

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)  # FSDP2's DTensor gradients too
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ddp(b: Bench, prepare: Callable[[CausalLM], None] | None = None) -> Engine:
    """`prepare`: a `memory` option, applied before DDP wraps the model."""
    model = _eager(b)
    if prepare is not None:
        prepare(model)
    ids = [b.device.index] if b.device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return Engine(model, wrapped, _adamw(b, model))


def fsdp2(b: Bench, bf16: bool) -> Engine:
    with torch.device("meta"):
        model = CausalLM(b.cfg)
    shard_model(model, b.mesh, bf16=bf16, expert_parallel=1)
    model.to_empty(device=b.device)
    torch.manual_seed(0)
    init_weights(model)
    return Engine(model, model, _adamw(b, model))


def zero2(b: Bench) -> Engine:
    import deepspeed

    model = _eager(b)
    optimizer, scheduler = build_optimizer(model, b.optim)
    config = {
        "train_micro_batch_size_per_gpu": b.shape.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": b.device.type == "cuda"},
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,  # torch's AdamW with our parameter groups
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()  # clip, AdamW, schedule, zero the gradients

    return Engine(model, engine, step)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train(b: Bench, build: Callable[[], Engine]) -> dict:
    """`shape.steps` steps of the engine `build` makes, from the same seed on the same batches."""
    _free(b.device)
    mem, device, steps = b.memory, b.device, len(b.data)
    mem.reset()
    start = mem.now()
    engine = build()
    losses, times = [], []
    for i, batch in enumerate(b.data):
        if i == steps - 1:  # the last step's own peak, above what is held between steps
            run_peak, held = mem.peak(), mem.now()
            mem.reset()
        batch = batch.to(device)
        begin = time.perf_counter()
        with b.autocast():
            loss = engine.forward(batch[:, :-1], batch[:, 1:]).loss
        engine.step(loss)
        engine.model.update_moe_biases(i / steps)
        losses.append(loss.item())  # also synchronises
        times.append(time.perf_counter() - begin)
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"non-finite loss at step {i}")
    step_peak = mem.peak()
    del engine, loss
    step_s = statistics.median(times[b.shape.warmup :])
    return dict(
        step_s=step_s,
        tokens_per_s=b.shape.batch * b.shape.seq / step_s,
        first_steps_s=sum(times[: b.shape.warmup]),
        peak=max(run_peak, step_peak) - start,
        step_peak=step_peak - held,
        loss=statistics.fmean(losses[-b.shape.last :]),
        losses=losses,
        times=times,
    )


def chunked_ce(b: Bench, batch: torch.Tensor) -> tuple[dict, dict]:
    """One forward + backward of the model at vocab CE_VOCAB on `batch`, full logits vs
    `loss_chunk_size = shape.chunk`, same weights: (full, chunked). The peak is the step's above
    the weights and their (allocated, zeroed) gradients; a warm-up on one row comes first."""
    _free(b.device)
    model = _eager(b, b.cfg.with_vocab(CE_VOCAB))
    batch = batch.to(b.device)

    def fwd_bwd(rows: torch.Tensor) -> float:
        with b.autocast():
            loss = model(rows[:, :-1], rows[:, 1:]).loss
        loss.backward()
        return loss.item()

    out = []
    for chunk in (None, b.shape.chunk):
        model.loss_chunk_size = chunk
        fwd_bwd(batch[:1])
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        held = b.memory.now()
        b.memory.reset()
        begin = time.perf_counter()
        loss = fwd_bwd(batch)
        step_s = time.perf_counter() - begin
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        peak = b.memory.peak() - held
        out.append(dict(step_s=step_s, tokens_per_s=tokens / step_s, step_peak=peak, loss=loss))
    return out[0], out[1]


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _row(check: str, run: str, r: dict | None, base: dict | None = None, bound=None, err=None):
    """A table row: `r` against `base` (None: `r` is the check's baseline) under `bound`; `err`:
    why the run failed (a FAIL)."""
    row = dict(check=check, run=run, result="base" if base is None else "PASS", note="")
    if err is not None:
        row.update(result="FAIL", error=err, note=err)
    if r is None:
        return row
    row.update({k: r[k] for k in ("step_s", "tokens_per_s", "loss")})
    row.update(
        step_mib=r["step_peak"] / MIB, **({"peak_mib": r["peak"] / MIB} if "peak" in r else {})
    )
    if base is None or err is not None:
        return row
    row["speed_x"] = _ratio(r["tokens_per_s"], base["tokens_per_s"])
    if "peak" in r:
        row["peak_x"] = _ratio(r["peak"], base.get("peak", math.nan))
    row["step_x"] = _ratio(r["step_peak"], base["step_peak"])
    row["loss_rel"] = (r["loss"] - base["loss"]) / base["loss"]
    row.update(bound=bound, result="PASS" if abs(row["loss_rel"]) <= bound else "FAIL")
    return row


class Report:
    """The results so far (rows of the table, every run's numbers, failures), saved after each."""

    def __init__(self, save: Callable[[dict], None], **summary) -> None:
        self.save = save
        self.res = dict(**summary, rows=[], runs={}, failures=[])

    def add(self, row: dict) -> dict:
        if row["result"] == "FAIL":
            why = row.get("error") or f"loss {row['loss_rel']:+.1e} vs base, bound {row['bound']}"
            self.res["failures"].append(f"{row['check']} / {row['run']}: {why}")
        self.res["rows"].append(row)
        self.save(self.res)
        return row

    def train(self, check: str, run: str, b: Bench, build, base=None, bound=None) -> dict:
        """`train(b, build)` as the table's row against `base` (None: it is the baseline); an
        exception is a FAIL row: one broken path must not waste the GPU time."""
        begin = time.perf_counter()
        try:
            r, err = train(b, build), None
            self.res["runs"][run] = r
        except Exception as e:
            r, err = None, _failed(e)
        what = f"median step {r['step_s']:.3f} s" if r else f"FAILED {err}"
        print(f"  {check} / {run}: {what}, {time.perf_counter() - begin:.0f} s in all", flush=True)
        if base == {}:  # `_of(None)`: the baseline's run failed
            err = err or "no baseline to compare with: its run failed"
        return self.add(_row(check, run, r, base, bound, err))


def _failed(err: Exception) -> str:
    """The traceback, printed; one line for the table. Keeps no frame alive (their tensors)."""
    print("".join(traceback.format_exception(err)[-12:]), flush=True)
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def check_parallel(b: Bench, report: Report) -> dict | None:
    """1: DDP (the baseline of 1, 2, 3, 5) and FSDP2 with fp32 and bf16 parameters (the policy
    training uses under bf16: bf16 all-gathers, fp32 reduce). Returns DDP's run (None: failed)."""
    report.train(CHECKS[0], "DDP", b, lambda: ddp(b))
    base = report.res["runs"].get("DDP")
    fsdp = [("FSDP2, fp32 params", False, SAME_MATH), ("FSDP2, bf16 params", True, ROUNDING)]
    for name, bf16, bound in fsdp:
        row = report.train(CHECKS[0], name, b, lambda bf16=bf16: fsdp2(b, bf16), _of(base), bound)
        if base and name in report.res["runs"]:
            first = report.res["runs"][name]["losses"][0] - base["losses"][0]
            row["note"] = f"step-1 loss vs DDP {first:+.1e} (same init)"
    return base


def _of(base: dict | None) -> dict:
    """The baseline to compare with; {} (every comparison a FAIL) when its run failed."""
    return base if base is not None else {}


def check_checkpointing(b: Bench, report: Report, base: dict | None) -> None:
    """3: `memory.apply_activation_checkpointing` full / selective under DDP vs DDP's none."""
    for mode in ("full", "selective"):

        def checkpointed(model: CausalLM, mode: str = mode) -> None:
            memory.apply_activation_checkpointing(model, mode)

        run = f"AC {mode} (DDP)"
        report.train(CHECKS[2], run, b, lambda p=checkpointed: ddp(b, p), _of(base), SAME_MATH)


def check_chunked_ce(b: Bench, report: Report, batch: torch.Tensor) -> None:
    """4: the full-logits head vs the chunked one at V = CE_VOCAB: step peak and loss."""
    check, chunk, begin = CHECKS[3], b.shape.chunk, time.perf_counter()
    try:
        (full, chunked), err = chunked_ce(b, batch), None
        report.res["runs"].update(ce_full=full, ce_chunked=chunked)
    except Exception as e:
        full, chunked, err = None, None, _failed(e)
    what = f"step peak x{chunked['step_peak'] / full['step_peak']:.2f}" if chunked else err
    print(f"  {check}: {what}, {time.perf_counter() - begin:.0f} s in all", flush=True)
    report.add(_row(check, f"full logits, V={CE_VOCAB:,}", full, err=err))
    row = _row(check, f"chunked, {chunk} tokens a chunk", chunked, _of(full), CE_LOSS_BOUND, err)
    if chunked is not None:
        ok = row["result"] == "PASS" and row["step_x"] <= CE_MEMORY_BOUND
        row.update(result="PASS" if ok else "FAIL", bound=f"{CE_LOSS_BOUND:.0e}; mem <= 0.5x")
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        row["note"] = f"1 fwd+bwd of {tokens:,} tokens; step peak above weights + grads"
        if not ok:
            row["error"] = f"step peak x{row['step_x']:.2f}, loss {row['loss_rel']:+.1e}"
    report.add(row)


def check_compile(b: Bench, report: Report, base: dict | None) -> None:
    """2: `memory.compile_blocks` under DDP vs eager DDP; the compile time is what the first
    `warmup` steps took beyond as many compiled steps. Inductor on CUDA; on CPU aot_eager
    (inductor's C++ build takes minutes there)."""
    backend = "inductor" if b.device.type == "cuda" else "aot_eager"

    def compiled(model: CausalLM) -> None:
        memory.compile_blocks(model, backend=None if backend == "inductor" else backend)

    run = f"compile_blocks, {backend} (DDP)"
    row = report.train(CHECKS[1], run, b, lambda: ddp(b, compiled), _of(base), ROUNDING)
    r = report.res["runs"].get(run)
    if r:  # the first steps' time beyond as many steady compiled steps
        r["compile_s"] = r["first_steps_s"] - b.shape.warmup * r["step_s"]
        row["note"] = (
            f"compile ~{r['compile_s']:.1f} s: first {b.shape.warmup} steps took "
            f"{r['first_steps_s']:.1f} s (eager: {base['first_steps_s'] if base else math.nan:.1f} s)"
        )


def check_zero2(b: Bench, report: Report, base: dict | None) -> None:
    """5: DeepSpeed ZeRO-2 (bf16 weights on CUDA) vs DDP, when deepspeed imports."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        report.add(
            dict(check=CHECKS[4], run="DeepSpeed ZeRO-2", result="skipped", note=DEEPSPEED_SKIP)
        )
        return
    report.train(CHECKS[4], "DeepSpeed ZeRO-2", b, lambda: zero2(b), _of(base), BF16_WEIGHTS)


def run(device: torch.device, smoke: bool, windows: Callable, save: Callable[[dict], None]) -> dict:
    """Every check; `windows(steps, batch, seq)` draws the batches (gpu_check.batches); `save`
    gets the results so far after each run. Returns them: rows (the table), runs, failures."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape, cfg = SHAPES[smoke], model_config(smoke)
    b = Bench(cfg, shape, device, windows(shape.steps, shape.batch, shape.seq))
    with torch.device("meta"):
        params = CausalLM(cfg).num_params()
    fp = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(
        f"\nscaling: {params / 1e6:,.1f} M parameters, {shape.batch} x {shape.seq} tokens, "
        f"{shape.steps} steps a run ({shape.warmup} warm-up), {fp}, {device}",
        flush=True,
    )
    bounds = dict(same_math=SAME_MATH, rounding=ROUNDING, bf16_weights=BF16_WEIGHTS)
    bounds.update(ce_loss=CE_LOSS_BOUND, ce_memory=CE_MEMORY_BOUND)
    report = Report(save, params=params, shape=vars(shape), precision=fp, bounds=bounds)
    with process_group(device) as b.mesh:
        base = check_parallel(b, report)
        check_checkpointing(b, report, base)
        check_chunked_ce(b, report, windows(1, shape.ce_batch, shape.seq)[0])
        check_compile(b, report, base)  # last of the trainings: the longest to start
        check_zero2(b, report, base)
    report.res["rows"].sort(key=lambda row: CHECKS.index(row["check"]))
    save(report.res)
    return report.res


@contextlib.contextmanager
def process_group(device: torch.device):
    """World size 1 in this process, and its 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0")
    os.environ.update(env, WORLD_SIZE="1")  # all five: DeepSpeed looks for MPI without them
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh(device.type, (1,))
    finally:
        dist.destroy_process_group()


COLUMNS = [  # (header, the row's key)
    ("check", "check"), ("run", "run"), ("step s", "step_s"), ("tokens/s", "tokens_per_s"),
    ("tokens/s x base", "speed_x"), ("peak MiB", "peak_mib"), ("x base", "peak_x"),
    ("step peak MiB", "step_mib"), ("x base", "step_x"), ("loss", "loss"),
    ("Δ loss / base", "loss_rel"), ("bound", "bound"), ("PASS/FAIL", "result"), ("note", "note"),
]  # fmt: skip
FORMATS = {"step_s": "{:.3f}", "loss": "{:.4f}", "loss_rel": "{:+.1e}", "bound": "{:.0e}"}


def table(rows: list[dict]) -> str:
    """The rows as one markdown table. x base: the ratio to the check's baseline (DDP for 1, 2,
    3, 5; full logits for 4); Δ loss / base: (loss - the baseline's) / the baseline's."""

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a" if key in row else ""
        if isinstance(value, str):
            return value
        default = "{:.2f}" if key.endswith("_x") else "{:,.0f}"
        return FORMATS.get(key, default).format(value)

    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |"]
    lines.append("|---|---|" + "---:|" * 9 + "---|---|---|")
    lines += ["| " + " | ".join(cell(r, k) for _, k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
