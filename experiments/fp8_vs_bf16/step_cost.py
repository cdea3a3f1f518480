"""CPU cost of FP8 emulation: process CPU time of one training step (forward, backward, AdamW)
of the CPU default model, per variant of the fp8_vs_bf16 sweep, relative to bf16.

    python experiments/fp8_vs_bf16/step_cost.py [--reps 5] [--threads 1]

The model, batch shape and vocabulary are those of `experiment=fp8_vs_bf16` (composed with Hydra);
each variant adds its overrides (`VARIANTS`, the names of the README's table). CPU time of this
process, not wall time, and the variants interleaved rep by rep: on a shared machine other
processes change the wall clock, much less the CPU time a step needs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import DictConfig, OmegaConf

from tinyreason.compose import compose
from tinyreason.model import CausalLM, ModelConfig
from tinyreason.training.optim import OptimConfig, build_optimizer
from tinyreason.training.precision import PrecisionConfig, apply_precision

# name: (precision option, AdamW moment dtype), the overrides of the sweep's runs (seed 0)
VARIANTS = {
    "bf16": ("bf16", "fp32"),
    "tensorwise": ("fp8", "fp32"),
    "rowwise": ("fp8_rowwise", "fp32"),
    "rowwise_with_gw_hp": ("fp8_rowwise_with_gw_hp", "fp32"),
    "blockwise": ("fp8_blockwise", "fp32"),
    "deepseek_v3": ("fp8_blockwise", "bf16"),
}


def variant_config(name: str) -> DictConfig:
    """The config of `python -m tinyreason.train experiment=fp8_vs_bf16` for that variant."""
    precision, moments = VARIANTS[name]
    overrides = [
        "experiment=fp8_vs_bf16",
        f"precision={precision}",
        f"optim.moment_dtype={moments}",
    ]
    return compose("train", overrides)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = variant_config("bf16")  # model, data shape and vocabulary: the same for every variant
    model_cfg = OmegaConf.to_container(base.model, resolve=True)
    model_cfg = {k: v for k, v in model_cfg.items() if k not in ("name", "init_from")}
    vocab, seq_len = base.tokenizer.vocab_size, base.data.seq_len
    cfg = ModelConfig.from_dict({**model_cfg, "vocab_size": vocab, "max_seq_len": seq_len})
    batch = torch.randint(0, vocab, (base.data.batch_size, seq_len + 1))

    runs = {}
    for name in VARIANTS:
        variant = variant_config(name)
        torch.manual_seed(0)
        model = CausalLM(cfg)
        apply_precision(model, PrecisionConfig(**OmegaConf.to_container(variant.precision)))
        optimizer, _ = build_optimizer(model, OptimConfig(moment_dtype=variant.optim.moment_dtype))
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
