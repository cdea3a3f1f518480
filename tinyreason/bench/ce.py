"""`python -m tinyreason.bench ce [--vocab V --tokens N --hidden D --chunk C]`: peak memory and
time of one forward + backward of the output head + cross-entropy, (a) full logits [N, V] then
F.cross_entropy vs (b) the chunked head (`tinyreason.model.loss.OutputHead` with targets).

Inputs: h [N, D] and the head's weight [V, D] (fp32, both requiring grad), random targets. Each
head runs in a fresh child process (`python -m tinyreason.bench.ce --measure full|chunked`), so
the peaks do not mix: a warm-up on 64 rows (libraries and kernels loaded), then the baseline,
then `--repeats` forward + backward steps (gradients freed before each, so every step allocates
the same), timed; the time is their median.

Peak memory above the baseline, which holds the inputs:
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
  `memory_allocated()` then (the caching allocator's tensors, not its reserve).
- CPU: the peak resident set size, `VmHWM` of /proc/self/status, after writing 5 to
  /proc/self/clear_refs (Linux >= 4.0), which resets VmHWM to the current RSS: the baseline. The
  child runs with MALLOC_MMAP_THRESHOLD_=65536, so glibc serves every allocation of 64 KiB or
  more from its own mmap and unmaps it when freed: RSS then follows the live tensors, and memory
  freed by one step and reused by the next cannot hide in the baseline. (`ru_maxrss` cannot be
  reset: it would count the process's past.)

Default chunk 512 tokens: a chunk's fp32 logits are then C x V x 4 B = 311 MB at V = 151,936,
the size of the weight gradient [V, D] that every head pays anyway at D = 512, so the peak stays
within ~2x of that floor, while each chunk's GEMM still has 512 rows (no loss of GEMM speed);
a chunk as large as the 2,048 tokens would hold the whole 1.2 GB of logits at once again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tinyreason.model.loss import OutputHead

PATHS = {"full": "full logits + F.cross_entropy", "chunked": "chunked head"}
MIB = 2**20


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class PeakMemory:
    """Bytes allocated at the peak above the moment `reset()` was called (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _rss_kib("VmHWM") * 1024 - self.base


def measure(
    path: str, vocab: int, tokens: int, hidden: int, chunk: int, repeats: int, device: str
) -> dict:
    """One head's peak memory (bytes), step times (s) and mean CE, in this process."""
    dev = torch.device(device)
    gen = torch.Generator(dev).manual_seed(0)
    h_ND = torch.randn(tokens, hidden, device=dev, generator=gen).requires_grad_()
    head = OutputHead(hidden, vocab).to(dev)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=gen)
    targets_N = torch.randint(0, vocab, (tokens,), device=dev, generator=gen)

    def step(rows: int) -> float:
        h_ND.grad = head.weight.grad = None
        if path == "full":
            loss = F.cross_entropy(head(h_ND[:rows]).float(), targets_N[:rows])
        else:
            total, count = head(h_ND[:rows], targets_N[:rows], chunk)
            loss = total / count.clamp(min=1)
        loss.backward()
        return loss.item()  # synchronises on CUDA

    step(min(64, tokens))  # warm-up
    memory = PeakMemory(dev)
    memory.reset()
    times, loss = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step(tokens)
        times.append(time.perf_counter() - start)
    return dict(peak=memory.peak(), times=times, loss=loss)


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        what = torch.cuda.get_device_name(device)
    else:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        what = names[0] if names else platform.processor()
        what += f", {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}"


def run_child(path: str, args: argparse.Namespace) -> dict:
    """`measure` in a fresh `python -m tinyreason.bench.ce --measure path` process."""
    argv = [sys.executable, "-m", "tinyreason.bench.ce", "--measure", path]
    for key in ("vocab", "tokens", "hidden", "chunk", "repeats", "device", "threads"):
        if getattr(args, key) is not None:
            argv += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench ce child {path} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    """A markdown table of both heads, their ratios to the full one, the loss difference."""
    full = results["full"]
    lines = [
        f"vocab {args.vocab:,}, tokens {args.tokens:,}, hidden {args.hidden}, chunk {args.chunk}"
        f" tokens, fp32, {args.repeats} steps each; {_machine(args.device)}",
        "",
        "| head | peak memory (MiB) | vs full | fwd+bwd median (s) | vs full | mean CE |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, r in results.items():
        time_s = statistics.median(r["times"])
        lines.append(
            f"| {PATHS[path]} | {r['peak'] / MIB:,.0f} | {r['peak'] / full['peak']:.2f}x | "
            f"{time_s:.3f} | {time_s / statistics.median(full['times']):.2f}x | {r['loss']:.8f} |"
        )
    diff = results["chunked"]["loss"] - full["loss"]
    lines.append(f"\nmean CE chunked - full = {diff:.1e} (relative {diff / full['loss']:.1e})")
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM"
    lines.append(f"peak memory: above the inputs, by {how} (`tinyreason.bench.ce` docstring)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tinyreason.bench ce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vocab", type=int, default=151_936, help="V (Qwen's vocabulary)")
    parser.add_argument("--tokens", type=int, default=2_048, help="N, the rows of h")
    parser.add_argument("--hidden", type=int, default=512, help="D")
    parser.add_argument("--chunk", type=int, default=512, help="tokens a chunk (see above)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per head")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--measure", choices=list(PATHS), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        keys = ("vocab", "tokens", "hidden", "chunk", "repeats", "device")
        print(json.dumps(measure(args.measure, *(getattr(args, k) for k in keys))))
        return
    print(report({path: run_child(path, args) for path in PATHS}, args))


if __name__ == "__main__":
    main()
