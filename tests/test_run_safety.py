"""Nothing lost, nothing silent: the divergence guard (skip, then stop with exit status 3 and the
last good checkpoint), kill -9 while last.ckpt is written then a resume equal to the
uninterrupted run, a full disk while checkpointing, damaged checkpoints named with the previous
one, and a resume checked against the run config stored in its checkpoint."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from conftest import run_train_cli
from test_train import RecordWindows

from tinyreason.checkpoints import load_model, read_checkpoint
from tinyreason.export import export
from tinyreason.train import train
from tinyreason.training.guard import FAULT_ENV, TrainingDiverged, non_finite
from tinyreason.training.run_config import RunConfig

pytestmark = pytest.mark.slow
# debug=fast without exact match during training, checkpoints every 2 steps
FAST = ("debug=fast", "logger=none", "eval.during_training.num_problems=0")
QUICK = (*FAST, "trainer.val_check_interval=2")
DONE = (*QUICK, "eval.at_end=false", "export.hf=false")  # a run that ends: nothing after fit


def model_weights(state_dict: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith("model.")}


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for i, state in a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


class PoisonGrads(L.Callback):
    """A NaN in one gradient at the given steps, after backward and before the guard looks."""

    def __init__(self, steps) -> None:
        self.steps, self.module, self.optimizer = set(steps), None, None

    def on_after_backward(self, trainer, pl_module) -> None:
        self.module, self.optimizer = pl_module, trainer.optimizers[0]
        if trainer.global_step in self.steps:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")


def test_non_finite_steps_are_skipped_then_the_run_stops_on_its_last_good_checkpoint(
    make_cfg, tmp_path
):
    run = tmp_path / "run"
    poison = PoisonGrads(range(2, 6))  # 2, 3, 4 are skipped; the 4th in a row stops the run
    with (
        pytest.warns(UserWarning, match=r"step 2: .*gradient norm nan: step skipped, no update"),
        pytest.raises(TrainingDiverged) as stop,
    ):  # export.hf and eval.at_end on
        train(make_cfg(*QUICK, "trainer.max_steps=6", run_dir=run), callbacks=[poison])
    first, second = str(stop.value).splitlines()
    assert first.startswith("step 5: the loss is ") and "4 non-finite steps in a row" in first
    assert first.endswith(
        f"{run / 'checkpoints' / 'last.ckpt'} (step 4) keeps the last good weights."
    )
    assert second.startswith("Try a lower optim.lr (now 0.003)")
    assert "trainer.gradient_clip_val" in second and second.endswith("ckpt_path=last.")
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and not non_finite(last["state_dict"])
    # the skipped steps changed nothing: the weights (MoE router biases too) and AdamW state in
    # memory at the stop, and in last.ckpt (step 4), are those after step 1, bit for bit
    good = read_checkpoint(run / "checkpoints" / "best-2.ckpt")
    now = model_weights(poison.module.state_dict())
    assert now.keys() == model_weights(good["state_dict"]).keys()
    assert any(k.endswith("e_score_correction_bias") for k in now)
    for state in (now, last["state_dict"]):
        assert all(torch.equal(good["state_dict"][k], state[k]) for k in now)
    for optimizer in (poison.optimizer.state_dict(), last["optimizer_states"][0]):
        assert_same_optimizer_state(good["optimizer_states"][0], optimizer)
    # nothing after fit ran on the bad state: no export, no final evaluation
    assert not (run / "hf").exists() and not (run / "eval.json").exists()


def test_non_finite_names_the_bad_tensors():
    state = {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "c": torch.ones(1, 2)}
    state["d"] = torch.tensor([float("nan")])
    assert non_finite({**state, "ids": torch.tensor([3])}) == ["b", "d"]


def test_a_diverging_run_exits_3_with_the_last_good_checkpoint(cache_dir, tmp_path):
    """The issue's `optim.lr=1e6`: step 0 lands, step 1's gradient norm is NaN (skipped: the
    checkpoint of step 2 holds step 1's weights), step 2 stops the run with status 3."""
    run = tmp_path / "run"
    proc = run_train_cli(
        *FAST,
        "optim.lr=1e6",
        "guard.max_bad_steps=1",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1",
        f"hydra.run.dir={run}",
        f"cache_dir={cache_dir}",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 1: the loss is" in proc.stderr and "step skipped" in proc.stderr
    error = re.search(r"^error: step 2: .*, 2 non-finite steps in a row .*$", proc.stderr, re.M)
    assert error and error.group().endswith("last.ckpt (step 2) keeps the last good weights.")
    assert "Try a lower optim.lr (now 1e+06)" in proc.stderr and "Traceback" not in proc.stderr
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and not non_finite(last["state_dict"])
    good = read_checkpoint(run / "checkpoints" / "best-1.ckpt")  # after step 0, the good one
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in model_weights(good).items())
    assert not (run / "hf").exists() and not (run / "eval.json").exists()


def test_kill_9_while_last_ckpt_is_written_then_resume_equals_uninterrupted(
    make_cfg, cache_dir, tmp_path
):
    """SIGKILL while the step-4 last.ckpt is half written (`TINYREASON_FAULT=hold:4` holds the
    writer): last.ckpt is still step 2's, whole; `ckpt_path=last` replays steps 2-3 on the same
    windows and ends bitwise equal to the uninterrupted run (CPU fp32 is deterministic)."""
    done = (*DONE, "trainer.max_steps=4")
    full = RecordWindows()
    expected = train(make_cfg(*done, run_dir=tmp_path / "full"), callbacks=[full])
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    partial, log = ckpts / "last.ckpt.partial", tmp_path / "killed.log"
    cli = [sys.executable, "-m", "tinyreason.train", *done, f"hydra.run.dir={run}"]
    env = {**os.environ, "WANDB_MODE": "offline", FAULT_ENV: "hold:4"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cli, f"cache_dir={cache_dir}"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        try:
            deadline = time.monotonic() + 300  # a hung run fails the test, not the suite
            while "half written, holding" not in log.read_text():  # every write has a partial
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the writer never reached step 4"
                time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            assert partial.stat().st_size > 0, "killed with last.ckpt half written"
        finally:
            proc.kill()
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 2  # the previous one, whole
    with pytest.raises(ValueError, match=r"last.ckpt.partial is damaged or incomplete \(.+\); "):
        read_checkpoint(partial)

    resumed = RecordWindows()
    metrics = train(make_cfg(*done, "ckpt_path=last", run_dir=run), callbacks=[resumed])
    assert resumed.seen == full.seen[2 * 2 :], "the windows from the checkpoint on"
    for key in ("val/bpb", "val/loss", "val/ppl", "train/loss", "tokens"):
        assert metrics[key] == expected[key], key
    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(ckpts / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert_same_optimizer_state(a["optimizer_states"][0], b["optimizer_states"][0])
    assert not partial.exists(), "the next write of last.ckpt replaces the killed one's"


def test_a_full_disk_while_checkpointing_keeps_the_previous_last_ckpt(
    make_cfg, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    short = (*DONE, "trainer.max_steps=4")
    monkeypatch.setenv(FAULT_ENV, "enospc:4")  # half of step 4's last.ckpt, then ENOSPC
    with pytest.raises(ValueError) as err:
        train(make_cfg(*short, run_dir=run))
    assert str(err.value) == (
        f"could not write checkpoint {run / 'checkpoints' / 'last.ckpt'} (No space left on "
        "device); the previous last.ckpt is intact; free some space, then resume with "
        "ckpt_path=last"
    )
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not list((run / "checkpoints").glob("*.partial")), "no partial file left behind"
    monkeypatch.delenv(FAULT_ENV)  # space freed: the resume finishes the run
    metrics = train(make_cfg(*short, "ckpt_path=last", run_dir=run))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert metrics["tokens"] == 4 * 2 * 320


def test_a_damaged_checkpoint_is_named_with_the_previous_one(make_cfg, pretrained, tmp_path):
    """Resume, model.init_from, export and evaluate / generate (load_model) all read through
    `read_checkpoint`: a truncated, empty or foreign file is named, with the newest other .ckpt."""
    source, _ = pretrained
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(source / "tokenizer", run / "tokenizer")
    data = (source / "checkpoints" / "last.ckpt").read_bytes()
    (ckpts / "best-15.ckpt").write_bytes(data)
    last = ckpts / "last.ckpt"
    pretrain = ("debug=fast", "logger=none", "export.hf=false", "trainer.max_steps=20")
    readers = {
        "resume": lambda: RunConfig.from_hydra(make_cfg(*pretrain, f"ckpt_path={last}")),
        "init_from": lambda: RunConfig.from_hydra(
            make_cfg("stage=sft", "debug=fast", f"model.init_from={run}")
        ),
        "export": lambda: export(run, tmp_path / "hf"),
        "load_model": lambda: load_model(run),
    }
    for damage in (data[: len(data) // 2], b"", b"not a checkpoint"):
        last.write_bytes(damage)
        for name, read in readers.items():
            with pytest.raises(ValueError) as err:
                read()
            assert re.fullmatch(
                rf"checkpoint {re.escape(str(last))} is damaged or incomplete \(.+\); the "
                rf"previous one is {re.escape(str(ckpts / 'best-15.ckpt'))}",
                str(err.value),
            ), (name, str(err.value))
    (ckpts / "best-15.ckpt").unlink()
    with pytest.raises(ValueError, match=rf"; no other .ckpt in {re.escape(str(ckpts))}$"):
        load_model(run)
    assert not (tmp_path / "hf").exists()


def test_a_resume_keeps_architecture_tokenizer_and_data_and_reports_the_rest(
    make_cfg, pretrained, tmp_path, caplog
):
    """Checked against `run_config` in the checkpoint, before any work; `model.hidden_size=128`
    on a run trained at 96 was torch's "size mismatch ..." from load_state_dict."""
    source, _ = pretrained
    ckpt = source / "checkpoints" / "last.ckpt"
    same = (
        "debug=fast",
        "logger=none",
        "export.hf=false",
        "trainer.max_steps=20",
        f"ckpt_path={ckpt}",
    )
    changed = ("model.hidden_size=128", "data.seq_len=128", "tokenizer.vocab_size=600", "seed=1")
    with pytest.raises(ValueError) as err:
        RunConfig.from_hydra(make_cfg(*same, *changed, "optim.lr=1e-3"))
    first, second = str(err.value).splitlines()
    assert first == (
        f"ckpt_path={ckpt}: a resume keeps the architecture, tokenizer, data, stage and seed of "
        f"{ckpt}; these differ: data.seq_len: 320 -> 128; model.hidden_size: 96 -> 128; "
        "seed: 0 -> 1; tokenizer.vocab_size: 512 -> 600"
    )
    assert "model.init_from" in second
    with pytest.raises(
        ValueError, match=r"these differ: stage.datamodule: .*stage.name: pretrain -> sft"
    ):
        RunConfig.from_hydra(make_cfg(*same, "stage=sft"))
    training = ("optim.lr=1e-3", "trainer.max_steps=40", "model.moe.bias_update_speed=0.01")
    with caplog.at_level(logging.INFO, logger="tinyreason.training.resume"):
        run = RunConfig.from_hydra(make_cfg(*same, *training, "guard.max_bad_steps=0"))
    assert run.resume == ckpt and run.guard.max_bad_steps == 0
    (line,) = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert line.startswith(f"resuming {ckpt} at step 20 with changed keys: ")
    for change in (
        "guard.max_bad_steps: 3 -> 0",
        "model.moe.bias_update_speed: 0.001 -> 0.01",
        "optim.lr: 0.003 -> 0.001",
        "trainer.max_steps: 20 -> 40",
        f"run_dir: {source} -> {tmp_path / 'run'}",
    ):
        assert change in line, change
    with pytest.raises(ValueError, match="guard.max_bad_steps must be a whole number >= 0"):
        RunConfig.from_hydra(make_cfg("guard.max_bad_steps=-1"))
