"""Two "nodes" of one CPU process each on localhost: ``train.py trainer=ddp trainer.num_nodes=2`` under two
``torchrun --nnodes=2`` (gloo), as on two machines.

One multi-node run (module fixture) is compared with one process on the same global batch: the same loss
at every step, every validation and test image evaluated once across the ranks, ``last.ckpt`` written by
rank 0 alone and resumable by one process. A bad dataset stops both ranks with rank 0's one message, under
torchrun and with the variables ``srun`` sets (Lightning's SLURMEnvironment; there is no SLURM here).

The dataset is the demo's generator with square 64-pixel images, and the transforms keep them 64x64: a
batch then pads nothing, so how the global batch is split cannot change DETR's outputs (padding does).
Per-process batch norm statistics and the per-process class-weight normalisation of the cross-entropy are
the two things the official code does not split exactly; ``model.backbone_norm=frozen`` and
``loss.eos_coef=1`` take them out, the box losses split exactly (normalised by all processes' boxes).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import pytest
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from omegaconf import OmegaConf

from detr_lightning.data.demo import ensure_demo_dataset
from detr_lightning.distributed import (
    external_cluster_environment,
    launched_rank,
    process_group_backend,
    started_by_lightning_launcher,
)

from .conftest import REPO_ROOT, cli_env, load_checkpoint, run_cli

pytestmark = pytest.mark.slow

# Odd: the two ranks' evaluation shards differ in size (2 and 3 images). One batch each (batch 3): with a
# different number of batches per rank, the validation step's box count (an all_reduce) would wait forever.
NUM_VAL = NUM_TEST = 5
DEMO_QUERIES = 20  # model.num_queries of experiment=demo: detections per image
PROBE = "robustness.test_multi_node.StepProbe"  # importable by train.py with tests/ on PYTHONPATH
COCO_SUMMARY_LINE = "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"


class _LoggedWrites(CheckpointIO):
    """The strategy's checkpoint writer, printing one line per file it writes (and which rank wrote it)."""

    def __init__(self, inner: CheckpointIO, rank: int) -> None:
        self.inner = inner
        self.rank = rank

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        print(f"checkpoint writer: rank {self.rank} wrote {Path(path).name}", flush=True)
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class StepProbe(lightning.Callback):
    """Added to the runs below (``+callbacks.probe``): per rank, the loss of every training step and the
    image ids of every evaluation batch, in ``out_dir/rank{R}_of_{W}.json``; a line per checkpoint written."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, list] = {"losses": [], "val": [], "test": []}

    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy.checkpoint_io, _LoggedWrites):
            trainer.strategy.checkpoint_io = _LoggedWrites(
                trainer.strategy.checkpoint_io, trainer.global_rank
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["losses"].append(float(outputs["loss"]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record["val"] += [int(target["image_id"]) for target in batch[2]]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.record["test"] += [int(target["image_id"]) for target in batch[2]]

    def teardown(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}_of_{trainer.world_size}.json"
        (self.out_dir / name).write_text(json.dumps(self.record))


def _args(data: Path, run_dir: Path, probe_dir: Path, *extra: str) -> list[str]:
    """A 2-step demo epoch on 64x64 images (global batch 4) with the probe; ``extra`` overrides win."""
    args = {
        "experiment": "demo",
        "data.root": str(data),
        "hydra.run.dir": str(run_dir),
        "trainer.accelerator": "cpu",
        "trainer.max_epochs": "1",
        "trainer.limit_train_batches": "2",
        "data.batch_size": "4",
        "data.val_batch_size": "3",
        "data.num_workers": "0",
        "data.persistent_workers": "false",
        "data.train_scales": "[64]",
        "data.train_max_size": "64",
        "data.train_crop_resize_scales": "[64]",
        "data.train_crop_size": "[64,64]",  # the whole 64x64 image: the crop branch keeps the size too
        "data.val_scale": "64",
        "data.val_max_size": "64",
        "model.backbone_norm": "frozen",
        "loss.eos_coef": "1.0",
        "callbacks.plots": "null",
        "callbacks.progress_bar": "null",
        "+callbacks.probe._target_": PROBE,
        "+callbacks.probe.out_dir": str(probe_dir),
    }
    args.update(item.split("=", 1) for item in extra)
    return [f"{key}={value}" for key, value in args.items()]


def _env(**extra: str) -> dict[str, str]:
    return cli_env(PYTHONPATH=str(REPO_ROOT / "tests"), **extra)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    """One of the two "nodes": its exit status, its launcher's own output and its process's output
    (rank = node rank)."""

    returncode: int
    launcher_output: str
    output: str


def _slurm_env(rank: int, port: int) -> dict[str, str]:
    """What ``srun`` sets for task ``rank`` of a job of 2 nodes x 1 task (what SLURMEnvironment reads)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "detr",
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": str(rank),
        "SLURM_NODEID": str(rank),
        "SLURM_LOCALID": "0",
        "MASTER_PORT": str(port),
    }


def _two_nodes(args: list[str], cwd: Path, launcher: str = "torchrun", timeout: float = 240) -> list[Node]:
    """``train.py ARGS`` as two nodes of one process each, side by side, started by ``launcher``.

    ``torchrun``: ``torchrun --nnodes=2 --nproc-per-node=1 --node-rank=R ...`` for R = 0, 1, each
    worker's stdout and stderr in files of its own (``--redirects 3``), apart from torchrun's own report,
    which prints a traceback of torchrun itself whenever a worker exits non-zero. ``srun``: the two
    processes ``srun`` would start, with its environment variables (no SLURM here).
    """
    port = _free_port()
    processes, logs = [], []
    for node_rank in (0, 1):
        log_dir = cwd / f"node{node_rank}"
        log_dir.mkdir(parents=True)
        env = _env(OMP_NUM_THREADS="1")  # one core per "node", as on two machines
        command = [sys.executable, str(REPO_ROOT / "train.py"), *args]
        if launcher == "torchrun":
            command[1:1] = [
                *("-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"),
                *(f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"),
                *(f"--log-dir={log_dir}", "--redirects=3"),
            ]
        else:
            env.update(_slurm_env(node_rank, port))
        logs.append((log_dir / "launcher.log").open("w"))
        processes.append(
            subprocess.Popen(command, cwd=cwd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two nodes did not finish in {timeout} s")
    finally:
        for process in processes:
            if process.poll() is None:
                # torchrun passes SIGTERM on to its worker (a new session) and kills it after 30 s.
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for log in logs:
            log.close()
    nodes = []
    for node_rank, process in enumerate(processes):
        log_dir = cwd / f"node{node_rank}"
        launcher_output = (log_dir / "launcher.log").read_text()
        worker = "".join(
            path.read_text() for name in ("stdout.log", "stderr.log") for path in log_dir.rglob(name)
        )
        if launcher != "torchrun":
            launcher_output, worker = "", launcher_output
        nodes.append(Node(process.returncode, launcher_output, worker))
    return nodes


@pytest.fixture(scope="module")
def square_demo(tmp_path_factory) -> Path:
    """The demo generator's dataset with 64x64 images: 8 train (two global batches of 4), 5 val, 5 test."""
    root = tmp_path_factory.mktemp("data") / "square_demo"
    return ensure_demo_dataset(
        root, num_train=8, num_val=NUM_VAL, num_test=NUM_TEST, min_side=64, max_side=64
    )


@dataclass
class MultiNodeRun:
    run_dir: Path
    nodes: list[Node]
    ranks: list[dict]  # the probe's record of rank 0 and rank 1
    single: dict  # the probe's record of one process on the same global batch
    resumed_dir: Path
    resumed: subprocess.CompletedProcess  # one process resuming from the two-node run's last.ckpt


@pytest.fixture(scope="module")
def multi_node_run(square_demo, tmp_path_factory) -> MultiNodeRun:
    """The two-node run (2 ranks x batch 2, then the test of its best checkpoint), then side by side (one
    core each): one process on the same global batch (batch 4, no test), and one process resuming from the
    two-node run's ``last.ckpt`` for one more epoch."""
    work = tmp_path_factory.mktemp("multi_node")
    run_dir, probe_dir = work / "run", work / "probe"
    nodes = _two_nodes(
        _args(
            square_demo,
            run_dir,
            probe_dir,
            "trainer=ddp",
            "trainer.num_nodes=2",
            "trainer.devices=1",
            "data.batch_size=2",
        ),
        cwd=work,
    )
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"rank {rank}:\n{node.output[-3000:]}\n{node.launcher_output[-2000:]}"
    single_dir, resumed_dir = work / "single", work / "resumed"
    last = run_dir / "checkpoints" / "last.ckpt"
    single_args = _args(square_demo, single_dir / "run", single_dir / "probe", "test=false")
    resume_args = _args(
        square_demo,
        resumed_dir,
        work / "resumed_probe",
        f"ckpt_path={last}",
        "trainer.max_epochs=2",
        "test=false",
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        single_run, resumed = (
            pool.submit(run_cli, args, work, _env()) for args in (single_args, resume_args)
        )
        result = single_run.result()
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((probe_dir / f"rank{rank}_of_2.json").read_text()) for rank in (0, 1)]
    single = json.loads((single_dir / "probe" / "rank0_of_1.json").read_text())
    return MultiNodeRun(run_dir, nodes, ranks, single, resumed_dir, resumed.result())


def test_two_nodes_compute_the_loss_of_one_process_at_every_step(multi_node_run):
    ranks, single = multi_node_run.ranks, multi_node_run.single
    assert len(single["losses"]) == 2 and all(len(rank["losses"]) == 2 for rank in ranks)
    for step, expected in enumerate(single["losses"]):
        two_node_mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        # Relative: the demo's total loss is about 50-80, where float32 steps are 8e-6 apart.
        assert two_node_mean == pytest.approx(expected, rel=1e-5, abs=0), step
        assert abs(ranks[0]["losses"][step] - ranks[1]["losses"][step]) > 1e-4  # really split
    # Step 1 ran on the weights of step 0's update: the averaged gradients equal the single process's.


def test_two_nodes_evaluate_every_image_once(multi_node_run, square_demo):
    ranks, run_dir = multi_node_run.ranks, multi_node_run.run_dir
    for split, folder, count in (("val", "valid", NUM_VAL), ("test", "test", NUM_TEST)):
        image_ids = {
            image["id"]
            for image in json.loads((square_demo / folder / "_annotations.coco.json").read_text())["images"]
        }
        seen = [rank[split] for rank in ranks]
        assert len(seen[0]) + len(seen[1]) == count, (split, seen)  # nobody evaluated an image twice
        assert set(seen[0]) | set(seen[1]) == image_ids, (split, seen)
        assert abs(len(seen[0]) - len(seen[1])) == 1  # unequal shards, no padding by repetition
        predictions = json.loads(
            (
                run_dir / ("predictions.coco.json" if split == "val" else "predictions_test.coco.json")
            ).read_text()
        )
        per_image = Counter(p["image_id"] for p in predictions)
        assert per_image == dict.fromkeys(image_ids, DEMO_QUERIES), (split, per_image)  # one query set each
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/map", "test/map"} <= set(metrics)
    rank0, rank1 = (node.output for node in multi_node_run.nodes)
    assert rank0.count(COCO_SUMMARY_LINE) == 2 and COCO_SUMMARY_LINE not in rank1  # scored once, on rank 0


def test_rank_zero_alone_writes_last_ckpt_and_one_process_resumes_from_it(multi_node_run):
    run_dir, nodes = multi_node_run.run_dir, multi_node_run.nodes
    writes = [
        line for node in nodes for line in node.output.splitlines() if line.startswith("checkpoint writer:")
    ]
    assert writes and all(line.startswith("checkpoint writer: rank 0 wrote ") for line in writes), writes
    assert "checkpoint writer: rank 0 wrote last.ckpt" in writes
    assert sorted(path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*.ckpt*")) == [
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ]
    last = run_dir / "checkpoints" / "last.ckpt"
    state = load_checkpoint(last)
    assert state["epoch"] == 0 and state["global_step"] == 2

    result = multi_node_run.resumed  # one process, ckpt_path=<that last.ckpt>, trainer.max_epochs=2
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(last) in result.stdout + result.stderr
    state = load_checkpoint(multi_node_run.resumed_dir / "checkpoints" / "last.ckpt")
    assert state["epoch"] == 1 and state["global_step"] == 4  # one more epoch of 2 steps, on 1 process
    assert state["optimizer_states"][0]["state"]  # AdamW moments carried over


def test_the_ranks_share_the_run_folder_each_with_its_own_log(multi_node_run):
    """Rank 0 writes ``.hydra/`` and ``train.log``; rank 1 writes neither, only ``train.rank1.log``."""
    run_dir = multi_node_run.run_dir
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(path.name for path in run_dir.glob("*.log")) == ["train.log", "train.rank1.log"]
    rank0_log, rank1_log = [(run_dir / name).read_text() for name in ("train.log", "train.rank1.log")]
    assert "process group: rank 0 of 2" in rank0_log and "rank 1 of 2" not in rank0_log
    assert "process group: rank 1 of 2" in rank1_log and "rank 0 of 2" not in rank1_log


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_a_bad_dataset_stops_both_nodes_with_one_message(square_demo, tmp_path, launcher):
    data = shutil.copytree(square_demo, tmp_path / "data")
    images = json.loads((data / "train" / "_annotations.coco.json").read_text())["images"]
    (data / "train" / images[1]["file_name"]).unlink()
    nodes = _two_nodes(
        _args(
            data,
            tmp_path / "run",
            tmp_path / "probe",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "trainer.devices=1",
        ),
        cwd=tmp_path,
        launcher=launcher,
        timeout=180,
    )
    assert [node.returncode != 0 for node in nodes] == [True, True]
    rank0, rank1 = (node.output for node in nodes)
    errors = [line for node in nodes for line in node.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "image file not found" in errors[0] and images[1]["file_name"] in errors[0]
    assert errors[0] in rank0 and "image file not found" not in rank1  # rank 0's message, printed by it alone
    assert rank1.strip().splitlines()[-1] == "rank 1: stopped, rank 0 reported a DataError"
    assert "Traceback" not in rank0 + rank1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_which_processes_open_the_group_and_which_skip_the_check(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert external_cluster_environment() is None and not started_by_lightning_launcher()  # alone
    assert launched_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's DDP launcher started
    assert external_cluster_environment() is None and started_by_lightning_launcher()
    assert launched_rank() == 0  # Lightning names its log file and turns its .hydra/ off itself
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")  # torchrun sets LOCAL_RANK too: not a launcher child
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert isinstance(external_cluster_environment(), TorchElasticEnvironment)
    assert not started_by_lightning_launcher()
    monkeypatch.setenv("RANK", "1")
    assert launched_rank() == 1
    assert OmegaConf.create({"subdir": "${detr.rank_zero_only:.hydra}"}).subdir is None  # no .hydra/ here
    assert OmegaConf.create({"log": "train${detr.rank_suffix:}.log"}).log == "train.rank1.log"
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to coordinate
    assert external_cluster_environment() is None and launched_rank() == 0
    assert OmegaConf.create({"subdir": "${detr.rank_zero_only:.hydra}"}).subdir == ".hydra"
    assert OmegaConf.create({"log": "train${detr.rank_suffix:}.log"}).log == "train.log"
    assert process_group_backend("cpu") == "gloo"
    assert process_group_backend("gpu", {"process_group_backend": "gloo"}) == "gloo"
