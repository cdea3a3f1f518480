"""`experiments/gpu_check/gpu_check.py --smoke --checks scaling` end to end on CPU, in a fresh
process as on the GPU machine: one markdown table with a row for every run of every check of
`scaling.py`; each comparison PASSes (FSDP2, checkpointing and compile train to DDP's losses, the
chunked head's step peak is at most half the full head's at the same loss); DeepSpeed's row is
skipped exactly when deepspeed does not import; results.json holds the same rows and every run's
losses, and no FP8 part ran.

fp32 on CPU: FSDP2 with fp32 weights and activation checkpointing run DDP's operations on the
same values, so their per-step losses are DDP's (measured: bit-exact; 1e-6 relative here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_check" / "gpu_check.py"
RUNS_PER_CHECK = {
    "1 FSDP2 vs DDP": 3,  # DDP, FSDP2 with fp32 and with bf16 parameters
    "2 compile": 1,
    "3 activation ckpt": 2,  # full, selective
    "4 chunked CE": 2,  # full logits, chunked
    "5 ZeRO-2": 1,
}
BASELINES = {("1 FSDP2 vs DDP", "DDP"), ("4 chunked CE", "full logits, V=151,936")}
SKIP = "skipped: deepspeed not importable (pip install .[deepspeed])"

pytestmark = pytest.mark.slow  # one end-to-end run of the script (~1 minute here)


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the table whose header starts `| check | run |`, as {header: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| check | run |"))
    header = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--checks", "scaling", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,  # ~50 s on an idle 2-core machine; the machine is shared
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FP8 mods" not in proc.stdout  # --checks scaling: the FP8 recipes did not run
    return markdown_rows(proc.stdout), json.loads((out / "results.json").read_text())


def test_every_check_has_its_rows_and_passes(smoke) -> None:
    rows, _ = smoke
    counts = {check: sum(r["check"] == check for r in rows) for check in RUNS_PER_CHECK}
    assert counts == RUNS_PER_CHECK
    assert len(rows) == sum(RUNS_PER_CHECK.values())
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    for r in rows:
        if (r["check"], r["run"]) in BASELINES:
            assert r["PASS/FAIL"] == "base", r
        elif r["check"] == "5 ZeRO-2" and not deepspeed:
            assert (r["PASS/FAIL"], r["note"]) == ("skipped", SKIP)
        else:
            assert r["PASS/FAIL"] == "PASS", r
            assert r["Δ loss / base"] and r["step peak MiB"], r  # measured, compared


def test_results_json_holds_the_table_and_every_run(smoke) -> None:
    rows, results = smoke
    scaling = results["scaling"]
    assert [(r["check"], r["run"], r["result"]) for r in scaling["rows"]] == [
        (r["check"], r["run"], r["PASS/FAIL"]) for r in rows
    ]
    assert results["failures"] == scaling["failures"] == []
    assert "runs" not in results  # the FP8 part's key
    runs, steps = scaling["runs"], scaling["shape"]["steps"]
    ddp = runs["DDP"]["losses"]
    assert len(ddp) == steps
    for name in ("FSDP2, fp32 params", "AC full (DDP)", "AC selective (DDP)"):
        assert runs[name]["losses"] == pytest.approx(ddp, rel=1e-6, abs=0), name
    assert runs["ce_chunked"]["step_peak"] <= 0.5 * runs["ce_full"]["step_peak"]
    assert runs["ce_chunked"]["loss"] == pytest.approx(runs["ce_full"]["loss"], rel=1e-5)
