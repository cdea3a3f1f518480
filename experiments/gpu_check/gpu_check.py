"""Hopper GPU checks: FP8 with real kernels for every recipe on a ~1B-parameter DeepSeek-V3-style
model (here), scaling out and memory on one GPU (scaling.py: FSDP2 vs DDP, compile,
activation checkpointing, chunked cross-entropy, DeepSpeed ZeRO-2), and decoding with the step
compiled into CUDA graphs vs eager (decode.py).

    PYTHONPATH=. python experiments/gpu_check/gpu_check.py                   # H100 / H200 (README.md)
    PYTHONPATH=. python experiments/gpu_check/gpu_check.py --checks scaling  # only scaling.py's
    PYTHONPATH=. python experiments/gpu_check/gpu_check.py --smoke           # tiny models, any device

(from the repository root; or `pip install -e .` first and drop PYTHONPATH)

FP8: for bf16 and each FP8 recipe (torchao tensorwise, rowwise, rowwise_with_gw_hp; DeepSeek-V3
blockwise) it trains the same model from the same init on the same batches (bytes of the embedded
reasoning corpus) for --steps optimizer steps, and prints per recipe: the median step time, its
ratio to bf16, tokens/s, MFU (model FLOPs per token x tokens/s over the GPU's dense bf16 peak) and
the mean loss of the last 20 steps with its relative difference to bf16, checked against
LOSS_BOUND. The FP8 runs must use the GPU's FP8 kernels (the script refuses emulation unless
--smoke). Scaling: one markdown table (scaling.py). Both go into results.json (FP8 at the top
level, scaling under "scaling"), rewritten after each run; exit status 1 if any run fails or
misses its bound. Imports torch, tinyreason's model / training code, torchao (FP8 only) and, for
scaling, Lightning (through tinyreason.training.parallel); no Hydra or data pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import decode  # beside this file (sys.path[0] when run as a script)
import scaling
import torch

from tinyreason.data.synthetic import CorpusConfig, format_text, generate
from tinyreason.model import CausalLM, MLAConfig, ModelConfig, MoEConfig, MTPConfig
from tinyreason.model.flops import flops_per_token
from tinyreason.training.optim import OptimConfig, build_optimizer
from tinyreason.training.perf import GPU_BF16_PEAK_FLOPS
from tinyreason.training.precision import PrecisionConfig, apply_precision

# |mean loss of the last 20 steps, FP8 - bf16| / bf16. DeepSeek-V3 reports < 0.25% after long
# training; 200 steps from scratch are noisier (the CPU experiment fp8_vs_bf16 measured < 0.5%).
LOSS_BOUND = 0.01
CHECKS = ("fp8", "scaling", "decode")  # --checks: FP8 recipes here, scaling.py's, decode.py's
RUNS = [
    ("bf16", None),
    ("fp8", "tensorwise"),
    ("fp8", "rowwise"),
    ("fp8", "rowwise_with_gw_hp"),
    ("fp8_blockwise", "blockwise"),
]


def model_config(smoke: bool) -> ModelConfig:
    """~1B parameters (0.3 B active per token); every GEMM dim a multiple of 128 except
    kv_a_proj_with_mqa (512 + 64 rows, as in DeepSeek-V3), which the blockwise kernel leaves in
    bf16. --smoke: a model of a few M parameters with the same structure."""
    if smoke:
        mla = MLAConfig(
            num_heads=2,
            q_lora_rank=64,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        )
        moe = MoEConfig(
            num_experts=8,
            num_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            num_groups=2,
            topk_groups=1,
        )
        dims = dict(vocab_size=512, hidden_size=128, num_layers=2, intermediate_size=256)
        return ModelConfig(
            **dims,
            attention=mla,
            moe=moe,
            max_seq_len=64,
            num_dense_layers=1,
            mtp=MTPConfig(depth=1),
        )
    mla = MLAConfig(
        num_heads=12,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    moe = MoEConfig(
        num_experts=32,
        num_shared_experts=1,
        num_experts_per_tok=4,
        moe_intermediate_size=768,
        num_groups=8,
        topk_groups=4,
    )
    dims = dict(vocab_size=32768, hidden_size=1536, num_layers=8, intermediate_size=4096)
    return ModelConfig(
        **dims, attention=mla, moe=moe, max_seq_len=2048, num_dense_layers=1, mtp=MTPConfig(depth=1)
    )


def corpus_bytes(num_docs: int) -> torch.Tensor:
    """Byte-level tokens (ids 0..255) of the embedded corpus: needs no tokenizer."""
    problems = generate(CorpusConfig(num_train=num_docs, num_val=1, num_test=1), "train")
    text = "\n\n".join(format_text(p) for p in problems).encode()
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def batches(data: torch.Tensor, steps: int, batch: int, seq: int) -> list[torch.Tensor]:
    """The same random windows of seq + 1 tokens for every run."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - seq - 1, (steps, batch), generator=g)
    return [torch.stack([data[s : s + seq + 1] for s in row.tolist()]) for row in starts]


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        return float("nan"), "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_BF16_PEAK_FLOPS.items():  # the data sheets' dense bf16 peaks
        if key in name:
            return peak, f"{name}, dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    return float("nan"), f"{name}: unknown peak"


def measured_matmul_tflops(device: torch.device) -> float:
    """bf16 8192^3 products per second: what this GPU's GEMMs reach (the MFU ceiling in practice)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def train(name, recipe, cfg, data, args, device) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(cfg)
    # emulate=False: apply_precision raises unless the GPU has the recipe's FP8 kernels
    precision = PrecisionConfig(name, recipe, emulate=True if args.smoke else None)
    if recipe and not args.smoke:
        precision = PrecisionConfig(name, recipe, emulate=False)
    converted = apply_precision(model, precision)
    if args.compile:
        for block in [*model.layers, *(m.block for m in model.mtp)]:
            block.compile()
    optim = OptimConfig(lr=args.lr, warmup_steps=min(20, args.steps // 5), total_steps=args.steps)
    optimizer, scheduler = build_optimizer(model, optim)
    losses, times = [], []
    for step, batch in enumerate(data):
        batch = batch.to(device, non_blocking=True)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_moe_biases(step / args.steps)
        losses.append(out.loss.item())  # also synchronises: the step is done
        times.append(time.perf_counter() - start)
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"non-finite loss at step {step}")
    step_s = statistics.median(times[min(10, len(times) // 2) :])  # after warm-up / compilation
    tokens = data[0].shape[0] * (data[0].shape[1] - 1)
    result = {
        "precision": name,
        "recipe": recipe or "-",
        "fp8_modules": len(converted),
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "flops_per_token": flops_per_token(model, data[0].shape[1] - 1),
        "loss_last20": statistics.fmean(losses[-20:]),
        "losses": losses,
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0,
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def fp8_check(args, device: torch.device, corpus: torch.Tensor, peak: float) -> dict:
    """bf16 and every FP8 recipe (RUNS): prints their table; returns params, bound, runs and
    failures (results.json's top-level keys, as before `--checks`)."""
    from tinyreason.training import fp8  # torchao: only this part needs it

    if not args.smoke and not fp8.kernels_available("blockwise"):
        why = "fp8: needs a Hopper GPU (compute capability 9.0) for the FP8 kernels; --smoke runs anywhere"
        print(why)
        return {"failures": [why]}
    cfg = model_config(args.smoke)
    n_params = CausalLM(cfg).num_params() if args.smoke else _num_params_meta(cfg)
    print(
        f"model: {n_params / 1e9:.2f} B parameters, batch {args.batch} x {args.seq} tokens, {args.steps} steps"
    )
    data = batches(corpus, args.steps, args.batch, args.seq)
    wanted = None if args.recipes == "all" else set(args.recipes.split(","))
    results, failures = [], []
    for name, recipe in RUNS:
        if wanted is not None and recipe is not None and recipe not in wanted:
            continue
        try:
            results.append(train(name, recipe, cfg, data, args, device))
        except Exception as err:  # report and go on: one broken recipe must not waste the GPU time
            failures.append(f"{recipe or name}: {type(err).__name__}: {err}")
            print(f"FAILED {failures[-1]}")
    base = results[0] if results and results[0]["precision"] == "bf16" else None
    print(
        f"\n{'recipe':<20}{'FP8 mods':>9}{'step s':>9}{'x bf16':>8}{'tok/s':>10}{'MFU':>7}{'loss':>9}{'vs bf16':>9}  bound"
    )
    for r in results:
        ratio = r["step_s"] / base["step_s"] if base else float("nan")
        diff = (
            (r["loss_last20"] - base["loss_last20"]) / base["loss_last20"] if base else float("nan")
        )
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        r["ratio_to_bf16"], r["loss_rel_diff"] = ratio, diff
        ok = r is base or abs(diff) <= LOSS_BOUND
        if not ok:
            failures.append(f"{r['recipe']}: loss {diff:+.2%} vs bf16, bound {LOSS_BOUND:.0%}")
        print(
            f"{r['recipe'] if r['recipe'] != '-' else 'bf16':<20}{r['fp8_modules']:>9}{r['step_s']:>9.3f}"
            f"{ratio:>8.2f}{r['tokens_per_s']:>10.0f}{r['mfu']:>7.1%}{r['loss_last20']:>9.4f}"
            f"{diff:>+9.2%}  {'PASS' if ok else 'FAIL'}"
        )
    return {"params": n_params, "bound": LOSS_BOUND, "runs": results, "failures": failures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checks", default="fp8,scaling,decode", help="comma list of: " + ", ".join(CHECKS)
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--recipes", default="all", help="comma list of recipes to run, or all")
    parser.add_argument("--smoke", action="store_true", help="tiny model, emulation allowed")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for results.json")
    args = parser.parse_args()
    checks = args.checks.split(",")
    if not checks or not set(checks) <= set(CHECKS):
        parser.error(f"--checks={args.checks!r}: a comma list of {list(CHECKS)}")
    if args.smoke:
        args.steps, args.batch, args.seq = min(args.steps, 24), 2, 64
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_note = peak_flops(device)
    print(f"device: {peak_note}; measured bf16 matmul {measured_matmul_tflops(device):.0f} TFLOP/s")
    corpus = corpus_bytes(400 if args.smoke else 60000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": peak_note, "args": vars(args)}

    def failed() -> list[str]:
        parts = summary.get("errors", []) + summary.get("fp8_failures", [])
        parts += summary.get("decode", {}).get("failures", [])
        return parts + summary.get("scaling", {}).get("failures", [])

    def save(scaling_so_far: dict | None = None) -> None:
        if scaling_so_far is not None:
            summary["scaling"] = scaling_so_far
        (out / "results.json").write_text(json.dumps({**summary, "failures": failed()}, indent=1))

    def fp8_part() -> None:
        fp8_results = fp8_check(args, device, corpus, peak)
        summary["fp8_failures"] = fp8_results.pop("failures")
        summary.update(fp8_results)

    def scaling_part() -> None:
        windows = lambda steps, batch, seq: batches(corpus, steps, batch, seq)
        print("\n" + scaling.table(scaling.run(device, args.smoke, windows, save)["rows"]))

    def decode_part() -> None:
        summary["decode"] = decode.run(device, args.smoke)
        print("\n" + decode.table(summary["decode"]["rows"]))

    for check, part in (("fp8", fp8_part), ("scaling", scaling_part), ("decode", decode_part)):
        if check in checks:
            try:
                part()
            except Exception as err:  # a broken part (an import, the process group) is reported
                traceback.print_exc()
                summary.setdefault("errors", []).append(f"{check}: {type(err).__name__}: {err}")
            save()
    failures = failed()
    print("\n" + ("\n".join(f"FAIL {f}" for f in failures) if failures else "all checks PASS"))
    return 1 if failures else 0


def _num_params_meta(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return CausalLM(cfg).num_params()


if __name__ == "__main__":
    sys.exit(main())
