"""`python -m tinyreason.bench memory [key=value ...]`: training-step throughput and peak memory of
activation checkpointing (none | full | selective) x torch.compile (off | on) per decoder block
(`tinyreason.training.memory`), as ratios to none / off.

The model is the composed training config's (overrides as for `tinyreason.train`; default the
CPU MoE shape of conf/model/moe.yaml with its MTP block, `data.batch_size` x `data.seq_len` =
8 x 512), fp32 or `--bf16` (autocast, fp32 weights). A step is forward + backward + AdamW + the
MoE bias update on random tokens. Each configuration runs in a fresh child process
(`python -m tinyreason.bench.memory --measure MODE,COMPILE`), same seed and batches: `--warmup`
steps (compilation, the optimizer state, lazily built kernels), then the baseline, then
`--repeats` rounds of `--steps` steps; tokens/s is the median round. The losses of every step
are compared with none / off's (checkpointing: 0; compile: float rounding), and "new graphs"
counts dynamo graphs built after the warm-up (0: no recompiles at fixed shapes).

Peak memory above the baseline (model, optimizer state, batches; gradients are freed before
it): `tinyreason.bench.ce.PeakMemory`. CUDA: `max_memory_allocated` after
`reset_peak_memory_stats`. CPU: the peak resident set size (`VmHWM`, reset through
/proc/self/clear_refs) minus the RSS at the baseline, with MALLOC_MMAP_THRESHOLD_=65536 in the
child so glibc maps every allocation >= 64 KiB on its own and unmaps it when freed: RSS follows
the live tensors. Absolute times on a shared machine are noise; the ratios are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from tinyreason.bench.ce import MIB, PeakMemory

# bench.common's clocks; not imported from there, which loads the whole config stack (seconds in
# every child process)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

MODES = ("none", "full", "selective")
SWITCH = {"off": False, "on": True}


def bench_spec(overrides: list[str]) -> dict:
    """The composed training config's model (MTP kept), batch size and sequence length."""
    from tinyreason.bench.common import compose_model
    from tinyreason.tokenizer import model_vocab_size
    from tinyreason.training.run_config import RunConfig

    _, tokenizer, cfg = compose_model(overrides)
    model = RunConfig.from_hydra(cfg).model_for(model_vocab_size(tokenizer))
    return dict(model=model.to_dict(), batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len)


def _graphs(compile: bool) -> int:
    """Dynamo graphs built so far in this process (none without compile)."""
    if not compile:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure(spec: dict, mode: str, compile: bool, args: argparse.Namespace) -> dict:
    """One configuration in this process: tokens/s per round, peak bytes, every step's loss."""
    from tinyreason.model import CausalLM, ModelConfig
    from tinyreason.training.memory import apply

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_dict(spec["model"])).to(device)
    apply(model, mode, compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    shape = (spec["batch_size"], spec["seq_len"] + 1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, shape, generator=gen).to(device) for _ in range(args.steps)]
    losses: list[float] = []

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_moe_biases(progress=0.0)
        losses.append(loss.item())  # synchronises on CUDA

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    graphs = _graphs(compile)
    peak = PeakMemory(device)
    peak.reset()
    clock, rounds = CLOCKS[args.clock], []
    for _ in range(args.repeats):
        start = clock()
        for x in batches:
            step(x)
        rounds.append(len(batches) * (shape[1] - 1) * shape[0] / (clock() - start))
    return dict(
        tokens_per_s=statistics.median(rounds),
        rounds=rounds,
        peak=peak.peak(),
        losses=losses,
        new_graphs=_graphs(compile) - graphs,
    )


def run_child(spec: dict, mode: str, compile: bool, args: argparse.Namespace) -> dict:
    """`measure` in a fresh `python -m tinyreason.bench.memory --measure mode,on|off` process."""
    argv = [sys.executable, "-m", "tinyreason.bench.memory", "--measure", f"{mode},{compile}"]
    argv += ["--spec", json.dumps(spec), "--device", args.device, "--clock", args.clock]
    for key in ("steps", "repeats", "warmup", "threads"):
        if getattr(args, key) is not None:
            argv += [f"--{key}", str(getattr(args, key))]
    argv += ["--bf16"] if args.bf16 else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench memory child {mode}, compile {compile} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(spec: dict, rows: list[dict], args: argparse.Namespace) -> str:
    """A markdown table: tokens/s and peak memory, both also as ratios to the first row."""
    m, base = spec["model"], rows[0]
    lines = [
        f"model: {m['num_layers']} layers + {m['mtp']['depth']} MTP, hidden {m['hidden_size']}, "
        f"vocab {m['vocab_size']}, {(m.get('moe') or {}).get('num_experts', 0)} routed experts; "
        f"{spec['batch_size']} x {spec['seq_len']} tokens/step, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.device}, "
        f"{torch.get_num_threads() if args.threads is None else args.threads} threads, "
        f"{args.clock} clock; {args.repeats} rounds of {args.steps} steps after {args.warmup}",
        "",
        f"| checkpointing | compile | tokens/s (median) | vs {base['mode']} / "
        f"{base['compile']} | peak memory (MiB) | vs {base['mode']} / {base['compile']} "
        "| max abs loss diff | new graphs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        lines.append(
            f"| {r['mode']} | {r['compile']} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['peak'] / MIB:,.1f} | "
            f"{r['peak'] / base['peak']:.2f}x | {diff:.1e} | {r['new_graphs']} |"
        )
    how = "max_memory_allocated" if args.device.startswith("cuda") else "VmHWM - baseline RSS"
    lines.append(f"\npeak memory: above the baseline, by {how} (module docstring)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tinyreason.bench memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    parser.add_argument("--checkpointing", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--compile", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (compile)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="what a second is")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child: MODE,True|False
    parser.add_argument("--spec", help=argparse.SUPPRESS)  # the child: bench_spec's JSON
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        mode, compile = args.measure.split(",")
        print(json.dumps(measure(json.loads(args.spec), mode, compile == "True", args)))
        return
    modes, switches = args.checkpointing.split(","), args.compile.split(",")
    for value, allowed, key in ((modes, MODES, "checkpointing"), (switches, SWITCH, "compile")):
        if not value or not set(value) <= set(allowed):
            raise ValueError(f"--{key} takes a comma-separated subset of {list(allowed)}")
    spec = bench_spec(args.overrides)
    rows = []
    for switch in switches:  # the first row is the baseline of the ratios
        for mode in modes:
            row = run_child(spec, mode, SWITCH[switch], args)
            rows.append(dict(row, mode=mode, compile=switch))
    print(report(spec, rows, args))
    for r in rows:
        print(
            f"{r['mode']} / compile {r['compile']}: rounds (tokens/s) "
            + ", ".join(f"{v:,.0f}" for v in r["rounds"])
        )


if __name__ == "__main__":
    main()
