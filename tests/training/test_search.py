"""Optuna search over the loss weights and matcher costs: ``train.py -m hparams_search=loss_coefs``.

What the sweeper saw (``optimization_results.yaml``), what each job recorded (``job_status.json``) and the
sweep summary (``summary.csv`` and the best job's single-run command) must agree.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from detr_lightning.runs import override_values
from detr_lightning.sweep import record_optimized_value
from detr_lightning.tools.sweep_summary import main as sweep_summary_main

from .conftest import QUICK, run_train_cli

pytestmark = pytest.mark.slow

#: The keys conf/hparams_search/loss_coefs.yaml searches.
SEARCHED = {
    "loss.ce_loss_coef",
    "loss.bbox_loss_coef",
    "loss.giou_loss_coef",
    "matcher.cost_class",
    "matcher.cost_bbox",
    "matcher.cost_giou",
}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def printed_command(stdout: str) -> str:
    """The single-run command the sweep summary printed: the line after "... as a single run:"."""
    lines = stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if line.endswith("as a single run:"))
    return lines[index + 1]


def test_search_agrees_with_its_jobs_and_the_summary(small_demo, tmp_path, capsys):
    """Three TPE trials of one training step each, ranked by ``val/loss`` (minimized).

    Not by ``val/map``: after one step on the demo every trial scores mAP 0.0, so a summary ranked the
    wrong way round, or a sweeper told the wrong trial's value, would pass unnoticed. ``val/loss`` is the
    loss weighted by the searched coefficients, so every trial gets a different value, and
    ``optimized_metric_mode=min`` must also turn the sweeper's direction into ``minimize``.
    """
    sweep_dir = tmp_path / "sweep"
    quick = [o for o in QUICK if not o.startswith("trainer.limit_train_batches")]
    result = run_train_cli(
        [
            "-m",
            "hparams_search=loss_coefs",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=1",
            f"hydra.sweep.dir={sweep_dir}",
            "experiment=demo",
            f"data.root={small_demo}",
            "optimized_metric=val/loss",
            "optimized_metric_mode=min",
            *quick,
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "test=false",
            "callbacks.plots=null",
            # No checkpoint (test=false needs none), no sanity check: the time goes into the trials.
            "callbacks.model_checkpoint=null",
            "trainer.enable_checkpointing=false",
            "trainer.num_sanity_val_steps=0",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = sorted(path.name for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit())
    assert jobs == ["0", "1", "2"]
    rows = read_rows(sweep_dir / "summary.csv")
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert all(row["status"] == "ok" for row in rows)
    best = [float(row["best val/loss"]) for row in rows]
    assert best == sorted(best)  # lowest first
    assert len(set(best)) == 3  # distinct: the order means something
    assert all(key in rows[0] for key in SEARCHED)  # searched: a column of swept values each

    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    assert results["best_value"] == best[0]  # the sweeper minimized: its best is the summary's first
    assert set(results["best_params"]) == SEARCHED
    best_overrides = OmegaConf.to_container(
        OmegaConf.load(sweep_dir / rows[0]["job"] / ".hydra/overrides.yaml")
    )
    best_values = override_values(best_overrides)
    assert {key: float(best_values[key]) for key in SEARCHED} == results["best_params"]

    for row in rows:  # what each job returned to the sweeper is its best epoch in the summary
        status = json.loads((sweep_dir / row["job"] / "job_status.json").read_text())
        assert status["optimized_value"] == float(row["best val/loss"]), row["job"]

    command = shlex.split(printed_command(result.stdout))
    assert command[:2] == ["python", "train.py"] and "-m" not in command
    assert command[2:] == best_overrides  # every override of the best job (none of hydra.*), in order
    assert all(f"{key}={best_values[key]}" in command for key in SEARCHED)

    # Optuna's sweeper writes no multirun.yaml: the summary tool takes the metric from the jobs' config.
    (sweep_dir / "summary.csv").unlink()
    sweep_summary_main([str(sweep_dir)])
    assert read_rows(sweep_dir / "summary.csv") == rows
    assert shlex.split(printed_command(capsys.readouterr().out)) == command


def test_sweep_summary_cli_prints_the_best_job_as_a_quoted_single_run(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    for job, coef, value in [("0", 2, "0.3"), ("1", 5, "0.6")]:
        job_dir = sweep_dir / job
        overrides = ["experiment=demo", "data.root=/data/my photos", f"loss.bbox_loss_coef={coef}"]
        (job_dir / ".hydra").mkdir(parents=True)
        # A hydra.* override never is a task override; were one recorded, the single run leaves it out.
        recorded = [*overrides, "hydra.sweeper.n_trials=4"]
        (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(recorded)))
        (job_dir / "job_status.json").write_text(json.dumps({"status": "ok", "overrides": recorded}))
        (job_dir / "metrics.csv").write_text(f"epoch,val/map\n0,0.1\n1,{value}\n")
    sweep_summary_main([str(sweep_dir)])
    out = capsys.readouterr().out
    assert "Best job (1, val/map 0.6000) as a single run:" in out
    assert printed_command(out) == (
        "python train.py experiment=demo 'data.root=/data/my photos' loss.bbox_loss_coef=5"
    )


def test_a_failed_job_records_null_for_the_sweeper(compose_config, tmp_path):
    cfg = compose_config(["experiment=demo"])
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path)
    (tmp_path / "job_status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    HydraConfig.instance().set_config(cfg)
    try:
        assert record_optimized_value(None) is None  # a failed job
        status = json.loads((tmp_path / "job_status.json").read_text())  # valid JSON: no NaN in it
        assert status == {"status": "failed", "error": "boom", "optimized_value": None}
        assert math.isnan(record_optimized_value(math.nan))  # a diverged metric: null too, never NaN in JSON
        assert json.loads((tmp_path / "job_status.json").read_text())["optimized_value"] is None
        assert record_optimized_value(0.25) == 0.25
        assert json.loads((tmp_path / "job_status.json").read_text())["optimized_value"] == 0.25
    finally:
        HydraConfig.instance().cfg = None
