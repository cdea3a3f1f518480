"""On-policy DPO pairs: the model's own wrong completions against the corpus' solution.

    python experiments/post_training/on_policy_pairs.py <run dir | .ckpt | HF folder> <out.jsonl> \
        [--problems 2000] [--samples 4] [--temperature 1.0] [--greedy] [--corpus '{"ood": true}']

For each training problem of the run's corpus (its `.hydra/config.yaml`, then `--corpus` keys),
sample `--samples` completions (and the greedy one with `--greedy`), check each with the corpus'
checker, and pair the corpus' solution (chosen) with one wrong completion (rejected; the first
with an answer line if any, else the first without). Writes {"prompt", "chosen", "rejected"}
records for `stage=dpo dpo.corpus=false dpo.files=[<out.jsonl>]` and prints what it found per
kind: completions correct, wrong, without an answer line, pairs written. Refuses (exit 2, no file)
when no completion is wrong, and skips a pair whose rejected text equals the chosen one.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

from tinyreason.checkpoints import load_model
from tinyreason.data import synthetic
from tinyreason.data.sources import solution
from tinyreason.evaluate import corpus_config, run_dir_for
from tinyreason.evaluation import complete, problem_item
from tinyreason.sampling import SamplingConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--problems", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="also the greedy completion")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--corpus", default="{}", help="CorpusConfig keys as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_model(args.ckpt)
    config = corpus_config(run_dir_for(Path(args.ckpt)), json.loads(args.corpus))
    config = dataclasses.replace(config, num_train=args.problems)
    problems = synthetic.generate(config, "train")
    items = [problem_item(p) for p in problems]
    n = args.samples
    sampled = SamplingConfig(args.max_new_tokens, args.temperature, seed=args.seed)
    texts, _ = complete(
        model, tokenizer, [i.question for i in items for _ in range(n)], sampled, 64
    )
    groups = [texts[k * n : (k + 1) * n] for k in range(len(items))]
    if args.greedy:
        greedy, _ = complete(
            model, tokenizer, [i.question for i in items], SamplingConfig(args.max_new_tokens), 64
        )
        groups = [[g, *rest] for g, rest in zip(greedy, groups, strict=True)]
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    records = []
    for p, item, group in zip(problems, items, groups, strict=True):
        wrong = [t for t in group if not item.check(t)]
        answered = [t for t in wrong if synthetic.parse_answer(t) is not None]
        c = counts[p.kind]
        c["completions"] += len(group)
        c["wrong"] += len(wrong)
        c["no answer"] += len(wrong) - len(answered)
        chosen = solution(p)
        rejected = (answered or wrong or [None])[0]
        if rejected is not None and rejected.strip() != chosen.strip():
            records.append({"prompt": p.question, "chosen": chosen, "rejected": rejected})
            c["pairs"] += 1
    for kind, c in sorted(counts.items()):
        print(
            f"{kind}: {c['completions']} completions, {c['wrong']} wrong "
            f"({c['no answer']} without an answer line), {c['pairs']} pairs"
        )
    if not records:
        print(
            f"error: no wrong completion among {sum(len(g) for g in groups)}: nothing to pair "
            "(sample more, at a higher temperature, or on harder problems: --corpus)",
            file=sys.stderr,
        )
        return 2
    lines = (json.dumps(r, ensure_ascii=False) for r in records)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} pairs from {len(items)} problems to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
