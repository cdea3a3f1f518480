"""Sweeps through Hydra launchers (`hydra/launcher=local | slurm | joblib`, training/cluster.py):
a local submitit sweep whose jobs each train on two ranks that submitit started, the submitit ranks
winning over Lightning's SLURM detection, and every sweep a launcher cannot run refused before any
job starts."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_train_cli

from tinyreason import errors
from tinyreason.errors import UserError
from tinyreason.training.cluster import SubmititEnvironment, cluster_plugins
from tinyreason.training.run_config import TrainerConfig

QUICK = ("debug=fast", "logger=csv", "export.hf=false")


def last_tokens(run: Path) -> float:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r["tokens"]) for r in csv.DictReader(f) if r.get("tokens")][-1]


@pytest.mark.slow
def test_local_submitit_sweep_trains_each_job_on_two_ranks(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train_cli(
        "-m",
        *QUICK,
        "hydra/launcher=local",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.val_check_interval=2",
        "trainer.max_steps=2,4",
        "hydra.sweeper.max_batch_size=1",  # one job at a time on these 2 cores
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={cache_dir}",
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = sorted(p.name.split("_", 1)[1] for p in sweep.glob(".submitit/*/*_log.err"))
    assert tasks == ["0_log.err", "0_log.err", "1_log.err", "1_log.err"]  # 2 jobs x 2 tasks
    for job, steps in [("0", 2), ("1", 4)]:
        run = sweep / job
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == steps
        assert last_tokens(run) == steps * 2 * 320 * 2  # steps x batch x window x 2 ranks
        assert (run / "tokenizer" / "tokenizer.json").is_file()
    rank1 = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_1_log.err"))
    assert rank1.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2


@pytest.mark.parametrize(
    "overrides, phrases",
    [
        (  # joblib: worker processes of one machine, one device each
            ("hydra/launcher=joblib", "trainer.devices=2", "seed=0,1"),
            ("job #0 (seed=0)", "hydra/launcher=joblib", "one device", "hydra/launcher=local"),
        ),
        (  # basic launcher: Lightning's rank 1 would re-run the whole -m command
            ("trainer.devices=2", "trainer.strategy=ddp", "seed=0,1"),
            ("basic launcher", "the whole sweep included", "hydra/launcher=local"),
        ),
        (  # one submitit launch gives every job the tasks of the command line's trainer.devices
            ("hydra/launcher=local", "trainer.devices=1,2", "trainer.strategy=ddp"),
            ("job #1 (trainer.devices=2)", "tasks_per_node=1", "one device count per sweep"),
        ),
        (  # the plugin's own config: one task per job
            ("hydra/launcher=submitit_local", "trainer.devices=2", "trainer.strategy=ddp"),
            ("tasks_per_node=1", "hydra/launcher=local or slurm"),
        ),
        (
            ("hydra/launcher=local", "trainer.num_nodes=2"),
            ("runs on this machine", "hydra/launcher=slurm"),
        ),
        (
            ("hydra/launcher=slurm", "trainer.devices=auto"),
            ("trainer.devices=auto", "set trainer.devices to a number"),
        ),
    ],
)
def test_a_sweep_its_launcher_cannot_run_stops_before_any_job(
    tmp_path, monkeypatch, capsys, overrides, phrases
):
    """In-process `python -m tinyreason.train -m ...`: Hydra's callback refuses it (exit 2)."""
    from tinyreason import train as train_cli

    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["train", "-m", *QUICK, *overrides, f"hydra.sweep.dir={sweep}"]
    )
    with pytest.raises(SystemExit) as exit_:
        train_cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == errors.EXIT_CODE and "Traceback" not in err, err
    (report,) = [line for line in err.splitlines() if line.startswith("error: ")]
    for phrase in phrases:
        assert phrase in report, (phrase, report)
    assert not sweep.exists()  # no job dir, no submitit folder, nothing submitted


def submitit_slurm_task(monkeypatch, ntasks: int, nodes: int, rank: int) -> None:
    """The variables srun and submitit's sbatch script give a task of a SLURM job."""
    per_node = ntasks // nodes
    variables = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": "gpu[3-4]",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % per_node),
        "SLURM_NODEID": str(rank // per_node),
        "SLURM_JOB_NAME": "train",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)


def test_outside_a_submitit_job_lightning_keeps_its_own_environment(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert cluster_plugins(TrainerConfig(devices=2, strategy="ddp")) == []


def test_a_slurm_task_gets_submitit_ranks_over_lightnings_slurm_detection(monkeypatch):
    submitit_slurm_task(monkeypatch, ntasks=4, nodes=2, rank=3)
    (env,) = cluster_plugins(TrainerConfig(devices=2, num_nodes=2, strategy="ddp"))
    assert isinstance(env, SubmititEnvironment) and env.creates_processes_externally
    ranks = (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank())
    assert ranks == (4, 3, 1, 1)
    assert env.main_address == "gpu3"  # the job's first node
    submitit_slurm_task(monkeypatch, ntasks=4, nodes=2, rank=0)
    (env0,) = cluster_plugins(TrainerConfig(devices=2, num_nodes=2, strategy="ddp"))
    assert env0.main_port == env.main_port  # every task derives one port from the job id
    trainer = L.Trainer(
        accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", plugins=[env], logger=False
    )
    assert trainer.strategy.cluster_environment is env  # not a SLURMEnvironment of its own


def test_a_job_whose_tasks_are_not_its_ranks_is_refused(monkeypatch):
    submitit_slurm_task(monkeypatch, ntasks=2, nodes=1, rank=0)
    with pytest.raises(UserError, match="2 tasks on 1 node"):
        cluster_plugins(TrainerConfig(devices=4, strategy="ddp"))
