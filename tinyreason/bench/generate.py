"""`python -m tinyreason.bench generate [ckpt=<run dir | HF folder>] [key=value ...] [--options]`:
new tokens/s of our batched KV-cached sampler (`tinyreason.sampling.sample`, eager and with its
decode step compiled) vs transformers' `generate` on the same Hugging Face export, greedy, at
several batch sizes, in one process. At batch b ours decodes the prompts with b slots (a finished
row's slot takes the next prompt); transformers' `generate` takes them b at a time. The compiled
step is compiled before the timed rounds (its compile time is printed, not counted).

Without `ckpt=`: a randomly initialised model of the composed training config (CPU default
`model=moe`, MTP off; key=value overrides as for `tinyreason.train`) with the vocabulary of its BPE
tokenizer (cached as by `tinyreason.prepare`), exported with it to a temporary folder. `ckpt=<HF
folder>` benches that folder, `ckpt=<run dir>` its `hf/` (exported to a temporary folder if
absent). Ours loads the same folder (`generate.load_model`): identical fp32 weights in both.

Prompts: held-out corpus questions in the chat template, longest first (as `evaluate` batches
them), left-padded; transformers gets the same ids, left-padded by its tokenizer. Only real new
tokens (up to and including eos) count; a random model rarely emits eos, so rows mostly run to
`--max-new-tokens`. Both are timed in turn, `--repeats` rounds, median round reported (on a shared
machine absolute speeds are noise; quote the ratio). Outputs are compared row by row; every
mismatch is printed. The ceiling: new tokens/s if every forward FLOP (`flops_per_token / 3` at the
mean context) ran at the fp32 matmul rate measured here (`perf.matmul_flops`). One decode step of
ours (no eos: the batch stays full) is timed at batch 1 and at the largest batch, with the number
of aten ops it dispatches: what bounds ours. On a machine others load, pass `--threads 1`: torch's
OpenMP threads spin-wait for descheduled peers, which makes multi-thread timings 10x slower, noise.

A model with MTP (a trained run's export; the random model has none) is also decoded with MTP
self-speculative greedy decoding (`tinyreason.speculative`) in the same rounds: its speedup over
ours (the median over rounds of plain / speculative seconds), the drafts' acceptance rate, new
tokens per main-model forward and the rows identical to ours.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from tinyreason.bench.common import CLOCKS, compose_model
from tinyreason.checkpoints import export_model, load_model, without_mtp
from tinyreason.model import CausalLM
from tinyreason.model.flops import flops_per_token
from tinyreason.model.hf import is_hf_folder
from tinyreason.sampling import SamplingConfig, sample
from tinyreason.speculative import SpeculativeStats, speculative_sample
from tinyreason.training.perf import matmul_flops

WHO = ("ours", "compiled", "theirs")


def random_export(overrides: list[str], out: Path) -> Path:
    """A randomly initialised model of the training config (MTP off), exported with its tokenizer."""
    config, tokenizer, _ = compose_model(overrides)
    torch.manual_seed(0)
    return export_model(CausalLM(config), tokenizer, out)


def hf_folder(ckpt: str, tmp: Path) -> Path:
    """The HF folder to bench: `ckpt` itself, a run dir's `hf/`, or a fresh export of the run."""
    if is_hf_folder(ckpt):
        return Path(ckpt)
    if is_hf_folder(Path(ckpt) / "hf"):
        return Path(ckpt) / "hf"
    model, tokenizer = load_model(ckpt)
    return export_model(model, tokenizer, tmp / "hf", drop_mtp=True)


def bench_prompts(tokenizer, n: int) -> list[list[int]]:
    """n held-out corpus questions in the chat template, longest first."""
    from tinyreason.data.synthetic import CorpusConfig
    from tinyreason.evaluation import _prompt, corpus_items

    prompts = [
        _prompt(tokenizer, item.question) for item in corpus_items(CorpusConfig(), "test", n)
    ]
    return sorted(prompts, key=len, reverse=True)


def run_ours(model, batches, max_new: int, eos, pad, compile: bool = False) -> list[list[int]]:
    """Every prompt of `batches` through `sample` with as many slots as a batch holds (a finished
    row's slot takes the next prompt: continuous batching)."""
    config = SamplingConfig(max_new_tokens=max_new)
    prompts = [p for b in batches for p in b]
    kw = dict(eos_token_id=eos, pad_token_id=pad, batch_size=len(batches[0]), compile=compile)
    return sample(model, prompts, config, **kw)


def run_speculative(model, batches, max_new: int, eos, pad, stats) -> list[list[int]]:
    config = SamplingConfig(max_new_tokens=max_new)
    kw = dict(eos_token_id=eos, pad_token_id=pad, stats=stats)
    return [r for b in batches for r in speculative_sample(model, b, config, **kw)]


def run_theirs(hf, tokenizer, batches, max_new: int, eos, pad) -> list[list[int]]:
    config = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = []
    for batch in batches:
        enc = tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **config
            )
        for row in ids[:, enc["input_ids"].shape[1] :].tolist():  # up to and including eos
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def count_ops(fn) -> int:
    """aten ops `fn()` dispatches (each is at least one kernel launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def decode_step(model, prompts, max_new: int, pad, clock, reps: int = 3) -> tuple[float, int]:
    """(seconds, aten ops) of one decode step of `sample` at batch len(prompts), without eos:
    the difference of a max_new-token and a 1-token call, over max_new - 1 steps."""

    def call(n: int) -> None:
        sample(model, prompts, SamplingConfig(n), eos_token_id=None, pad_token_id=pad)

    times: dict[int, list[float]] = {1: [], max_new: []}
    call(max_new)  # warm-up
    for _ in range(reps):
        for n in times:
            start = clock()
            call(n)
            times[n].append(clock() - start)
    step = (statistics.median(times[max_new]) - statistics.median(times[1])) / (max_new - 1)
    return step, count_ops(lambda: call(2)) - count_ops(lambda: call(1))


def bench_generate(
    folder: str | Path,
    num_prompts: int = 64,
    max_new_tokens: int = 64,
    batch_sizes: tuple[int, ...] | list[int] = (1, 16, 64),
    batch1_prompts: int = 8,
    repeats: int = 3,
    hf_experts: str | None = None,
    clock: str = "wall",
    steps: bool = True,
    compiled: bool = True,
) -> dict:
    """Rows per batch size (tokens/s of both, identical share, mismatches) and the ceiling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    time_of = CLOCKS[clock]
    ours, tokenizer = load_model(folder)
    drafter = ours if ours.config.mtp.depth else None  # speculative decoding drafts with MTP
    if ours.config.mtp.depth:  # sampling never runs MTP
        ours = without_mtp(ours)
    kwargs = {"experts_implementation": hf_experts} if hf_experts else {}
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_tok.padding_side = "left"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    prompts = bench_prompts(tokenizer, num_prompts)
    runs = {}
    for b in batch_sizes:
        use = prompts[: min(batch1_prompts, len(prompts))] if b == 1 else prompts
        runs[b] = [use[i : i + b] for i in range(0, len(use), b)]
    # warm-up of both on the smallest batch; the compiled step is compiled here, untimed (the
    # first batch size compiles it, the second one marks the dimensions that changed dynamic)
    run_ours(ours, runs[batch_sizes[0]][:1], 2, eos, pad)
    run_theirs(hf, hf_tok, runs[batch_sizes[0]][:1], 2, eos, pad)
    start = time_of()
    for b in batch_sizes if compiled else ():
        run_ours(ours, runs[b], max_new_tokens, eos, pad, compile=True)
    compile_seconds = time_of() - start
    who = WHO if compiled else tuple(w for w in WHO if w != "compiled")
    who = who if drafter is None else (*who, "speculative")
    if drafter is not None:
        run_speculative(drafter, runs[batch_sizes[0]][:1], 3, eos, pad, SpeculativeStats())
    times = {(b, w): [] for b in batch_sizes for w in who}
    drafts = {b: SpeculativeStats() for b in batch_sizes}
    outputs: dict = {}
    peaks = []
    for _ in range(repeats):  # interleaved, so that load from other users hits both alike
        peaks.append(matmul_flops(torch.float32, clock=time_of))
        for (b, w), rounds in times.items():
            start = time_of()
            if w in ("ours", "compiled"):
                compiled = w == "compiled"
                outputs[b, w] = run_ours(ours, runs[b], max_new_tokens, eos, pad, compiled)
            elif w == "speculative":  # greedy: the same counts every round, keep the last
                drafts[b] = SpeculativeStats()
                outputs[b, w] = run_speculative(
                    drafter, runs[b], max_new_tokens, eos, pad, drafts[b]
                )
            else:
                outputs[b, w] = run_theirs(hf, hf_tok, runs[b], max_new_tokens, eos, pad)
            rounds.append(time_of() - start)
    rows = []
    for b in runs:
        mine, theirs = outputs[b, "ours"], outputs[b, "theirs"]
        bad = [(i, a, t) for i, (a, t) in enumerate(zip(mine, theirs, strict=True)) if a != t]
        tps = {
            w: [sum(map(len, outputs[b, w])) / t for t in times[b, w]]
            for w in WHO
            if (b, w) in times
        }
        med = {w: statistics.median(v) for w, v in tps.items()}
        identical = 1 - len(bad) / len(mine)
        new_tokens = sum(map(len, mine))
        same = [a == c for a, c in zip(mine, outputs.get((b, "compiled"), mine), strict=True)]
        rows.append(
            dict(batch=b, prompts=len(mine), new_tokens=new_tokens, identical=identical, **med)
            | dict(mismatches=bad, rounds=tps, compiled_identical=sum(same) / len(same))
        )
        if drafter is not None:
            rows[-1]["speculative"] = _speculative_row(b, mine, outputs, times, drafts[b])
    context = statistics.mean(len(p) for p in prompts) + max_new_tokens / 2
    forward = flops_per_token(ours, round(context)) / 3
    peak = statistics.median(peaks)
    experts = hf.config._experts_implementation
    result = dict(rows=rows, peak=peak, forward_flops=forward, context=context, steps={})
    result |= dict(ceiling=peak / forward, hf_experts=experts, threads=torch.get_num_threads())
    result["compile_seconds"] = compile_seconds
    for b in sorted({1, max(batch_sizes)}) if steps else []:
        seconds, ops = decode_step(ours, prompts[:b], max_new_tokens, pad, time_of)
        result["steps"][b] = dict(seconds=seconds, ops=ops, flop_seconds=b * forward / peak)
    return result


def _speculative_row(b: int, mine, outputs: dict, times: dict, drafts: SpeculativeStats) -> dict:
    spec = outputs[b, "speculative"]
    bad = [(i, a, t) for i, (a, t) in enumerate(zip(spec, mine, strict=True)) if a != t]
    speedups = [p / s for p, s in zip(times[b, "ours"], times[b, "speculative"], strict=True)]
    tps = [sum(map(len, spec)) / t for t in times[b, "speculative"]]
    return (
        dict(
            speedup=statistics.median(speedups),
            rounds=speedups,
            tokens_per_s=statistics.median(tps),
            identical=1 - len(bad) / len(spec),
            mismatches=bad,
        )
        | drafts.as_dict()
    )


def _speculative_report(rows: list[dict]) -> list[str]:
    lines = [
        "\n| batch | plain tokens/s | speculative tokens/s | speculative / plain (median of "
        "rounds) | drafts accepted | new tokens per forward | identical rows |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["speculative"]
        lines.append(
            f"| {r['batch']} | {r['ours']:,.0f} | {s['tokens_per_s']:,.0f} | {s['speedup']:.2f}x | "
            f"{100 * s['acceptance_rate']:.1f}% | {s['tokens_per_forward']:.2f} | "
            f"{100 * s['identical']:.1f}% |"
        )
    for r in rows:
        for i, a, t in r["speculative"]["mismatches"]:
            k = _first_diff(a, t)
            lines.append(
                f"MISMATCH speculative batch {r['batch']} row {i}: first differs at new token {k}: "
                f"speculative ...{a[k : k + 8]}, plain ...{t[k : k + 8]}"
            )
    return lines


def _first_diff(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def report(result: dict) -> str:
    lines = [
        "| batch | prompts | new tokens | ours tokens/s | ours compiled | transformers | ours / "
        "transformers | compiled / transformers | identical rows (transformers, compiled) | "
        "ours, compiled, transformers: % of ceiling |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        share = [f"{100 * r[w] / result['ceiling']:.1f}%" if w in r else "-" for w in WHO]
        compiled = r.get("compiled", float("nan"))
        lines.append(
            f"| {r['batch']} | {r['prompts']} | {r['new_tokens']:,} | {r['ours']:,.0f} | "
            f"{compiled:,.0f} | {r['theirs']:,.0f} | {r['ours'] / r['theirs']:.2f}x | "
            f"{compiled / r['theirs']:.2f}x | {100 * r['identical']:.1f}%, "
            f"{100 * r['compiled_identical']:.1f}% | {', '.join(share)} |"
        )
    lines.append(
        f"\nceiling: {result['ceiling']:,.0f} new tokens/s at the fp32 matmul rate "
        f"{result['peak'] / 1e9:,.0f} GFLOP/s x {result['forward_flops'] / 1e6:.2f} MFLOP forward "
        f"per token (flops_per_token / 3 at the mean context {result['context']:.0f}); "
        f"compiling the decode step (untimed above): {result['compile_seconds']:.0f} s"
    )
    steps = result["steps"]
    for b, s in steps.items():
        lines.append(
            f"ours, one decode step at batch {b}: {1e3 * s['seconds']:.2f} ms, {s['ops']} aten ops; "
            f"its FLOPs at the matmul rate: {1e3 * s['flop_seconds']:.3f} ms"
        )
    if len(steps) == 2:
        (_, s1), (bn, sn) = sorted(steps.items())
        row = (sn["seconds"] - s1["seconds"]) / (bn - 1)
        lines.append(
            f"=> a fixed per-step cost of ~{1e3 * s1['seconds']:.1f} ms (Python and {s1['ops']} "
            f"small ops / kernel launches, {1e6 * s1['seconds'] / s1['ops']:.0f} us each) bounds "
            f"batch 1; each further row adds {1e3 * row:.2f} ms, {row * bn / sn['flop_seconds']:.0f}x "
            f"its FLOPs at the matmul rate (small GEMMs); at batch {bn} the fixed cost is "
            f"{100 * s1['seconds'] / sn['seconds']:.0f}% of the step"
        )
    for r in result["rows"]:
        for i, a, t in r["mismatches"]:
            k = _first_diff(a, t)
            lines.append(
                f"MISMATCH batch {r['batch']} row {i}: first differs at new token {k} "
                f"(ours {len(a)}, transformers {len(t)} tokens): ours ...{a[k : k + 8]}, "
                f"transformers ...{t[k : k + 8]}"
            )
    if any("speculative" in r for r in result["rows"]):
        lines += _speculative_report(result["rows"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tinyreason.bench generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arg = parser.add_argument
    arg("overrides", nargs="*", help="ckpt=<run dir | HF folder>, or train config overrides")
    arg("--prompts", dest="num_prompts", type=int, default=64, metavar="N", help="questions: 64")
    arg("--batch1-prompts", type=int, default=8, metavar="N", help="of them at batch 1: 8")
    arg("--batch-sizes", type=int, nargs="+", default=[1, 16, 64], metavar="B", help="1 16 64")
    arg("--max-new-tokens", type=int, default=64, metavar="N", help="per row: 64 (or to eos)")
    arg("--repeats", type=int, default=3, metavar="N", help="timed rounds of each: 3")
    arg("--threads", type=int, default=None, metavar="N", help="torch threads (default: all)")
    arg("--clock", choices=list(CLOCKS), default="wall", help="what a second is")
    arg("--hf-experts", metavar="IMPL", help="transformers' experts kernels (its default)")
    arg("--no-compile", dest="compiled", action="store_false", help="skip the compiled step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = [o.split("=", 1)[1] for o in args.overrides if o.startswith("ckpt=")]
    overrides = [o for o in args.overrides if not o.startswith("ckpt=")]
    if ckpt and overrides:
        parser.error("with ckpt=, the model is the checkpoint's: no training-config overrides")
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_folder(ckpt[-1], Path(tmp)) if ckpt else random_export(overrides, Path(tmp))
        options = {k: v for k, v in vars(args).items() if k not in ("overrides", "threads")}
        result = bench_generate(folder, **options)
    model = "ckpt=" + ckpt[-1] if ckpt else "random " + " ".join(overrides or ["model=moe"])
    print(
        f"{model}; greedy, max_new_tokens {args.max_new_tokens}, {result['threads']} threads, "
        f"{args.clock} clock, median of {args.repeats} rounds; transformers experts: "
        f"{result['hf_experts']}"
    )
    print(report(result))
    for r in result["rows"]:
        for who, name in zip(WHO, ("ours", "ours compiled", "transformers"), strict=True):
            if who not in r["rounds"]:
                continue
            rounds = ", ".join(f"{v:,.0f}" for v in r["rounds"][who])
            print(f"batch {r['batch']} {name}: rounds (tokens/s) {rounds}")
        if "speculative" in r:
            rounds = ", ".join(f"{v:.2f}x" for v in r["speculative"]["rounds"])
            print(f"batch {r['batch']} speculative / plain: rounds {rounds}")
