"""`notebooks/vocab_scaling.ipynb` rebuilds the sweep table and plot from a real (tiny) two-point
`experiment=vocab_scaling` multirun: CSV logs and W&B offline run files."""

import csv
from pathlib import Path

import nbformat
import pytest
from conftest import run_train_cli
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_notebook_rebuilds_table_and_plot_from_a_tiny_sweep(cache_dir, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    proc = run_train_cli(
        "-m",
        "experiment=vocab_scaling",
        "debug=fast",
        "tokenizer=bpe,cl100k",  # the rows bpe_1k and cl100k
        "hydra.sweeper.params=null",  # not the BPE grid: the two points below
        "++tokenizer.vocab_size=1024",  # ++: cl100k has no such key (it ignores it)
        "precision=fp32",  # the experiment's bf16 is ~10x slower on an AVX2 CPU
        "budget.train_bytes=6000",
        "data.seq_len=32",
        "trainer.limit_val_batches=4",
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={cache_dir}",
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    monkeypatch.setenv("VOCAB_SWEEPS", str(sweep))
    monkeypatch.setenv("VOCAB_OUT", str(out))
    notebook = nbformat.read(ROOT / "notebooks" / "vocab_scaling.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()

    with open(out / "results.csv") as f:
        rows = {r["vocab"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["bpe_1k", "cl100k"]
    assert rows["cl100k"]["vocab_size"] == "100264"
    for vocab, row in rows.items():
        assert row["sources"] == "csv+wandb", "both logs read (and their final val/bpb agree)"
        with open(ROOT / row["run"] / "csv" / "metrics.csv") as f:  # run: absolute or from ROOT
            logged = [float(r["val/bpb"]) for r in csv.DictReader(f) if r.get("val/bpb")]
        assert float(row["bpb_final"]) == pytest.approx(logged[-1]), vocab
        # a fixed budget of bytes: each run read about budget.train_bytes of text
        assert 3000 < int(row["train_bytes"]) < 12000, vocab
    # a fixed byte budget: the vocabulary that packs more bytes into a token takes no more steps
    denser, sparser = sorted(rows.values(), key=lambda r: -float(r["bytes_per_token"]))
    assert int(denser["steps"]) <= int(sparser["steps"]), "more bytes/token, no more steps"
    assert (out / "vocab_scaling.png").stat().st_size > 10_000
    assert "| reasoning | bpe_1k | 1,024 |" in (out / "results.md").read_text()
