"""Table of the moe_balance sweep: `python experiments/moe_balance/summarize.py <sweep dir> ...`.

Per job, named from its saved config as in the README (`both`, `aux_free_seed1`, `aux_loss_1e-2`:
the balance mode, `_<alpha>` when the mode uses alpha and it is not 1e-4, `_seed<n>`): final
val/bpb, MaxVio (max over MoE layers of max load / mean load - 1 in one step) at the first logged
step, its mean over the last 100 steps, the same per layer, dead experts in the last 100 steps,
and the bias spread reached. Writes results.csv and max_vio.png (MaxVio and
val/bpb curves) beside this file.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf


def variant(cfg) -> str:
    """The README's name of a run: `both`, `both_seed1`, `aux_loss_1e-2`, ..."""
    moe = cfg.model.moe
    name = moe.balance
    if moe.balance in ("both", "aux_loss") and moe.balance_alpha != 1e-4:
        mantissa, exponent = f"{moe.balance_alpha:e}".split("e")
        name += f"_{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 1e-2, 2.5e-3
    return name + (f"_seed{cfg.seed}" if cfg.seed else "")


def summarize(job: Path) -> dict:
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    metrics = pd.read_csv(job / "csv" / "metrics.csv")
    train = metrics.dropna(subset=["moe/max_vio"]).set_index("step")
    last = train[train.index > train.index.max() - 100]
    val = metrics.dropna(subset=["val/bpb"])
    layers = sorted(c.removeprefix("moe/max_vio_") for c in train if c.startswith("moe/max_vio_"))
    return {
        "variant": variant(cfg),
        "balance": cfg.model.moe.balance,
        "alpha": cfg.model.moe.balance_alpha,
        "seed": cfg.seed,
        "steps": int(train.index.max()),
        "val_bpb": round(float(val["val/bpb"].iloc[-1]), 4),
        "max_vio_first": round(float(train["moe/max_vio"].iloc[0]), 3),
        "max_vio_last100": round(float(last["moe/max_vio"].mean()), 3),
        **{f"max_vio_{n}": round(float(last[f"moe/max_vio_{n}"].mean()), 3) for n in layers},
        "dead_last100": round(float(last["moe/dead"].mean()), 2),
        "bias_range": round(max(float(train[f"moe/bias_range_{n}"].iloc[-1]) for n in layers), 3),
    }


def plot(jobs: list[Path], out: Path) -> None:
    """MaxVio (max over MoE layers, 50-step bins) and val/bpb against steps, a line a job."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=100)
    ax_vio, ax_bpb = fig.subplots(1, 2)
    for job in jobs:
        name = variant(OmegaConf.load(job / ".hydra" / "config.yaml"))
        metrics = pd.read_csv(job / "csv" / "metrics.csv")
        train = metrics.dropna(subset=["moe/max_vio"])
        vio = train.groupby(train["step"] // 50 * 50 + 25)["moe/max_vio"].mean()  # 50-step bins
        ax_vio.plot(vio.index, vio, marker=".", label=name)
        val = metrics.dropna(subset=["val/bpb"])
        ax_bpb.plot(val["step"], val["val/bpb"], marker=".", label=name)
    ax_vio.set(xlabel="step", ylabel="MaxVio (max over layers, 50-step bins)", yscale="log")
    ax_bpb.set(xlabel="step", ylabel="val/bpb", ylim=(0.55, 0.9))
    ax_vio.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    sweeps = [Path(a) for a in sys.argv[1:]] or [Path("multirun/moe_balance")]
    jobs = [p for d in sweeps for p in sorted(d.iterdir()) if (p / "csv" / "metrics.csv").exists()]
    rows = [summarize(job) for job in jobs]
    plot(jobs, Path(__file__).with_name("max_vio.png"))
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
