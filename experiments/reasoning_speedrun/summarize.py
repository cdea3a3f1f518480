"""Table and plot of a reasoning speedrun sweep: exact match vs wall time and vs training FLOPs.

    python experiments/reasoning_speedrun/summarize.py <run or sweep dir> [...] [--out DIR]

Each run dir holds csv/metrics.csv (val/exact_match and time/seconds at every validation,
model/flops_per_token, tokens), eval.json (the final test / ood report) and .hydra/overrides.yaml
(its name in the table). Writes results.md, results.csv and exact_match.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        runs += sorted({m.parent.parent for m in p.glob("**/csv/metrics.csv")})
    return runs


def name_of(run: Path) -> str:
    overrides = run / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return run.name
    lines = [ln.strip().removeprefix("- ") for ln in overrides.read_text().splitlines()]
    keep = [
        ln
        for ln in lines
        if ln and ln != "[]" and not ln.startswith(("hydra.", "logger", "experiment="))
    ]
    return " ".join(keep) or "default"


def curve(run: Path) -> tuple[list[dict], dict]:
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    static = {}
    for r in rows:
        for k in ("model/params", "model/active_params", "model/flops_per_token"):
            if r.get(k):
                static[k] = float(r[k])
    points = []
    for r in rows:
        if r.get("val/exact_match") and r.get("time/seconds"):
            tokens = float(r["tokens"]) if r.get("tokens") else 0.0
            points.append(
                {
                    "step": int(r["step"]),
                    "seconds": float(r["time/seconds"]),
                    "tokens": tokens,
                    "flops": tokens * static.get("model/flops_per_token", 0.0),
                    "exact_match": float(r["val/exact_match"]),
                    "bpb": float(r["val/bpb"]) if r.get("val/bpb") else float("nan"),
                    "by_kind": {
                        k.removeprefix("val/exact_match_"): float(v)
                        for k, v in r.items()
                        if k.startswith("val/exact_match_") and v
                    },
                }
            )
    return points, static


def short_names(runs: list[Path]) -> list[str]:
    """Each run's overrides without those every run shares (the recipe they all start from)."""
    names = [name_of(run).split() for run in runs]
    common = set.intersection(*map(set, names)) if len(names) > 1 else set()
    return [" ".join(o for o in n if o not in common) or "baseline" for n in names]


def summarize(runs: list[Path], out: Path) -> list[dict]:
    table = []
    curves = {}
    for run, name in zip(runs, short_names(runs), strict=True):
        points, static = curve(run)
        report = (
            json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
        )
        curves[name] = points
        last = points[-1] if points else {}
        row = {
            "run": name,
            "params_M": static.get("model/params", 0) / 1e6,
            "active_M": static.get("model/active_params", 0) / 1e6,
            "tokens_M": last.get("tokens", 0) / 1e6,
            "train_PFLOP": last.get("flops", 0) / 1e15,
            "fit_min": last.get("seconds", 0) / 60,
            "val_bpb": last.get("bpb", float("nan")),
            "val_em": last.get("exact_match", float("nan")),
        }
        for split in ("test", "ood"):
            if split in report:
                row[f"{split}_em"] = report[split]["exact_match"]
        if "test" in report:
            row["test_by_kind"] = " ".join(
                f"{k} {v:.0%}" for k, v in report["test"]["by_kind"].items()
            )
        table.append(row)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in table for k in row))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(table)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in table:
        cells = [
            f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(curves, out / "exact_match.png")
    return table


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """val exact match vs wall time and vs tokens seen (one line per run), then per kind vs
    tokens (one panel per kind) in <path stem>_by_kind.png."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax_t, ax_n = fig.subplots(1, 2)
    for name, points in curves.items():
        if not points:
            continue
        em = [100 * p["exact_match"] for p in points]
        ax_t.plot([p["seconds"] / 60 for p in points], em, marker="o", label=name)
        ax_n.plot([p["tokens"] / 1e6 for p in points], em, marker="o", label=name)
    ax_t.set(xlabel="wall time of fit (min, 2-core CPU)", ylabel="val exact match (%)")
    ax_n.set(xlabel="training tokens (M)", ylabel="val exact match (%)")
    for ax in (ax_t, ax_n):
        ax.grid(alpha=0.3)
    ax_n.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)

    kinds = sorted({k for points in curves.values() for p in points for k in p["by_kind"]})
    if not kinds:
        return
    cols = 3
    fig = Figure(figsize=(12, 3.2 * ((len(kinds) + cols - 1) // cols)), dpi=100)
    axes = fig.subplots((len(kinds) + cols - 1) // cols, cols, squeeze=False).ravel()
    for ax, kind in zip(axes, kinds, strict=False):  # more axes than kinds
        for name, points in curves.items():
            xs = [p["tokens"] / 1e6 for p in points if kind in p["by_kind"]]
            ys = [100 * p["by_kind"][kind] for p in points if kind in p["by_kind"]]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set(title=kind, xlabel="training tokens (M)", ylabel="val EM (%)", ylim=(-5, 105))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=5)
    for ax in axes[len(kinds) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_by_kind.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    for row in summarize(find_runs(args.paths), args.out):
        print(row)


if __name__ == "__main__":
    main()
