"""Sweeps on a cluster and locally: the ranks of a submitit job for Lightning, and each -m sweep's
launcher checked against every job before any starts (conf/hydra/launcher/, README).

What each launcher runs (`hydra/launcher=...`):
  basic (Hydra's default)  the jobs one after another in this process. Under -m a job runs on one
      device: Lightning starts ranks 1.. by re-running the command, here the whole -m sweep (Hydra
      issue 2231), and the process group and LOCAL_RANK it leaves behind outlive the job: a later
      job with more devices then trains alone while counting every rank's tokens.
  joblib (the plugin's)  jobs as worker processes of this machine, n_jobs at a time, one device each.
  local / slurm (ours, on the submitit plugin's schemas)  each job a submitit job of
      tasks_per_node = trainer.devices tasks on each of trainer.num_nodes nodes;
      `SubmititEnvironment` hands Lightning each task's rank, so Lightning starts no process.
      Hydra resolves `hydra.launcher` once, against the command line's config: all jobs of one
      sweep get the same tasks. (Ours are not named submitit_local / submitit_slurm: a YAML with
      a plugin schema's name is matched to it by Hydra's deprecated automatic schema matching,
      with a warning on every command.)

Under SLURM the tasks carry SLURM_* variables too, and Lightning would pick its SLURMEnvironment
on its own; the submitit environment is passed in `plugins`, which Lightning prefers, so the
ranks and main port come from one place on a laptop and on a cluster, and Lightning adds no
SIGUSR1 handler that requeues the job (`scontrol requeue`) beside submitit's, which owns the
job's timeout and requeue.
"""

from __future__ import annotations

import os
import random
import sys
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from omegaconf import DictConfig, OmegaConf

from tinyreason import errors
from tinyreason.errors import UserError

if TYPE_CHECKING:
    from tinyreason.training.run_config import TrainerConfig

BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."  # Local/SlurmLauncher
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class SubmititEnvironment(ClusterEnvironment):
    """The ranks of a submitit job, one task per device (started by submitit locally, by srun on
    SLURM)."""

    def __init__(self, job: Any) -> None:  # a submitit.JobEnvironment
        super().__init__()
        self.job = job

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1" if self.job.cluster == "local" else self.job.hostnames[0]

    @property
    def main_port(self) -> int:  # the same in every task: from the job id, as submitit's helper
        port = os.environ.get("MASTER_PORT")
        return int(port) if port else random.Random(self.job.job_id).randint(20_000, 60_000)

    @staticmethod
    def detect() -> bool:
        return bool(os.environ.get("SUBMITIT_EXECUTOR"))  # set by submitit in each task it starts

    def world_size(self) -> int:
        return self.job.num_tasks

    def set_world_size(self, size: int) -> None:
        pass  # the job's tasks fix it

    def global_rank(self) -> int:
        return self.job.global_rank

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return self.job.local_rank

    def node_rank(self) -> int:
        return self.job.node


def cluster_environment() -> SubmititEnvironment | None:
    """The submitit job this process is a task of, or None outside one."""
    if not SubmititEnvironment.detect():
        return None
    import submitit

    return SubmititEnvironment(submitit.JobEnvironment())


def cluster_plugins(trainer: TrainerConfig) -> list[ClusterEnvironment]:
    """Lightning `plugins` for the job: its submitit environment, whose tasks must be the run's
    ranks (a sweeper that does not list its jobs up front is checked here, in the job)."""
    env = cluster_environment()
    if env is None:
        return []
    tasks, nodes = env.job.num_tasks, env.job.num_nodes
    if tasks != trainer.world_size or nodes != trainer.num_nodes:
        raise UserError(
            f"this submitit job has {tasks} tasks on {nodes} node(s), but trainer.devices="
            f"{trainer.devices} x trainer.num_nodes={trainer.num_nodes}: leave "
            "hydra.launcher.tasks_per_node and nodes to follow them (hydra/launcher=local or slurm)"
        )
    if env.job.cluster == "local" and "OMP_NUM_THREADS" not in os.environ:
        import torch  # the tasks share this machine's cores, as Lightning divides them for its own

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // tasks))
    return [env]


class LaunchCheck(Callback):
    """Hydra callback (conf/train.yaml): a -m sweep whose launcher cannot run one of its jobs stops
    before any job starts, or anything is submitted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(config)
        except UserError as err:  # Hydra turns a callback's exception into a warning: exit here
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(errors.EXIT_CODE) from None


def check_sweep(config: DictConfig) -> None:
    """Every job of the sweep `config` (Hydra's multirun config) against its launcher."""
    launcher = OmegaConf.select(config, "hydra.launcher._target_") or ""
    submitit = launcher.startswith(SUBMITIT)
    if submitit and not isinstance(config.trainer.devices, int):
        raise UserError(
            f"trainer.devices={config.trainer.devices}: a submitit job starts one task per "
            "device (hydra.launcher.tasks_per_node); set trainer.devices to a number"
        )
    if submitit:  # what every job gets: Hydra resolves hydra.launcher from the command line
        tasks, nodes = config.hydra.launcher.tasks_per_node, config.hydra.launcher.nodes
    for job, trainer in _jobs(config):
        devices, num_nodes = trainer.devices, trainer.num_nodes
        per_node = _processes_per_node(devices, trainer.accelerator)
        where = f"{job}: trainer.devices={devices} trainer.num_nodes={num_nodes}"
        if launcher == JOBLIB and per_node * num_nodes > 1:
            raise UserError(
                f"{where} on hydra/launcher=joblib, which runs each job as a worker process of "
                "this machine on one device: run the job without -m (basic launcher), or sweep "
                "with hydra/launcher=local or slurm (submitit: one task per device)"
            )
        if launcher == BASIC and per_node > 1 and _lightning_starts_ranks():
            raise UserError(
                f"{where} in a -m sweep on Hydra's basic launcher: Lightning would start the "
                "other ranks by re-running this command, the whole sweep included (Hydra issue "
                "2231); sweep with hydra/launcher=local (submitit: one task per device), or run "
                "each job without -m"
            )
        if submitit and launcher.endswith("LocalLauncher") and num_nodes > 1:
            raise UserError(
                f"{where}: a local submitit launcher runs on this machine; several nodes: "
                "hydra/launcher=slurm"
            )
        if submitit and (tasks, nodes) != (devices, num_nodes):
            raise UserError(
                f"{where}, but hydra.launcher starts tasks_per_node={tasks} x nodes={nodes} tasks "
                "for every job of the sweep: use hydra/launcher=local or slurm (one task per "
                "device of the command line's trainer.devices) and one device count per sweep"
            )


def _jobs(config: DictConfig):
    """(name, trainer section) of each job the sweep launches, composed as the launcher will;
    the command line's config alone when the sweeper does not list its jobs up front."""
    sweeper = config.hydra.sweeper
    if sweeper._target_ != BASIC_SWEEPER:
        yield "the sweep", config.trainer
        return
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
    overrides = OverridesParser.create(loader).parse_overrides(
        [*params, *config.hydra.overrides.task]
    )
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    for num, job in enumerate(jobs):
        name = " ".join(o for o in job if o.split("=")[0] in swept)
        job_cfg = loader.load_sweep_config(config, list(job))
        yield f"job #{num}" + (f" ({name})" if name else ""), job_cfg.trainer


def _processes_per_node(devices: int | str, accelerator: str) -> int:
    if isinstance(devices, int):
        return devices
    if accelerator == "cpu":  # devices=auto: one CPU process, or every GPU
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)


def _lightning_starts_ranks() -> bool:
    """Lightning would start ranks 1.. itself: no launcher (torchrun, srun) started them."""
    started = TorchElasticEnvironment.detect() or SLURMEnvironment.detect()
    return not (started or LightningEnvironment().creates_processes_externally)
