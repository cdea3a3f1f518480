"""End-to-end runs of `tinyreason.train` on `debug=fast` (seconds each)."""

import csv
import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_train_cli

from tinyreason.train import train

pytestmark = pytest.mark.slow


class RecordWindows(L.Callback):
    """Hashes of every training window, in the order the model saw them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for row in batch:
            self.seen.append(hashlib.sha1(row.numpy().tobytes()).hexdigest())


def read_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "model, precision, fmt",
    [("moe", "fp8", "local"), ("dense", "bf16", "local"), ("dense_mla", "fp32", "column")],
)
def test_debug_fast_run_writes_checkpoints_metrics_and_learns(
    make_cfg, tmp_path, model, precision, fmt
):
    cfg = make_cfg(
        f"model={model}",
        f"precision={precision}",
        f"data.corpus.format={fmt}",  # both solution formats train
        *(["data.seq_len=352"] if fmt == "column" else []),  # its longest: 333 tokens
        *(["model.mtp.depth=1"] if model == "moe" else []),  # the MTP block's load heatmap too
        "debug=fast",
        "logger=csv",
        "moe_heatmap_every=4",
    )
    metrics = train(cfg)
    run = Path(cfg.run_dir)
    heatmap = run / "moe_load.csv"
    if model == "moe":  # layer x expert load every 4 steps: one MoE layer + the MTP block
        with heatmap.open() as f:
            rows = [(r["step"], r["layer"]) for r in csv.DictReader(f)]
        assert rows == [(step, layer) for step in ("4", "8") for layer in ("layer1", "mtp0")]
    else:
        assert not heatmap.exists()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    rows = read_csv(run)
    columns = set().union(*(r.keys() for r in rows))
    for key in [
        "train/loss",
        "train/ce",
        "train/mtp",
        "train/balance",
        "val/loss",
        "val/bpb",
        "val/ppl",
        "lr",
        "grad_norm",
        "perf/tokens_per_s",
        "perf/mfu",
        "tokens",
    ]:
        assert key in columns, key
    # MFU = tokens/s x FLOPs per token / one peak measured at the start: a constant ratio. No
    # upper bound: on CPU the peak is a timed GEMM, and a step can outrun it (CI saw MFU 1.06).
    perf = [(float(r["perf/mfu"]), float(r["perf/tokens_per_s"])) for r in rows if r["perf/mfu"]]
    assert perf and all(mfu > 0 for mfu, _ in perf)
    ratios = [mfu / tps for mfu, tps in perf]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-5)
    bpb = [float(r["val/bpb"]) for r in rows if r.get("val/bpb")]
    assert len(bpb) == 3  # step 0, 5, 10
    assert bpb[-1] < bpb[0], "ten steps on a tiny corpus must lower val/bpb"
    assert metrics["tokens"] == 10 * 2 * cfg.data.seq_len
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10
    assert all(type(v) is torch.Tensor for v in ckpt["state_dict"].values()), "plain tensors only"
    if precision == "fp8":
        from torchao.float8.float8_linear import Float8Linear

        from tinyreason.training.module import LitCausalLM

        lit = LitCausalLM(**ckpt["hyper_parameters"])
        lit.configure_model()
        assert any(isinstance(m, Float8Linear) for m in lit.model.modules())
        assert not isinstance(lit.model.lm_head, Float8Linear)


@pytest.mark.parametrize(
    "data",
    [
        (),  # 10 steps inside one epoch
        # ~5 batches of packed conversations per epoch: the resumed half crosses into the
        # second epoch (reshuffled)
        ("data.corpus.num_train=60", "data.batch_size=4"),
    ],
    ids=["one_epoch", "across_epochs"],
)
def test_resume_continues_steps_and_data_position(make_cfg, tmp_path, data):
    base = ("model=moe", "precision=fp32", "debug=fast", "logger=csv", *data)
    full = RecordWindows()
    train(make_cfg(*base, run_dir=tmp_path / "full"), callbacks=[full])

    first, second = RecordWindows(), RecordWindows()
    run = tmp_path / "split"
    train(make_cfg(*base, "trainer.max_steps=5", run_dir=run), callbacks=[first])
    metrics = train(make_cfg(*base, "ckpt_path=last", run_dir=run), callbacks=[second])

    batch = 4 if data else 2
    assert len(first.seen) == len(second.seen) == 5 * batch
    assert first.seen + second.seen == full.seen, "resume must neither repeat nor skip a window"
    assert metrics["tokens"] == 10 * batch * 320
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 10


def test_debug_fast_trains_on_your_own_text(make_cfg, tmp_path):
    """`debug=fast data=text_files data.paths=[mine.txt]`: the fast way to try your own text (a
    few KB: debug's documents of 1,000 characters, a tenth of them for validation); a file too
    small for one validation window is refused with a message, not an IndexError at step 0."""
    text = tmp_path / "mine.txt"
    lines = [f"Line {i}: {i} apples and {i * 3} pears make {i * 4} fruits." for i in range(1200)]
    text.write_text("\n".join(lines), encoding="utf-8")
    cfg = make_cfg("debug=fast", "data=text_files", f"data.paths=[{text}]", "logger=none")
    metrics = train(cfg)  # 30 training documents, 3 for validation
    assert metrics["val/bpb"] < metrics["val/bpb_first"]
    assert "test/exact_match" not in metrics  # plain text has no problems to answer
    text.write_text("\n".join(lines[:600]), encoding="utf-8")
    with pytest.raises(ValueError, match="validation split has .* fewer than one batch"):
        train(make_cfg("debug=fast", "data=text_files", f"data.paths=[{text}]", "logger=none"))


def test_shards_are_reused_and_described_by_a_manifest(make_cfg, cache_dir):
    from conftest import prepare as prepare_data

    cfg = make_cfg("debug=fast")
    a = prepare_data(cfg)
    stamp = (a.shard_root / "manifest.json").stat().st_mtime_ns
    b = prepare_data(cfg)
    assert b.shard_root == a.shard_root
    assert (b.shard_root / "manifest.json").stat().st_mtime_ns == stamp, "must not rewrite"
    manifest = json.loads((a.shard_root / "manifest.json").read_text())
    assert manifest["vocab_size"] == len(a.tokenizer)
    assert manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["tokens"] > manifest["splits"]["validation"]["tokens"] > 0
    assert a.shard_root.parent.parent.name == "shards"


def test_shards_of_another_tokenizer_are_refused(make_cfg):
    from conftest import prepare as prepare_data

    from tinyreason.data.shards import read_manifest

    data = prepare_data(make_cfg("debug=fast"))
    m = data.manifest
    with pytest.raises(ValueError, match="tokenizer_fingerprint"):
        read_manifest(data.shard_root, m["corpus_fingerprint"], "bpe-999-other", m["vocab_size"])


# The two-process DDP run from the command line: tests/test_fsdp.py (beside FSDP2's, which must
# equal it step for step).


def test_multirun_gives_each_job_its_own_grouped_wandb_run(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train_cli(
        "-m",
        "debug=fast",
        "logger=wandb",
        "model=moe,dense",
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={cache_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = []
    for job, model in [("0", "moe"), ("1", "dense")]:
        run = sweep / job
        assert (run / ".hydra" / "config.yaml").is_file()
        assert (run / "checkpoints" / "last.ckpt").is_file()
        ids.append((run / "wandb_id.txt").read_text())
        (record,) = run.glob("wandb/offline-run-*/run-*.wandb")
        blob = record.read_bytes()
        assert f"logger=wandb,model={model}".encode() in blob  # run name: the sorted overrides
        assert b"sweep" in blob  # group = the sweep folder's name
    assert ids[0] != ids[1]


def test_a_window_shorter_than_a_conversation_is_refused_naming_the_longest(make_cfg):
    """Conversations are never cut or dropped from the embedded corpus: a data.seq_len below its
    longest one stops the run before training, with the length to set."""
    message = r"data\.seq_len=128: \d+ of 400 .*longest: \d+ tokens\); set data\.seq_len >= \d+"
    with pytest.raises(ValueError, match=message):
        train(make_cfg("debug=fast", "logger=none", "data.seq_len=128"))
