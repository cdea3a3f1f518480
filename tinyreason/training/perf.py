"""Peak FLOP/s for MFU: the data-sheet bf16 peak of known GPUs, else a matmul timed here."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tinyreason.model.layers import linear

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, by device-name substring
# (first match wins); the convention of nanochat and torchtitan for GPU MFU.
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}


def matmul_flops(
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    n: int = 2048,
    reps: int = 3,
) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` timed here: the median of `reps` after a warm-up,
    for torch's `a @ b` and for our `layers.linear` (which takes oneDNN for fp32 on CPU, where
    torch's MKL can be half as fast); the faster of the two."""
    device = torch.device(device)
    n = _affordable_size(dtype, device, n)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for matmul in (torch.matmul, linear):
        times = []
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock() - start)
        best = max(best, 2 * n**3 / sorted(times[1:])[reps // 2])
    return best


def _affordable_size(dtype: torch.dtype, device: torch.device, n: int) -> int:
    """n, halved until one matmul takes under ~0.2 s: a CPU without native bf16 (AVX2 only) runs
    bf16 GEMMs at ~1 GFLOP/s, where 2048^3 would hold the start of a run for minutes."""
    if device.type != "cpu":
        return n
    probe = torch.randn(256, 256, dtype=dtype)
    probe @ probe  # warm-up
    start = time.perf_counter()
    probe @ probe
    rate = 2 * 256**3 / max(time.perf_counter() - start, 1e-9)
    while n > 256 and 2 * n**3 / rate > 0.2:
        n //= 2
    return n


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """What MFU divides by: the data-sheet bf16 peak of a known GPU, else (CPU, other GPUs) the
    measured `matmul_flops` in `dtype`: on CPU, the rate torch's own GEMM reaches here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK_FLOPS.items():
            if key in name:
                return flops
    return matmul_flops(dtype, device)
