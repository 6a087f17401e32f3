"""Hydra submitit launchers: the SLURM config's sbatch flags and Lightning's requeue/resume, a real local-executor job."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedlab.training import train
from tests.conftest import CONFIG_DIR, PROJECT_ROOT, compose_config

FAST = ["model=tiny", "data.batch_size=4", "data.val_fraction=0.3", "trainer.accelerator=cpu", "logger=none", "save_model=false"]


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_slurm_config_has_the_submitit_fields_and_lightning_requeue(tmp_path, tiny_data_root):
    cfg = compose_with_hydra(["launcher=slurm", "model=tiny", f"data.root={tiny_data_root}", "trainer.devices=4", "++trainer.num_nodes=2"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # every key is a field of hydra-submitit-launcher's SlurmQueueConf (the plugin would reject others)
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    assert set(launcher) <= set(OmegaConf.structured(SlurmQueueConf).keys())
    assert launcher["tasks_per_node"] == 4 and launcher["gpus_per_node"] == 4 and launcher["nodes"] == 2
    assert launcher["timeout_min"] == 240 and launcher["max_num_timeout"] == 0
    assert launcher["additional_parameters"] == {"signal": "USR1@120"}
    # Lightning's SLURM environment requeues on SIGUSR1, the signal the sbatch flag asks for
    io, env = [instantiate(p) for p in cfg.trainer.plugins]
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from embedlab.lightning.checkpoint_io import SafeCheckpointIO

    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert isinstance(io, SafeCheckpointIO)  # the launcher's plugin list keeps the default checkpoint IO


def test_slurm_launcher_writes_one_usr1_signal_flag(tmp_path, tiny_data_root, monkeypatch):
    """The plugin's own parameter mapping, up to the sbatch file (submitit needs `srun` on PATH: a stub)."""
    import submitit

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 0\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}:{__import__('os').environ['PATH']}")
    scripts = []

    class Recorder(submitit.AutoExecutor):
        def map_array(self, fn, *args):
            scripts.append(self._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid"))
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", Recorder)
    cfg = compose_with_hydra(
        ["launcher=slurm", "model=tiny", f"data.root={tiny_data_root}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.partition=gpu"]
    )
    launcher = instantiate(cfg.hydra.launcher)  # as Hydra builds it: SlurmLauncher(**params)
    launcher.config = cfg
    assert launcher.launch([["model=tiny"]], initial_job_idx=0) == []
    (script,) = scripts
    flags = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert [f for f in flags if f.startswith("#SBATCH --signal")] == ["#SBATCH --signal=USR1@120"]
    for flag in ("--partition=gpu", "--ntasks-per-node=1", "--gpus-per-node=1", "--nodes=1", "--time=240", "--cpus-per-task=8", "--mem=64GB"):
        assert f"#SBATCH {flag}" in flags, flag


def test_requeued_slurm_job_resumes_from_the_hpc_checkpoint(tmp_path, tiny_data_root, monkeypatch):
    """What a requeued job does: same run dir, ckpt_path null, SLURM detected -> Lightning loads hpc_ckpt_<n>.ckpt."""
    first = tmp_path / "first"
    _, done = train(compose_config("train", FAST + ["trainer.max_epochs=1", f"data.root={tiny_data_root}"], first))
    per_epoch = done["trainer"].global_step
    run = tmp_path / "requeued"
    run.mkdir()
    # the checkpoint Lightning's SIGUSR1 handler writes before `scontrol requeue` (trainer.save_checkpoint)
    shutil.copy(first / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config("train", FAST + ["launcher=slurm", "trainer.max_epochs=2", f"data.root={tiny_data_root}"], run)
    assert cfg.ckpt_path is None
    _, resumed = train(cfg)
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    assert isinstance(resumed["trainer"]._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert resumed["trainer"].global_step == 2 * per_epoch  # one more epoch, not two from scratch


def test_ckpt_path_last_resumes_the_runs_last_checkpoint(tmp_path, tiny_data_root):
    """ckpt_path=last (Lightning 2.6 resolves it to the newest ModelCheckpoint last*.ckpt of the run); a fresh run dir
    only warns and starts from scratch, so it can always be set."""
    run = tmp_path / "run"
    _, fresh = train(compose_config("train", FAST + ["trainer.max_epochs=1", "ckpt_path=last", f"data.root={tiny_data_root}"], run))
    per_epoch = fresh["trainer"].global_step
    assert per_epoch > 0 and (run / "checkpoints" / "last.ckpt").is_file()
    _, resumed = train(compose_config("train", FAST + ["trainer.max_epochs=2", "ckpt_path=last", f"data.root={tiny_data_root}"], run))
    assert resumed["trainer"].global_step == 2 * per_epoch


@pytest.mark.slow
def test_local_launcher_runs_a_training_job(tmp_path, tiny_data_root):
    """python train.py -m launcher=local ...: one job through submitit's local executor (a pickled job in a
    subprocess, as on SLURM); its run folder is <sweep dir>/0 with metrics.json. ~20-40 s: marked slow."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "launcher=local", "model=tiny", f"data.root={tiny_data_root}",
           "++trainer.max_steps=2", "logger=none", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*.err")) if sweep.is_dir() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + logs[-3000:]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert "test/ndcg@10" in metrics and 0.0 <= metrics["test/ndcg@10"] <= 1.0
    assert list(sweep.glob(".submitit/*/*_submitted.pkl")), "the job did not go through submitit"
