"""Multirun sweeps: each job's status, the value train.py returns, and the ranked summary.csv of a sweep."""

from __future__ import annotations

import csv
import gc
import importlib.util
import json
import logging
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from detr_lightning.data.errors import DataError
from detr_lightning.sweep import (
    SweepSummary,
    optimized_value,
    run_sweep_job,
    summarize_sweep,
    write_summary_csv,
)
from detr_lightning.tools.sweep_summary import main
from detr_lightning.training import user_error

from .conftest import QUICK, REPO_ROOT


# --------------------------------------------------------------------------------- fabricated sweeps
def make_job(
    sweep_dir: Path,
    name: str,
    overrides: list[str],
    status: dict | str | None = None,
    val_map: list[str] | None = None,
    final: dict | str | None = None,
) -> Path:
    """A job folder as train.py leaves it; ``None`` leaves a file out, a str is written as is (corrupt)."""
    job_dir = sweep_dir / name
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if status is not None:
        text = status if isinstance(status, str) else json.dumps({"overrides": overrides, **status})
        (job_dir / "job_status.json").write_text(text)
    if val_map is not None:
        lines = ["epoch,step,train/loss,val/map"]
        lines += [f"{epoch},{10 * (epoch + 1)},1.0,{value}" for epoch, value in enumerate(val_map)]
        (job_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    if final is not None:
        (job_dir / "metrics.json").write_text(final if isinstance(final, str) else json.dumps(final))
    return job_dir


@pytest.fixture
def fabricated_sweep(tmp_path) -> Path:
    """Eight jobs of a ``loss.bbox_loss_coef`` sweep: finished, failed, killed, running and corrupt ones."""
    sweep_dir = tmp_path / "sweep"

    def coef(value):
        return ["experiment=demo", f"loss.bbox_loss_coef={value}"]

    ok = {"status": "ok", "duration_s": 12.0}
    # Job 0 peaks before its last epoch: by best it ranks above job 1 (0.5 > 0.4), by last epoch below.
    make_job(sweep_dir, "0", coef(1), ok, ["0.2", "0.5", "0.3"], {"val/map": 0.3, "test/map": 0.45})
    make_job(sweep_dir, "1", coef(2), ok, ["0.1", "", "nan", "0.4"], {"val/map": 0.4})
    make_job(sweep_dir, "2", coef(3), ok, ["0.6", "0.7"])
    failed = {"status": "failed", "error": "RuntimeError: [backbone] shape [2, 3] is invalid"}
    make_job(sweep_dir, "3", coef(4), failed, ["0.9"])
    make_job(sweep_dir, "4", coef(5))  # killed before train.py wrote anything
    make_job(sweep_dir, "5", coef(6), {"status": "running"}, ["0.8"])  # killed while training
    make_job(sweep_dir, "6", coef(7), "{not json", final="[also not json")
    make_job(sweep_dir, "10", coef(8), ok, final={"val/map": 0.55})  # no metrics.csv: final value
    return sweep_dir


def read_summary(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_summary_ranks_jobs_by_their_best_epoch_and_puts_unfinished_jobs_last(fabricated_sweep):
    jobs = summarize_sweep(fabricated_sweep, "val/map", "max")
    path = write_summary_csv(jobs, fabricated_sweep / "summary.csv", "val/map")
    columns, rows = read_summary(path)

    assert columns == [
        "rank",
        "job",
        "status",
        "loss.bbox_loss_coef",  # the swept key only: experiment=demo is the same in every job
        "best val/map",
        "best_epoch",
        "epochs",
        "test/map",  # test/map_50 is in no job's metrics.json
        "duration_s",
        "error",
        "overrides",
    ]
    assert [row["job"] for row in rows] == ["2", "10", "0", "1", "3", "5", "4", "6"]
    assert [row["rank"] for row in rows] == [str(rank) for rank in range(1, 9)]
    by_job = {row["job"]: row for row in rows}
    assert by_job["0"]["best val/map"] == "0.5" and by_job["0"]["best_epoch"] == "1"
    assert by_job["0"]["epochs"] == "3"
    assert (by_job["1"]["best val/map"], by_job["1"]["best_epoch"]) == ("0.4", "3")  # blank and nan skipped
    assert (by_job["10"]["best val/map"], by_job["10"]["best_epoch"]) == ("0.55", "")
    assert by_job["0"]["test/map"] == "0.45" and by_job["2"]["test/map"] == ""
    assert by_job["0"]["loss.bbox_loss_coef"] == "1" and by_job["10"]["loss.bbox_loss_coef"] == "8"
    assert by_job["0"]["overrides"] == "experiment=demo loss.bbox_loss_coef=1"
    assert by_job["0"]["duration_s"] == "12.0" and by_job["0"]["error"] == ""

    assert by_job["3"]["status"] == "failed"
    assert by_job["3"]["error"] == "RuntimeError: [backbone] shape [2, 3] is invalid"
    assert by_job["3"]["best val/map"] == "0.9"  # kept, but a failed job never ranks above a finished one
    assert by_job["5"]["status"] == "incomplete" and "killed" in by_job["5"]["error"]
    for killed in ("4", "6"):  # no or unreadable job_status.json, metrics.json
        assert by_job[killed]["status"] == "incomplete", killed
        assert "job_status.json" in by_job[killed]["error"]
        assert by_job[killed]["best val/map"] == "" and by_job[killed]["epochs"] == "0"


def test_summary_of_a_metric_to_minimize(tmp_path):
    sweep_dir = tmp_path / "sweep"
    for name, coef, loss in [("0", 1, "0.9"), ("1", 2, "0.3"), ("2", 3, "0.6")]:
        job_dir = make_job(sweep_dir, name, [f"loss.giou_loss_coef={coef}"], {"status": "ok"})
        (job_dir / "metrics.csv").write_text(f"epoch,val/loss\n0,1.5\n1,{loss}\n2,2.0\n")
    jobs = summarize_sweep(sweep_dir, "val/loss", "min")
    assert [(job.job, job.best, job.best_epoch) for job in jobs] == [
        ("1", 0.3, 1),
        ("2", 0.6, 1),
        ("0", 0.9, 1),
    ]
    assert [job.job for job in summarize_sweep(sweep_dir, "val/loss", "max")] == ["0", "1", "2"]  # 2.0 ties


def test_summary_callback_checks_the_mode_and_ignores_single_runs(tmp_path):
    with pytest.raises(ValueError, match=r"optimized_metric_mode='maximize' is not .*max .*min"):
        SweepSummary(mode="maximize")
    run_dir = make_job(tmp_path / "sweep", "0", ["loss.bbox_loss_coef=1"], {"status": "ok"})
    config = OmegaConf.create(
        {"hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(run_dir)}, "sweep": {"subdir": "0"}}}
    )
    SweepSummary().on_job_end(config, job_return=None)
    assert not (tmp_path / "sweep" / "summary.csv").exists()
    config.hydra.mode = RunMode.MULTIRUN
    SweepSummary().on_job_end(config, job_return=None)
    assert read_summary(tmp_path / "sweep" / "summary.csv")[1][0]["job"] == "0"


def test_cli_summarizes_a_stopped_sweep_with_the_metric_of_its_config(fabricated_sweep, capsys):
    (fabricated_sweep / "multirun.yaml").write_text("optimized_metric: val/map\noptimized_metric_mode: min\n")
    main([str(fabricated_sweep)])
    rows = read_summary(fabricated_sweep / "summary.csv")[1]
    assert [row["job"] for row in rows][:4] == ["1", "0", "10", "2"]  # lowest best first
    table = capsys.readouterr().out
    assert "Sweep summary: 8 jobs, best val/map (min) first" in table
    assert str(fabricated_sweep / "summary.csv") in table
    assert "RuntimeError: [backbone] shape [2, 3] is invalid" in table  # brackets as text, not markup
    with pytest.raises(SystemExit) as exit_info:
        main([str(fabricated_sweep / "nowhere")])
    assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------- one job, in process
@pytest.fixture
def job_config(compose_config, tmp_path):
    """A composed config whose Hydra node says: job 3 of a multirun, in ``tmp_path/job``."""
    cfg = compose_config(["experiment=demo", "loss.bbox_loss_coef=2"])
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path / "job")
        cfg.hydra.job.num = 3
    (tmp_path / "job").mkdir()
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = None


def job_status(cfg) -> dict:
    return json.loads((Path(cfg.hydra.runtime.output_dir) / "job_status.json").read_text())


def test_a_failing_job_is_recorded_and_does_not_raise(job_config, caplog, monkeypatch):
    finished = []
    fake_wandb = SimpleNamespace(
        run=object(),
        finish=lambda exit_code: finished.append(exit_code),
        teardown=lambda: finished.append("service stopped"),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)

    def crash(cfg):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    with caplog.at_level(logging.ERROR):
        assert run_sweep_job(crash, job_config, user_error=user_error) is None
    status = job_status(job_config)
    assert status["status"] == "failed"
    assert status["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert status["overrides"] == ["experiment=demo", "loss.bbox_loss_coef=2"]
    assert "job 3 failed" in caplog.text and "Traceback" in caplog.text
    assert finished == [1, "service stopped"]  # the next job's WandbLogger must not reuse this run
    assert optimized_value(job_config, None) is None

    def bad_data(cfg):
        raise DataError("data.root=/x does not exist")

    caplog.clear()
    assert run_sweep_job(bad_data, job_config, user_error=user_error) is None
    assert job_status(job_config)["error"] == "data.root=/x does not exist"  # a user error: its message
    assert "Traceback" not in caplog.text

    def bad_data_in_a_constructor(cfg):  # what hydra.utils.instantiate raises for a data module's DataError
        try:
            raise DataError("data.batch_size=0, data.val_batch_size=None: must be positive.")
        except DataError as error:
            raise InstantiationException("Error in call to target 'CocoDataModule'") from error

    assert run_sweep_job(bad_data_in_a_constructor, job_config, user_error=user_error) is None
    assert job_status(job_config)["error"] == "data.batch_size=0, data.val_batch_size=None: must be positive."
    assert "Traceback" not in caplog.text


def test_a_failed_job_frees_its_objects_before_the_next_job(job_config, monkeypatch):
    # pytest keeps every log record, and the one of the failure holds its traceback: no records here.
    monkeypatch.setattr(logging.getLogger("detr_lightning.sweep"), "disabled", True)

    class Model:  # stands for a trainer and its model: objects in a reference cycle
        def __init__(self):
            self.itself = self

    alive = []

    def crash(cfg):
        model = Model()
        alive.append(weakref.ref(model))
        raise RuntimeError("CUDA out of memory")

    gc.disable()  # no collection by chance: only the one run_sweep_job does
    try:
        run_sweep_job(crash, job_config, user_error=user_error)
        assert alive[0]() is None
    finally:
        gc.enable()


def test_an_interrupted_job_stops_the_sweep(job_config):
    def interrupted(cfg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep_job(interrupted, job_config, user_error=user_error)
    assert job_status(job_config)["status"] == "interrupted"


def test_the_sweeper_gets_the_best_epoch_of_the_optimized_metric(job_config, caplog):
    job_dir = Path(job_config.hydra.runtime.output_dir)
    assert run_sweep_job(lambda cfg: {"val/map": 0.3}, job_config, user_error=user_error) == {"val/map": 0.3}
    assert job_status(job_config)["status"] == "ok" and job_status(job_config)["duration_s"] >= 0
    assert optimized_value(job_config, {"val/map": 0.3}) == 0.3  # no metrics.csv: the final value
    (job_dir / "metrics.csv").write_text("epoch,val/map\n0,0.2\n1,0.5\n2,0.3\n")
    assert optimized_value(job_config, {"val/map": 0.3}) == 0.5
    with open_dict(job_config):
        job_config.optimized_metric_mode = "min"
    assert optimized_value(job_config, {"val/map": 0.3}) == 0.2
    with open_dict(job_config):
        job_config.optimized_metric = "val/mAP"
    assert optimized_value(job_config, {"val/map": 0.3}) is None
    assert "optimized_metric=val/mAP was never logged" in caplog.text and "val/map" in caplog.text
    job_config.optimized_metric = None
    assert optimized_value(job_config, {"val/map": 0.3}) is None


def test_train_py_records_failures_in_multirun_and_exits_on_them_in_single_runs(job_config, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_entry_point", REPO_ROOT / "train.py")
    entry_point = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry_point)
    task = entry_point.main.__wrapped__  # the function under @hydra.main

    def no_data(cfg):
        raise DataError("data.root=/x does not exist")

    monkeypatch.setattr(entry_point, "train", no_data)
    assert task(job_config) is None
    status = job_status(job_config)
    assert (status["status"], status["error"]) == ("failed", "data.root=/x does not exist")
    monkeypatch.setattr(entry_point, "train", lambda cfg: {"val/map": 0.25, "test/map": 0.2})
    assert task(job_config) == 0.25

    with read_write(job_config.hydra):  # HydraConfig made it read-only
        job_config.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(job_config)
    (Path(job_config.hydra.runtime.output_dir) / "job_status.json").unlink()
    monkeypatch.setattr(entry_point, "train", no_data)
    with pytest.raises(SystemExit, match="error: data.root=/x does not exist"):
        task(job_config)
    assert not (Path(job_config.hydra.runtime.output_dir) / "job_status.json").exists()


# ---------------------------------------------------------------------------------- python train.py -m
#: The QUICK overrides with one batch per split: a few seconds per job.
QUICKER = [
    *(o for o in QUICK if not o.startswith("trainer.limit_train_batches")),
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]


def table_rows(stdout: str) -> list[list[str]]:
    """The data rows of the printed sweep summary table, as lists of stripped cells."""
    summary = stdout[stdout.index("Sweep summary:") :]
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in summary.splitlines()
        if line.startswith("│")
    ]


def test_multirun_writes_a_ranked_summary_and_prints_it(demo_sweep):
    result, sweep_dir = demo_sweep.result, demo_sweep.path
    jobs = [sweep_dir / "0", sweep_dir / "1"]
    coefficients = [(job / ".hydra" / "overrides.yaml").read_text() for job in jobs]  # one job per value
    assert "loss.bbox_loss_coef=2" in coefficients[0] and "loss.bbox_loss_coef=5" in coefficients[1]
    columns, rows = read_summary(sweep_dir / "summary.csv")
    assert columns == [
        "rank",
        "job",
        "status",
        "loss.bbox_loss_coef",
        "best val/map",
        "best_epoch",
        "epochs",
        "test/map",
        "test/map_50",
        "duration_s",
        "error",
        "overrides",
    ]
    assert sorted((row["job"], row["loss.bbox_loss_coef"]) for row in rows) == [("0", "2"), ("1", "5")]
    best = [float(row["best val/map"]) for row in rows]
    assert best == sorted(best, reverse=True)
    for row in rows:
        job_dir = sweep_dir / row["job"]
        epochs = list(csv.DictReader((job_dir / "metrics.csv").open()))
        maps = [float(epoch["val/map"]) for epoch in epochs]
        assert float(row["best val/map"]) == max(maps)
        best_epoch = str(maps.index(max(maps)))  # the first epoch reaching the best
        assert (row["status"], row["best_epoch"], row["epochs"], row["error"]) == ("ok", best_epoch, "2", "")
        assert float(row["test/map"]) == json.loads((job_dir / "metrics.json").read_text())["test/map"]
        assert json.loads((job_dir / "job_status.json").read_text())["status"] == "ok"

    assert "Sweep summary: 2 jobs, best val/map (max) first" in result.stdout
    assert str(sweep_dir / "summary.csv") in result.stdout
    printed = table_rows(result.stdout)
    assert [cells[:4] for cells in printed] == [
        [row["rank"], row["job"], "ok", row["loss.bbox_loss_coef"]] for row in rows
    ]


# A failed job amid others running side by side, end to end: test_launchers.py (local_pool).
