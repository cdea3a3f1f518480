"""Table of the moe_balance sweep: `python experiments/moe_balance/summarize.py multirun/moe_balance`.

Per job (variant): final val/bpb, MaxVio (max over MoE layers of max load / mean load - 1 in one
step) at the first logged step, its mean over the last 100 steps, the same per layer, dead experts
in the last 100 steps, and the |bias| spread reached. Writes results.csv beside this file.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pandas as pd
import yaml


def summarize(job: Path) -> dict:
    cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    variant = cfg["variant"]
    metrics = pd.read_csv(job / "csv" / "metrics.csv")
    train = metrics.dropna(subset=["moe/max_vio"]).set_index("step")
    last = train[train.index > train.index.max() - 100]
    val = metrics.dropna(subset=["val/bpb"])
    layers = sorted(c.removeprefix("moe/max_vio_") for c in train if c.startswith("moe/max_vio_"))
    return {
        "variant": variant,
        "balance": cfg["variants"][variant]["balance"],
        "alpha": cfg["variants"][variant]["alpha"],
        "seed": cfg["variants"][variant]["seed"],
        "steps": int(train.index.max()),
        "val_bpb": round(float(val["val/bpb"].iloc[-1]), 4),
        "max_vio_first": round(float(train["moe/max_vio"].iloc[0]), 3),
        "max_vio_last100": round(float(last["moe/max_vio"].mean()), 3),
        **{f"max_vio_{n}": round(float(last[f"moe/max_vio_{n}"].mean()), 3) for n in layers},
        "dead_last100": round(float(last["moe/dead"].mean()), 2),
        "bias_range": round(max(float(train[f"moe/bias_range_{n}"].iloc[-1]) for n in layers), 3),
    }


def main() -> None:
    sweep = Path(sys.argv[1] if len(sys.argv) > 1 else "multirun/moe_balance")
    jobs = sorted(p for p in sweep.iterdir() if (p / "csv" / "metrics.csv").exists())
    rows = [summarize(job) for job in jobs]
    out = Path(__file__).with_name("results.csv")
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
