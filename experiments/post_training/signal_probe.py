"""How much signal would GRPO get? Sample G completions per training problem and count them.

    python experiments/post_training/signal_probe.py <run dir | .ckpt | HF folder> \
        [--problems 45] [--group 8] [--temperature 1.0] [--ood] [--corpus '{"max_digits": 2}']

Prints the share of correct completions, the groups with any variance (a correct and a wrong
completion: the only ones GRPO's checker reward learns from) and both per kind.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

from tinyreason.checkpoints import load_model
from tinyreason.data import synthetic
from tinyreason.evaluation import complete, problem_item
from tinyreason.sampling import SamplingConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("--problems", type=int, default=45)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--ood", action="store_true", help="the out-of-distribution limits")
    parser.add_argument("--corpus", default="{}", help="CorpusConfig keys as JSON")
    args = parser.parse_args()
    model, tokenizer = load_model(args.ckpt)
    config = synthetic.CorpusConfig(**json.loads(args.corpus))
    config = synthetic.ood_config(config) if args.ood else config
    config = dataclasses.replace(config, num_train=args.problems)
    items = [problem_item(p) for p in synthetic.generate(config, "train")]
    G = args.group
    sampling = SamplingConfig(args.max_new_tokens, args.temperature)
    texts, _ = complete(
        model, tokenizer, [i.question for i in items for _ in range(G)], sampling, 64
    )
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for n, item in enumerate(items):
        by_kind[item.kind].append(sum(item.check(t) for t in texts[n * G : (n + 1) * G]))
    correct = sum(sum(v) for v in by_kind.values())
    signal = sum(0 < c < G for v in by_kind.values() for c in v)
    print(
        f"{correct} of {len(texts)} completions correct ({correct / len(texts):.2%}); "
        f"{signal} of {len(items)} groups with variance"
    )
    for kind, counts in by_kind.items():
        print(
            f"  {kind}: {sum(counts)} / {G * len(counts)} correct, "
            f"{sum(0 < c < G for c in counts)} / {len(counts)} groups with variance"
        )


if __name__ == "__main__":
    main()
