"""Validation curves and final val/bpb of the fp8_vs_bf16 sweep -> val_bpb.png, val_bpb.csv, results.csv.

    python experiments/fp8_vs_bf16/analyze.py [sweep folder ...]    (default multirun/fp8_vs_bf16)

Reads every job's csv/metrics.csv under the folders, named from its saved config
(.hydra/config.yaml: precision, recipe, AdamW moment dtype, seed) by the names of the README's
tables: `bf16`, `tensorwise` (precision=fp8), `rowwise`, `rowwise_with_gw_hp`, `blockwise`,
`deepseek_v3` (blockwise + bf16 moments), `_seed1` for seed 1 (a name found twice: the later folder
wins). Relative differences are (variant - bf16) / bf16 of the final val/bpb, against seed 0's
bf16 and against the bf16 run of the variant's own seed (`*_seed1` variants pair with `bf16_seed1`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

HERE = Path(__file__).parent
# (precision.name, precision.recipe) -> the README's name of that option
RECIPES = {
    ("bf16", None): "bf16",
    ("fp8", "tensorwise"): "tensorwise",
    ("fp8", "rowwise"): "rowwise",
    ("fp8", "rowwise_with_gw_hp"): "rowwise_with_gw_hp",
    ("fp8_blockwise", "blockwise"): "blockwise",
}


def variant(job: Path) -> str:
    """The README's name of a job, from the config it ran with: `rowwise`, `deepseek_v3_seed1`,
    ... (a combination outside the tables gets a readable name such as `fp32_moments_bf16_seed2`)."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    precision = (cfg.precision.name, cfg.precision.recipe)
    name = RECIPES.get(precision, "_".join(str(p) for p in precision if p is not None))
    if cfg.optim.moment_dtype == "bf16":
        name = "deepseek_v3" if name == "blockwise" else f"{name}_moments_bf16"
    return name + (f"_seed{cfg.seed}" if cfg.seed else "")


def load(sweeps: list[Path]) -> dict[str, pd.DataFrame]:
    """{variant: metrics.csv} of every job under the sweep folders."""
    curves = {}
    for sweep in sweeps:
        for config in sorted(sweep.glob("**/.hydra/config.yaml")):
            job = config.parent.parent
            if (job / "csv" / "metrics.csv").is_file():
                curves[variant(job)] = pd.read_csv(job / "csv" / "metrics.csv")
    order = ["bf16", "bf16_seed1", "tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise"]
    order += ["deepseek_v3", "blockwise_seed1", "deepseek_v3_seed1"]
    return dict(sorted(curves.items(), key=lambda kv: (order + [kv[0]]).index(kv[0])))


def summarize(curves: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for variant, d in curves.items():
        val = d.dropna(subset=["val/bpb"])
        rows.append(
            {
                "variant": variant,
                "steps": int(d["step"].max()),
                "final_val_bpb": val["val/bpb"].iloc[-1],
                "min_val_bpb": val["val/bpb"].min(),
                "train_ce_last50": d.loc[d["step"] >= d["step"].max() - 50, "train/ce"].mean(),
            }
        )
    table = pd.DataFrame(rows).set_index("variant")
    base = table.loc["bf16", "final_val_bpb"]
    table["rel_diff_vs_bf16"] = (table["final_val_bpb"] - base) / base
    same_seed = [
        "bf16_seed1" if v.endswith("_seed1") and "bf16_seed1" in table.index else "bf16"
        for v in table.index
    ]
    paired = table.loc[same_seed, "final_val_bpb"].to_numpy()
    table["rel_diff_vs_same_seed_bf16"] = (table["final_val_bpb"] - paired) / paired
    ce = table.loc["bf16", "train_ce_last50"]
    table["train_ce_rel_diff"] = (table["train_ce_last50"] - ce) / ce
    return table


def plot(curves: dict[str, pd.DataFrame], table: pd.DataFrame, out: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = curves["bf16"].dropna(subset=["val/bpb"]).set_index("tokens")["val/bpb"]
    for variant, d in curves.items():
        val = d.dropna(subset=["val/bpb"]).set_index("tokens")["val/bpb"]
        style = "--" if variant.startswith("bf16") else "-"
        left.plot(val.index[1:] / 1e6, val.values[1:], style, marker=".", label=variant)
        rel = (val - base.reindex(val.index)) / base.reindex(val.index) * 100
        right.plot(rel.index[1:] / 1e6, rel.values[1:], style, marker=".", label=variant)
    left.set(
        xlabel="tokens seen (M)", ylabel="val/bpb", title="validation bits per byte (step 0: 4.42)"
    )
    right.axhspan(-0.5, 0.5, color="green", alpha=0.1, label="target: within 0.5%")
    right.axhline(0, color="black", lw=0.5)
    right.set(
        xlabel="tokens seen (M)",
        ylabel="(val/bpb - bf16) / bf16  [%]",
        title="relative to bf16 (seed 0)",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    curves = load([Path(p) for p in sys.argv[1:]] or [Path("multirun/fp8_vs_bf16")])
    table = summarize(curves)
    table.to_csv(HERE / "results.csv", float_format="%.5f")
    val = {
        v: d.dropna(subset=["val/bpb"]).set_index("tokens")["val/bpb"] for v, d in curves.items()
    }
    pd.DataFrame(val).to_csv(HERE / "val_bpb.csv", float_format="%.5f")
    plot(curves, table, HERE / "val_bpb.png")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
