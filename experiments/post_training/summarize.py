"""Table and plot of a post-training chain: pretrain -> SFT -> DPO / GRPO, one run dir per stage.

    python experiments/post_training/summarize.py <pretrain run> <sft run> <dpo run> <grpo run> [--out DIR]

Each run dir holds eval.json (the final test / ood report), csv/metrics.csv (val/exact_match,
val/bpb and time/seconds at every validation; DPO's val/dpo_loss and dpo/accuracy) and
.hydra/config.yaml (its stage); GRPO's grpo/reward_mean, grpo/accuracy and grpo/frac_reward_zero_std
at every step. Writes results.csv, results.md, stages.png and (with a GRPO run) grpo.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml


def stage_of(run: Path) -> str:
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    name = (config.get("stage") or {}).get("name", "pretrain")
    grpo = config.get("grpo") or {}
    if name == "grpo" and grpo.get("step_reward"):
        name += "+step"  # the dense working reward on top of the checker
    if name.startswith("grpo") and grpo.get("beta"):
        name += "+kl"
    return name


def row(run: Path) -> dict:
    report = json.loads((run / "eval.json").read_text())
    metrics = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    vals = [r for r in metrics if r.get("val/bpb")]
    times = [float(r["time/seconds"]) for r in metrics if r.get("time/seconds")]
    out = {
        "stage": stage_of(run),
        "steps": int(vals[-1]["step"]) + 1,
        "val_bpb": float(vals[-1]["val/bpb"]),
        "test_em": report["test"]["exact_match"],
        "ood_em": report["ood"]["exact_match"],
        "test_no_answer": report["test"]["no_answer"],
        "fit_minutes": times[-1] / 60 if times else float("nan"),
        "run": str(run),
    }
    for kind, share in report["test"]["by_kind"].items():
        out[f"test_{kind}"] = share
    dpo = [r for r in metrics if r.get("val/dpo_loss")]
    if dpo:
        out["val_dpo_loss"] = float(dpo[-1]["val/dpo_loss"])
        out["val_dpo_accuracy"] = float(dpo[-1]["val/dpo_accuracy"])
    grpo = [r for r in metrics if r.get("grpo/reward_mean")]
    if grpo:
        for key in ("reward_mean", "accuracy", "frac_reward_zero_std", "completion_length"):
            out[f"grpo_{key}"] = sum(float(r[f"grpo/{key}"]) for r in grpo) / len(grpo)
    return out


def grpo_curves(run: Path) -> dict[str, list[float]]:
    rows = [
        r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("grpo/reward_mean")
    ]
    keys = ("reward_mean", "accuracy", "frac_reward_zero_std")
    return {"step": [float(r["step"]) for r in rows]} | {
        k: [float(r[f"grpo/{k}"]) for r in rows] for k in keys
    }


def curves(run: Path) -> list[tuple[float, float]]:
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    return [
        (float(r["step"]), float(r["val/exact_match"])) for r in rows if r.get("val/exact_match")
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    rows = [row(r) for r in args.runs]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| stage | steps | test EM | OOD EM | no answer | val/bpb | fit min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['steps']} | {r['test_em']:.1%} | {r['ood_em']:.1%} | "
            f"{r['test_no_answer']:.1%} | {r['val_bpb']:.3f} | {r['fit_minutes']:.1f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    offset = 0.0
    for run, r in zip(args.runs, rows, strict=True):
        points = curves(run)
        if points:
            left.plot(
                [offset + s for s, _ in points],
                [100 * v for _, v in points],
                marker=".",
                label=r["stage"],
            )
        offset += r["steps"]
    left.set_xlabel("optimizer steps (stages in sequence)")
    left.set_ylabel("val exact match (%), 64 problems")
    left.legend()
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [100 * r["test_em"] for r in rows], 0.4, label="test")
    right.bar([i + 0.2 for i in x], [100 * r["ood_em"] for r in rows], 0.4, label="ood")
    right.set_xticks(list(x), [r["stage"] for r in rows])
    right.set_ylabel("greedy exact match (%), 500 problems")
    right.legend()
    fig.tight_layout()
    fig.savefig(args.out / "stages.png", dpi=120)
    grpo = [
        (run, r) for run, r in zip(args.runs, rows, strict=True) if r["stage"].startswith("grpo")
    ]
    if grpo:
        fig, axes = plt.subplots(1, len(grpo), figsize=(5.5 * len(grpo), 3.6), squeeze=False)
        for ax, (run, r) in zip(axes[0], grpo, strict=True):
            c = grpo_curves(run)
            ax.plot(c["step"], c["reward_mean"], label="reward mean")
            ax.plot(c["step"], c["accuracy"], label="accuracy (checker)")
            ax.plot(c["step"], c["frac_reward_zero_std"], label="frac_reward_zero_std")
            ax.set(xlabel="GRPO step", title=r["stage"], ylim=(-0.02, 1.02))
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "grpo.png", dpi=120)


if __name__ == "__main__":
    main()
