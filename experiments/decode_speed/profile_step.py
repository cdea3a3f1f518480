"""Where the time of decoding goes: `sample` on 64 held-out prompts of the embedded corpus at
batch 64 (greedy, up to 448 new tokens, eos ends a row), eager, with every module of the model
timed by forward hooks (exclusive time: a module's children are subtracted), one table of ms per
decode step by component. Works on this checkout and on older ones (PYTHONPATH=<tree>): it
needs only `tinyreason.sampling.sample` and the model's module classes.

    python experiments/decode_speed/profile_step.py <HF export> [--batch 64] [--new 448]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from tinyreason.checkpoints import load_model
from tinyreason.data.synthetic import CorpusConfig
from tinyreason.evaluation import _prompt, corpus_items
from tinyreason.sampling import SamplingConfig, sample

# module class name -> component (the first match up the class hierarchy)
COMPONENTS = {
    "MLA": "attention (MLA: projections, RoPE, absorbed attention over the cache)",
    "GQA": "attention (GQA)",
    "Router": "MoE routing (sigmoid scores, group-limited top-k)",
    "Experts": "MoE routed experts",
    "MLP": "dense FFN and shared experts",
    "MoE": "MoE glue (reshapes, the sum with the shared experts)",
    "RMSNorm": "RMSNorm",
    "OutputHead": "lm_head",
    "Embedding": "embedding",
    "CausalLM": "model glue (RoPE tables, residual adds, checks)",
    "Block": "model glue (RoPE tables, residual adds, checks)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new", type=int, default=448)
    args = parser.parse_args()
    model, tokenizer = load_model(args.ckpt)
    model.eval()
    items = corpus_items(CorpusConfig(), "test", args.batch)
    prompts = [_prompt(tokenizer, it.question) for it in items]
    config = SamplingConfig(args.new)
    run = lambda: sample(model, prompts, config, eos_token_id=tokenizer.eos_token_id)
    run()  # warm-up

    spent: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # [component, start, children's time]
    steps = 0

    def pre(module, inputs, *_):
        stack.append([component(module, inputs), time.perf_counter(), 0.0])

    def post(module, inputs, *_):
        nonlocal steps
        name, start, children = stack.pop()
        total = time.perf_counter() - start
        spent[name] += total - children
        if stack:
            stack[-1][2] += total
        elif name != "prefill (prompts, whole)":
            steps += 1

    def component(module, inputs) -> str:
        if not stack and inputs and inputs[0].dim() == 2 and inputs[0].shape[1] > 1:
            return "prefill (prompts, whole)"
        if stack and stack[0][0] == "prefill (prompts, whole)":
            return "prefill (prompts, whole)"
        for cls in type(module).__mro__:
            if cls.__name__ in COMPONENTS:
                return COMPONENTS[cls.__name__]
        return "model glue (RoPE tables, residual adds, checks)"

    hooks = []
    for m in model.modules():
        if any(c.__name__ in COMPONENTS for c in type(m).__mro__):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    start = time.perf_counter()
    out = run()
    wall = time.perf_counter() - start
    for h in hooks:
        h.remove()
    spent["sampling loop (token choice, masks, cache bookkeeping, Python)"] = wall - sum(
        spent.values()
    )
    new_tokens = sum(map(len, out))
    print(
        f"{args.ckpt}: {len(prompts)} prompts, batch {args.batch}, {new_tokens:,} new tokens in "
        f"{wall:.2f} s ({new_tokens / wall:,.0f} tokens/s, hooks included), {steps} decode steps"
    )
    print("\n| component | ms per decode step | share |\n|---|---:|---:|")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1e3 * seconds / max(steps, 1):.2f} | {100 * seconds / wall:.0f}% |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
