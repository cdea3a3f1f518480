"""`python -m tinyreason.bench moe [key=value ...]`: training-step throughput of our MoE model vs
transformers' `DeepseekV3ForCausalLM` built from the same config, in fp32 and bf16, in one process.
(`python -m tinyreason.bench generate --help`: sampling speed, see `tinyreason.bench_generate`.)

A step is forward + backward + AdamW step on a fresh batch of random tokens (`data.batch_size` x
`data.seq_len` of the composed training config; overrides as for `tinyreason.train`). Both models
get our initial weights (the logit difference is printed as a check), the same torch AdamW
(fused), and the same precision: fp32, or bf16 = our `bf16-mixed` (fp32 master weights, bf16
autocast). transformers runs its fastest experts implementation here (each is tried on a MoE
layer first). MTP is off in both (transformers does not train it). The first MoE layer of each
model is also timed alone (forward + backward on random hidden states): that isolates the
DeepSeekMoE implementation from attention, norms and the output head, which both share.

Configurations are timed in turn, `--repeats` rounds of `--steps` steps each, and the median round
is reported: absolute times on a shared machine are noise; ratios measured this way are what to
quote. MFU = tokens/s x model FLOPs per token (`flops.flops_per_token`) / peak, where the peak
is the faster of torch's and our (`layers.linear`: oneDNN for fp32 on CPU) 2048^3 matmul, timed in
the same process and dtype (`perf.matmul_flops`).
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from torch import nn

from tinyreason.bench.common import CLOCKS, compose_model
from tinyreason.model import CausalLM, ModelConfig
from tinyreason.model.flops import flops_per_token
from tinyreason.training.perf import matmul_flops

log = logging.getLogger(__name__)

HF_EXPERTS = ("grouped_mm", "batched_mm", "eager")


def bench_config(overrides: list[str]) -> tuple[ModelConfig, int, int]:
    """The composed training config's model (MTP off; the vocabulary of its tokenizer, trained
    and cached as by `tinyreason.prepare` if needed), batch size and sequence length."""
    model, _, cfg = compose_model(overrides)
    return model, cfg.data.batch_size, cfg.data.seq_len


def build_models(config: ModelConfig) -> tuple[CausalLM, nn.Module]:
    """Ours and transformers', with the same weights."""
    from transformers import DeepseekV3ForCausalLM

    from tinyreason.model.hf import fuse_experts, to_hf_config, to_hf_state_dict

    torch.manual_seed(0)
    ours = CausalLM(config)
    theirs = DeepseekV3ForCausalLM(to_hf_config(config))
    missing, unexpected = theirs.load_state_dict(fuse_experts(to_hf_state_dict(ours)), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, theirs


class Run:
    """One thing to time in one precision. `step(i)` = forward + backward (+ optimizer step for a
    whole model) on the i-th input: a token batch for a model, hidden states for a MoE layer."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        bf16: bool,
        ours: bool,
        inputs: list,
        clock: str = "wall",
    ) -> None:
        self.name, self.module, self.bf16, self.ours, self.inputs = name, module, bf16, ours, inputs
        self.clock = CLOCKS[clock]
        self.is_model = isinstance(module, CausalLM) or hasattr(module, "lm_head")
        self.optimizer = (
            torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True) if self.is_model else None
        )

    def step(self, i: int) -> None:
        x = self.inputs[i]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if not self.is_model:  # a MoE layer: ours returns (output, balance loss)
                out = self.module(x)
                loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
            elif self.ours:
                loss = self.module(x[:, :-1], x[:, 1:]).loss
            else:  # transformers shifts the labels itself
                loss = self.module(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad()
        else:
            self.module.zero_grad()
        if self.ours and self.is_model:
            self.module.update_moe_biases(progress=0.0)
        elif self.ours:
            self.module.update_bias(1e-3)

    def tokens_per_s(self) -> float:
        start = self.clock()
        for i in range(len(self.inputs)):
            self.step(i)
        tokens = sum(
            x.shape[0] * x.shape[1] - (x.shape[0] if self.is_model else 0) for x in self.inputs
        )
        return tokens / (self.clock() - start)


def fastest_hf_experts(
    theirs: nn.Module, bf16: bool, hidden: list, clock: str = "wall"
) -> tuple[str, dict[str, float]]:
    """transformers' experts implementation with the highest MoE-layer tokens/s here."""
    layer = theirs.model.layers[theirs.config.first_k_dense_replace].mlp
    speeds: dict[str, float] = {}
    for impl in HF_EXPERTS:
        theirs.set_experts_implementation(impl)
        run = Run(impl, layer, bf16, ours=False, inputs=hidden[:1], clock=clock)
        run.step(0)  # warm-up
        speeds[impl] = max(run.tokens_per_s() for _ in range(2))
    best = max(speeds, key=speeds.get)
    theirs.set_experts_implementation(best)
    return best, speeds


def bench_moe(
    overrides: list[str],
    steps: int,
    repeats: int,
    with_loop: bool = False,
    hf_experts: str | None = None,
    clock: str = "wall",
) -> list[dict]:
    """Rows of `report`; `hf_experts` fixes transformers' experts implementation (else the
    fastest here)."""
    config, batch_size, seq_len = bench_config(["model=moe", *overrides])
    ours, theirs = build_models(config)
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=gen)
        for _ in range(steps)
    ]
    hidden = [
        torch.randn(batch_size, seq_len, config.hidden_size, generator=gen) for _ in range(steps)
    ]
    with torch.no_grad():
        diff = (ours(batches[0][:, :-1]).logits - theirs(batches[0][:, :-1]).logits).abs().max()
    print(
        f"config: {config.num_layers} layers, hidden {config.hidden_size}, {config.moe.num_experts}"
        f" experts top-{config.moe.num_experts_per_tok}, vocab {config.vocab_size}, "
        f"{batch_size} x {seq_len} tokens/step, {torch.get_num_threads()} threads, {clock} clock; "
        f"max |logit diff| ours vs transformers (fp32) = {diff:.1e}"
    )
    layer = config.num_dense_layers  # the first MoE layer of each model
    flops = flops_per_token(ours, seq_len)
    least_flops = flops_per_token(ours, seq_len, causal=True)  # for the ceiling
    rows = []
    for dtype_name, bf16 in (("fp32", False), ("bf16", True)):
        if hf_experts is None:
            impl, speeds = fastest_hf_experts(theirs, bf16, hidden, clock)
            tried = ", ".join(f"{k} {v:,.0f}" for k, v in speeds.items())
            print(
                f"{dtype_name}: transformers experts implementations, MoE layer tokens/s: {tried}"
            )
        else:
            impl = hf_experts
            theirs.set_experts_implementation(impl)
        runs = [
            Run("ours", ours, bf16, True, batches, clock),
            Run(f"transformers ({impl})", theirs, bf16, False, batches, clock),
            Run("ours: MoE layer", ours.layers[layer].mlp, bf16, True, hidden, clock),
            Run(
                "transformers: MoE layer",
                theirs.model.layers[layer].mlp,
                bf16,
                False,
                hidden,
                clock,
            ),
        ]
        if with_loop:
            loop = CausalLM(config)
            loop.load_state_dict(ours.state_dict())
            for moe in loop.moe_layers():
                moe.experts.forward = moe.experts.reference
            runs.append(Run("ours, per-expert loop", loop, bf16, True, batches, clock))
        for run in runs:
            run.step(0)  # warm-up
        measured: dict[str, list[float]] = {run.name: [] for run in runs}
        peaks = []
        dtype = torch.bfloat16 if bf16 else torch.float32
        for _ in range(repeats):  # interleaved, so that load from other users hits all alike
            peaks.append(matmul_flops(dtype, clock=CLOCKS[clock]))
            for run in runs:
                measured[run.name].append(run.tokens_per_s())
        peak = statistics.median(peaks)
        for run in runs:
            tps = statistics.median(measured[run.name])
            rows.append(
                dict(
                    dtype=dtype_name,
                    what="training step" if run.is_model else "MoE layer fwd+bwd",
                    model=run.name,
                    tokens_per_s=tps,
                    mfu=tps * flops / peak if run.is_model else None,
                    # the share of the peak the least causal work takes at this speed
                    busy=tps * least_flops / peak if run.is_model else None,
                    peak_gflops=peak / 1e9,
                    rounds=measured[run.name],
                )
            )
    return rows


def report(rows: list[dict]) -> str:
    """A markdown table: tokens/s, ours / transformers for the same thing and dtype, MFU."""
    theirs = {
        (r["dtype"], r["what"]): r["tokens_per_s"]
        for r in rows
        if r["model"].startswith("transformers")
    }
    lines = [
        "| dtype | timed | model | tokens/s (median) | ours / transformers | MFU |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / theirs[r["dtype"], r["what"]]
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {r['dtype']} | {r['what']} | {r['model']} | {r['tokens_per_s']:,.0f} | "
            f"{ratio:.2f}x | {mfu} |"
        )
    # Any implementation of the same model does at least the same FLOPs (causal attention
    # halved), so if all of them ran at the rate of torch's own big matmul here, ours would be
    # 1 / (transformers' share of that rate) faster than transformers, and no more.
    ceilings = [
        f"{r['dtype']} {1 / r['busy']:.2f}x"
        for r in rows
        if r["model"].startswith("transformers") and r["busy"]
    ]
    lines.append(
        "\nceiling of ours / transformers if every FLOP (causal attention halved) ran at the "
        "matmul peak: " + ", ".join(ceilings)
    )
    ours = {r["dtype"]: r["tokens_per_s"] for r in rows if r["model"] == "ours"}
    peaks = {r["dtype"]: r["peak_gflops"] for r in rows}
    lines.append(
        f"ours bf16 / ours fp32 = {ours['bf16'] / ours['fp32']:.2f}x; matmul peak "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tinyreason.bench moe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--with-loop", action="store_true", help="also time the reference loop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="what a second is")
    parser.add_argument(
        "--hf-experts", choices=HF_EXPERTS, default=None, help="default: the fastest here"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows = bench_moe(
        args.overrides, args.steps, args.repeats, args.with_loop, args.hf_experts, args.clock
    )
    print(report(rows))
    for r in rows:
        print(
            f"{r['dtype']} {r['model']}: rounds (tokens/s) "
            + ", ".join(f"{v:,.0f}" for v in r["rounds"])
        )


if __name__ == "__main__":
    main()
