"""Sweeps beyond one process, on Hydra's launcher plugins (``pip install -e ".[cluster]"``).

- ``hydra/launcher=local_pool`` (Ray): the jobs of a sweep run side by side, each in its own process, run
  folder and W&B run; the summary is the one of a sequential sweep; a failing job does not stop the others.
- ``hydra/launcher=slurm`` (submitit): the sbatch script carries the partition, GPUs, time limit, requeue
  signal and log folders of the config; written here by the real launcher with ``sbatch`` faked.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from datetime import datetime, timedelta
from itertools import combinations
from pathlib import Path

import pytest

from conftest import credential_free_env  # tests/conftest.py
from detr_lightning.sweep import summarize_sweep

from .conftest import REPO_ROOT
from .test_sweep import QUICKER, read_summary, table_rows
from .test_wandb import wandb_records

pytestmark = pytest.mark.slow

pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the [cluster] extra is not installed")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the [cluster] extra is not installed")


def job_status(job_dir: Path) -> dict:
    return json.loads((job_dir / "job_status.json").read_text())


def job_interval(job_dir: Path) -> tuple[datetime, datetime]:
    """When a job started and ended, from its ``job_status.json``."""
    status = job_status(job_dir)
    started = datetime.fromisoformat(status["started"])
    return started, started + timedelta(seconds=status["duration_s"])


def test_local_pool_runs_jobs_side_by_side_and_goes_on_after_a_failed_job(small_demo, tmp_path):
    """Three jobs, two at a time; ``model.num_classes=1`` (the last job) cannot hold the demo's labels.

    ``gpu_pool`` (``local_pool`` with one GPU per job) with two GPUs declared to Ray: on this CPU machine
    they exist only as Ray resources, yet Ray hands each running job one of its own (CUDA_VISIBLE_DEVICES),
    and only two jobs fit at once: the third waits for a free one. The jobs train on the CPU
    (``trainer.accelerator=cpu``), one step each, without a sanity check or checkpoints (``test=false``
    needs none): each is a fresh Ray worker process, whose imports take most of its seconds."""
    sweep_dir = tmp_path / "sweep"
    arguments = [
        "-m",
        "hydra/launcher=gpu_pool",
        "hydra.launcher.ray.init.num_cpus=2",
        "hydra.launcher.ray.init.num_gpus=2",
        "hydra.launcher.ray.remote.num_cpus=1",
        "experiment=demo",
        "logger=wandb",
        f"data.root={small_demo}",
        f"hydra.sweep.dir={sweep_dir}",
        "model.num_classes=5,6,1",  # demo category ids go up to 4: 1 fails, the others train
        "test=false",
        "callbacks.plots=null",
        "callbacks.wandb_media=null",
        "callbacks.model_checkpoint=null",
        "trainer.enable_checkpointing=false",
        "trainer.num_sanity_val_steps=0",
        *QUICKER,
    ]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *arguments],
        cwd=tmp_path,
        env=credential_free_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Ray Launcher is launching 3 jobs" in output

    # Side by side: the first two jobs start together in two fresh worker processes and train for seconds
    # (the failing one, last, ends at once). And one GPU of its own per job: jobs that overlapped in time
    # never shared one.
    intervals = {job: job_interval(sweep_dir / str(job)) for job in range(3)}
    devices = {job: job_status(sweep_dir / str(job))["cuda_visible_devices"] for job in range(3)}
    assert set(devices.values()) <= {"0", "1"}, devices
    overlapping = [
        (a, b)
        for a, b in combinations(range(3), 2)
        if intervals[a][0] < intervals[b][1] and intervals[b][0] < intervals[a][1]
    ]
    assert (0, 1) in overlapping, intervals
    for a, b in overlapping:
        assert devices[a] != devices[b], (devices, a, b)

    # The summary of a sequential sweep: same columns, ranked, the failed job last with its error.
    columns, rows = read_summary(sweep_dir / "summary.csv")
    assert columns == [
        "rank",
        "job",
        "status",
        "model.num_classes",
        "best val/map",
        "best_epoch",
        "epochs",
        "duration_s",
        "error",
        "overrides",
    ]
    assert sorted((row["job"], row["model.num_classes"], row["status"]) for row in rows) == [
        ("0", "5", "ok"),
        ("1", "6", "ok"),
        ("2", "1", "failed"),
    ]
    assert rows[-1]["job"] == "2"
    for row in rows[:-1]:
        assert row["best val/map"] != "" and row["error"] == "" and row["epochs"] == "1"
    best = [float(row["best val/map"]) for row in rows[:-1]]
    assert best == sorted(best, reverse=True)
    failed = rows[-1]
    assert failed["error"].startswith("model.num_classes=1 cannot hold the data's labels")
    assert "at least 5" in failed["error"] and failed["best val/map"] == ""
    assert "num_classes=1 cannot hold" in (sweep_dir / "2" / "train.log").read_text()
    assert "Traceback" not in (sweep_dir / "2" / "train.log").read_text()  # a user error: its message only
    assert "Traceback" not in output, output[output.index("Traceback") - 2000 :][:4000]

    printed = table_rows(result.stdout)
    assert [cells[1:4] for cells in printed] == [
        [row["job"], row["status"], row["model.num_classes"]] for row in rows
    ]
    assert "model.num_classes=1 cannot hold" in printed[-1][-1]

    # Each job its own process and W&B run (offline here), in the sweep's group.
    runs = []
    for job in ("0", "1"):
        [offline_run] = (sweep_dir / job / "wandb").glob("offline-run-*")
        records = wandb_records(next(offline_run.glob("run-*.wandb")))
        runs.append(next(r.run for r in records if r.WhichOneof("record_type") == "run"))
    assert len({run.run_id for run in runs}) == 2
    assert {run.run_group for run in runs} == {"sweep"}  # the sweep folder's name


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_launcher_writes_the_sbatch_script_of_the_config(compose_config, tmp_path, monkeypatch):
    """The real launcher submits a job array; ``sbatch`` is faked to keep the script and not wait."""
    import submitit
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    recorded = tmp_path / "recorded.sbatch"
    write_executable(fake_bin / "sbatch", f'#!/bin/sh\ncp "$1" {recorded}\necho "Submitted batch job 4242"\n')
    write_executable(fake_bin / "srun", "#!/bin/sh\nexit 0\n")  # submitit checks that srun exists
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda job: ["not run here"])

    sweep_dir = tmp_path / "sweep"
    cfg = compose_config(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu-long",
            "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=720",
            "hydra.launcher.array_parallelism=2",
            "+hydra.launcher.additional_parameters.account=my_lab",  # any other sbatch option (README)
            f"hydra.sweep.dir={sweep_dir}",
            "experiment=demo",
        ]
    )
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda config: None, config=cfg)
    returns = launcher.launch([[f"loss.bbox_loss_coef={c}"] for c in (2, 5, 8)], initial_job_idx=0)
    assert returns == ["not run here"] * 3

    script = recorded.read_text()
    options = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    logs = sweep_dir / ".submitit" / "%A_%a"
    assert {
        "--partition=gpu-long",
        "--account=my_lab",
        "--gpus-per-node=2",
        "--ntasks-per-node=2",
        "--nodes=1",
        "--time=720",
        "--array=0-2%2",  # three jobs, at most 2 at once
        "--signal=USR2@120",  # warned 2 minutes before the time limit: submitit requeues the job
        "--open-mode=append",  # a requeued job appends to its logs
        f"--output={logs}/%A_%a_0_log.out",
        f"--error={logs}/%A_%a_0_log.err",
    } <= options
    assert "-m submitit.core._submit" in script.splitlines()[-1]
    assert (sweep_dir / ".submitit").is_dir()


def test_a_killed_job_shows_as_failed_with_its_error_and_a_running_one_as_incomplete(tmp_path):
    """A job killed outright (SIGKILL, out of memory) never records its end; its process is gone."""
    sweep_dir = tmp_path / "sweep"
    job_dir = sweep_dir / "0"
    job_dir.mkdir(parents=True)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = {"status": "running", "overrides": ["loss.bbox_loss_coef=2"], "started": "2026-12-02T10:00:00"}
    record.update(pid=process.pid, host=socket.gethostname())
    (job_dir / "job_status.json").write_text(json.dumps(record))
    try:
        [job] = summarize_sweep(sweep_dir, "val/map")
        assert job.status == "incomplete" and "still running" in job.error
    finally:
        process.kill()
        process.wait()
    [job] = summarize_sweep(sweep_dir, "val/map")
    assert job.status == "failed"
    assert job.error.startswith(f"killed: its process ({process.pid} on {socket.gethostname()})")
