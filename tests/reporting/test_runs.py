"""`detr_lightning.runs`: the one reader of a run folder, its epoch series and the data settings of a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from detr_lightning.runs import (
    best_of_epochs,
    differing_keys,
    epoch_series,
    find_job_dirs,
    first_reaching,
    read_run,
    run_data_config,
)


def write_yaml(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))


def test_read_run_reads_every_file_of_a_job_folder(tmp_path):
    sweep_dir = tmp_path / "multirun" / "sweep"
    (sweep_dir / "multirun.yaml").parent.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("optimized_metric: val/map\n")
    job = sweep_dir / "3"
    write_yaml(job / ".hydra" / "overrides.yaml", ["experiment=demo", "+trainer.max_time=00:01:00:00"])
    write_yaml(job / ".hydra" / "config.yaml", {"seed": 42, "optimized_metric": "val/loss"})
    write_yaml(
        job / ".hydra" / "hydra.yaml",
        {"hydra": {"job": {"name": "eval"}, "runtime": {"choices": {"model": "detr", "hydra/env": "x"}}}},
    )
    status = {"status": "failed", "error": "DataError: x", "started": "2026-01-02T03:04:05", "duration_s": 62}
    (job / "job_status.json").write_text(json.dumps(status))
    (job / "metrics.json").write_text(json.dumps({"val/map": 0.5, "note": "text", "flag": True}))
    (job / "metrics.csv").write_text("epoch,val/loss\n0,2.0\n1,1.5\n")
    (job / "plots").mkdir()
    (job / "plots" / "metrics.png").write_bytes(b"png")

    run = read_run(job, mode="min")
    assert run.label == "sweep/3"  # a job of a sweep is known by both names
    assert run.command == "python eval.py experiment=demo +trainer.max_time=00:01:00:00"
    assert run.override_values() == {"experiment": "demo", "trainer.max_time": "00:01:00:00"}
    assert run.choices == {"model": "detr"}
    assert (run.status, run.error, run.started) == ("failed", "DataError: x", "2026-01-02 03:04:05")
    assert (run.duration_s, run.duration_measured) == (62.0, True)
    assert run.final == {"val/map": 0.5}  # numbers only
    assert run.epochs == [{"epoch": "0", "val/loss": "2.0"}, {"epoch": "1", "val/loss": "1.5"}]
    assert run.plots == [job / "plots" / "metrics.png"]
    assert (run.metric, run.mode, run.config["seed"]) == ("val/loss", "min", 42)


def test_read_run_of_a_half_written_folder(tmp_path):
    run_dir = tmp_path / "run"
    write_yaml(run_dir / ".hydra" / "hydra.yaml", {"hydra": {"overrides": {"task": ["seed=1"]}}})
    (run_dir / ".hydra" / "overrides.yaml").write_text("[not: yaml")
    (run_dir / "metrics.json").write_text("{half")
    run = read_run(run_dir)
    assert run.label == "run" and run.overrides == ["seed=1"]  # from hydra.yaml when overrides.yaml is bad
    assert run.status is None and run.final == {} and run.epochs == [] and run.plots == []
    assert (run.metric, run.mode) == ("val/map", "max")
    assert run.started is not None and not run.duration_measured  # from file times


def test_find_job_dirs_in_job_order(tmp_path):
    for name in ("10", "2", "1"):
        write_yaml(tmp_path / name / ".hydra" / "overrides.yaml", [])
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "job_status.json").write_text("{}")
    write_yaml(tmp_path / ".hydra" / "overrides.yaml", [])  # the sweep folder itself is no job
    assert [path.name for path in find_job_dirs(tmp_path)] == ["1", "2", "7", "10"]


def test_epoch_series_and_the_best_epoch():
    rows = [{"epoch": "0", "m": "0.2"}, {"epoch": "1", "m": "nan"}, {"epoch": "2", "m": "0.5"}]
    rows += [{"epoch": "3", "m": ""}, {"epoch": "4", "m": "0.5"}, {"m": "0.1"}]
    assert epoch_series(rows, "m") == [(0, 0.2), (2, 0.5), (4, 0.5), (5, 0.1)]  # no epoch: its position
    assert best_of_epochs(rows, "m", "max") == (0.5, 2)  # the first epoch that reached it
    assert best_of_epochs(rows, "m", "min") == (0.1, 5)
    assert best_of_epochs(rows, "other", "max") is None
    assert first_reaching([(0, 0.2), (2, 0.5)], 0.4, "max") == 2
    assert first_reaching([(0, 0.2), (2, 0.5)], 0.1, "min") is None


def test_differing_keys():
    values = [{"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}]
    assert differing_keys(values) == ["b", "c"]


def test_run_data_config_resolves_paths_from_the_training_folder(tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "outputs" / "run"
    paths = {"root_dir": "${hydra:runtime.cwd}", "data_dir": "${paths.root_dir}/data"}
    paths["output_dir"] = "${hydra:runtime.output_dir}"
    config = {"paths": paths, "data": {"root": "${paths.data_dir}/demo", "batch_size": 2}}
    write_yaml(run_dir / ".hydra" / "config.yaml", config)
    write_yaml(run_dir / ".hydra" / "hydra.yaml", {"hydra": {"runtime": {"cwd": "/train/cwd"}}})
    assert run_data_config(run_dir) == {"root": "/train/cwd/data/demo", "batch_size": 2}

    (run_dir / ".hydra" / "hydra.yaml").unlink()  # no record of the training cwd: the current one
    monkeypatch.chdir(tmp_path)
    assert run_data_config(run_dir)["root"] == f"{tmp_path}/data/demo"

    assert run_data_config(tmp_path / "nowhere") is None
    write_yaml(run_dir / ".hydra" / "config.yaml", {"seed": 1})
    assert run_data_config(run_dir) is None  # no data settings
    write_yaml(run_dir / ".hydra" / "config.yaml", {"data": {"root": "${missing.key}"}})
    with caplog.at_level(logging.WARNING):
        assert run_data_config(run_dir) is None
    assert "Cannot read the data settings" in caplog.text
