"""CPU cost of FP8 emulation: process CPU time of one training step (forward, backward, AdamW)
of the CPU default model, per variant of the fp8_vs_bf16 sweep, relative to bf16.

    python experiments/fp8_vs_bf16/step_cost.py [--reps 5] [--threads 1]

CPU time of this process, not wall time, and the variants interleaved rep by rep: on a shared
machine other processes change the wall clock, much less the CPU time a step needs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tinyreason.model import CausalLM, ModelConfig
from tinyreason.training.optim import OptimConfig, build_optimizer
from tinyreason.training.precision import PrecisionConfig, apply_precision

CONF = Path(__file__).resolve().parents[2] / "conf"
VARIANTS = {
    "bf16": (PrecisionConfig("bf16"), "fp32"),
    "tensorwise": (PrecisionConfig("fp8", "tensorwise"), "fp32"),
    "rowwise": (PrecisionConfig("fp8", "rowwise"), "fp32"),
    "rowwise_with_gw_hp": (PrecisionConfig("fp8", "rowwise_with_gw_hp"), "fp32"),
    "blockwise": (PrecisionConfig("fp8_blockwise", "blockwise"), "fp32"),
    "deepseek_v3": (PrecisionConfig("fp8_blockwise", "blockwise"), "bf16"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "moe.yaml"))
    data_cfg = OmegaConf.load(CONF / "data" / "reasoning.yaml")
    model_cfg = {k: v for k, v in model_cfg.items() if k not in ("name", "init_from")}
    cfg = ModelConfig.from_dict({**model_cfg, "vocab_size": 4096, "max_seq_len": data_cfg.seq_len})
    batch = torch.randint(0, 4096, (data_cfg.batch_size, data_cfg.seq_len + 1))

    runs = {}
    for name, (precision, moments) in VARIANTS.items():
        torch.manual_seed(0)
        model = CausalLM(cfg)
        apply_precision(model, precision)
        optimizer, _ = build_optimizer(model, OptimConfig(moment_dtype=moments))
        runs[name] = (model, optimizer)

    def step(model, optimizer) -> float:
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start

    times = {name: [] for name in runs}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for name, (model, optimizer) in runs.items():
            seconds = step(model, optimizer)
            if rep:
                times[name].append(seconds)
    base = statistics.median(times["bf16"])
    print(
        f"{'variant':<20}{'CPU s/step':>11}{'x bf16':>8}   ({args.threads} thread(s), median of {args.reps})"
    )
    for name, t in times.items():
        print(f"{name:<20}{statistics.median(t):>11.3f}{statistics.median(t) / base:>8.2f}")


if __name__ == "__main__":
    main()
