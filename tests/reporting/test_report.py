"""`python -m detr_lightning.tools.report`: numbers equal to the run files, comparisons, sweeps, README."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DemoSweep as Sweep  # tests/conftest.py
from detr_lightning.runs import epoch_series, first_reaching
from detr_lightning.tools.report import BEGIN_MARKER, COCO_KEYS, END_MARKER, main

SPLITS = ("val", "test")


# ---------------------------------------------------------------------- reading the markdown back
def section(text: str, heading: str) -> str:
    """The text under the heading line ``heading`` up to the next heading of its level or higher."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n") + len(heading) + 1
    following = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE)
    match = following.search(text, start)
    return text[start : match.start() if match else len(text)]


def table(text: str) -> list[list[str]]:
    """The first markdown table of ``text``: header and rows, cells stripped (separator row dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    first = text.splitlines().index(lines[0])
    rows = []
    for line in text.splitlines()[first:]:
        if not line.startswith("|"):
            break
        if not re.fullmatch(r"\|(---\|)+", line):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def coco_block(run_section: str) -> dict[str, list[str]]:
    """``{split: the 12 numbers as printed}`` of a run's pycocotools block."""
    block = run_section.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    numbers: dict[str, list[str]] = {}
    split = None
    for line in block:
        if not line.startswith(" "):
            split = line.split(":", 1)[0]
            numbers[split] = []
        else:
            numbers[split].append(line.rsplit(" = ", 1)[1])
    return numbers


def expected(value: float) -> str:
    """How the report shows a metrics.json figure in its tables."""
    return "n/a" if value < 0 else f"{value:.3f}"


def check_run_section(run_section: str, run_dir: Path) -> None:
    """Every figure of a run's section equals the run's metrics.json / metrics.csv value, rounded."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    printed = coco_block(run_section)
    assert set(printed) == set(SPLITS)
    for split in SPLITS:
        assert printed[split] == [f"{metrics[f'{split}/{key}']:0.3f}" for key in COCO_KEYS], split

    per_class = table(section(run_section, "### AP per class"))
    assert per_class[0] == ["class", "val AP@[.50:.95]", "test AP@[.50:.95]"]
    names = [key.removeprefix("val/ap/") for key in metrics if key.startswith("val/ap/")]
    assert [row[0] for row in per_class[1:]] == names
    for name, val_ap, test_ap in per_class[1:]:
        assert (val_ap, test_ap) == (
            expected(metrics[f"val/ap/{name}"]),
            expected(metrics[f"test/ap/{name}"]),
        )

    epochs = table(section(run_section, "### Epochs (`metrics.csv`, 2 rows)"))
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    header = epochs[0]
    assert header[:4] == ["", "epoch", "train loss", "val loss"]
    last = dict(zip(header, epochs[-1], strict=True))
    assert last[""] == "last" and last["epoch"] == rows[-1]["epoch"]
    assert last["train loss"] == f"{float(rows[-1]['train/loss']):.3f}"
    assert last["val mAP"] == expected(float(rows[-1]["val/map"]))
    assert epochs[1][0] == "best `val/map` (max)"
    best = max(rows, key=lambda row: float(row["val/map"]))  # first of the best, as the report picks
    assert epochs[1][1] == best["epoch"]


@pytest.fixture
def random_run(sweep: Sweep, tmp_path) -> Path:
    """A copy of a real run whose metrics.json holds distinct random figures (and COCOeval's -1)."""
    run_dir = tmp_path / "runs" / "random"
    shutil.copytree(sweep.jobs[0], run_dir, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rng = np.random.default_rng(7)
    randomized = {key: float(rng.uniform(0, 1)) for key in metrics}
    randomized["val/map_large"] = randomized["test/mar_large"] = -1.0
    (run_dir / "metrics.json").write_text(json.dumps(randomized, indent=2))
    return run_dir


# ---------------------------------------------------------------------- one run
def test_report_command_on_a_run(sweep, tmp_path):
    out = tmp_path / "report" / "run.md"
    result = subprocess.run(
        [sys.executable, "-m", "detr_lightning.tools.report", str(sweep.jobs[0]), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Training report: sweep/0\n")
    run_section = section(text, "## Run `sweep/0`")
    check_run_section(run_section, sweep.jobs[0])
    facts = dict(row[:2] for row in table(run_section)[1:])
    assert facts["command"].startswith("`python train.py ") and "loss.bbox_loss_coef=2" in facts["command"]
    assert "experiment=demo" in facts["config groups"] and facts["status"] == "ok"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", facts["started"])

    # The plots, outside the report's folder, are copied beside it and linked relatively.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["plots/metrics.png", "plots/val_predictions.png"]
    for link in links:
        assert (out.parent / link).read_bytes() == (sweep.jobs[0] / link).read_bytes()


def test_report_numbers_are_the_metrics_json_numbers(random_run, tmp_path):
    main([str(random_run)])  # default: report.md in the run folder, plots linked in place
    text = (random_run / "report.md").read_text()
    check_run_section(section(text, "## Run `random`"), random_run)
    assert "= -1.000" in text and "| n/a |" not in section(text, "### AP per class")
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text) == ["plots/metrics.png", "plots/val_predictions.png"]
    assert not (random_run / "plots" / "plots").exists()  # nothing copied


# ---------------------------------------------------------------------- several runs, sweeps
def test_two_runs_side_by_side(sweep, random_run, tmp_path):
    out = tmp_path / "compare" / "README.md"
    main([str(sweep.jobs[1]), str(random_run), "-o", str(out)])
    text = out.read_text()
    comparison = table(section(text, "## Comparison"))
    assert comparison[0] == ["", "`sweep/1`", "`random`"]
    rows = {row[0]: row[1:] for row in comparison[1:]}
    assert rows["`loss.bbox_loss_coef`"] == ["5", "2"]  # the override that differs
    for run_dir, column in ((sweep.jobs[1], 0), (random_run, 1)):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for split in SPLITS:
            for key in ("map", "map_50", "map_75", "mar_100"):
                (label,) = [label for label in rows if label.endswith(f"(`{split}/{key}`)")]
                assert rows[label][column] == expected(metrics[f"{split}/{key}"]), (run_dir, label)
    assert rows["epochs"] == ["2", "2"]
    # The first run is the reference: the first epoch at which each run reaches its best val/map.
    reference = [float(row["val/map"]) for row in csv.DictReader(open(sweep.jobs[1] / "metrics.csv"))]
    (label,) = [label for label in rows if label.startswith("first epoch at `sweep/1`'s best `val/map`")]
    assert label.endswith(f"({expected(max(reference))})")
    for run_dir, cell in zip((sweep.jobs[1], random_run), rows[label], strict=True):
        values = [float(row["val/map"]) for row in csv.DictReader(open(run_dir / "metrics.csv"))]
        reached = [epoch for epoch, value in enumerate(values) if value >= max(reference)]
        assert cell == (f"epoch {reached[0]}" if reached else "not reached"), run_dir
    # One plot of every run's validation curves, beside the report.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section(text, "## Comparison"))
    assert links == ["plots/comparison.png"]
    with Image.open(out.parent / "plots" / "comparison.png") as curves:
        assert curves.format == "PNG" and curves.width > curves.height > 100
    for label, run_dir in (("sweep/1", sweep.jobs[1]), ("random", random_run)):
        check_run_section(section(text, f"## Run `{label}`"), run_dir)
        copied = out.parent / "plots" / label.replace("/", "_") / "metrics.png"
        assert copied.read_bytes() == (run_dir / "plots" / "metrics.png").read_bytes()


def test_a_sweep_folder_stands_for_its_jobs_and_summary(sweep):
    main([str(sweep.path)])
    text = (sweep.path / "report.md").read_text()
    sweep_section = section(text, f"## Sweep `{sweep.path.name}`")
    assert "python train.py -m " in sweep_section and "loss.bbox_loss_coef=2,5" in sweep_section
    summary = table(sweep_section)
    assert summary[0][:3] == ["rank", "job", "status"] and sorted(row[1] for row in summary[1:]) == ["0", "1"]
    assert table(section(text, "## Comparison"))[0] == ["", "`sweep/0`", "`sweep/1`"]
    for job in sweep.jobs:
        check_run_section(section(text, f"## Run `sweep/{job.name}`"), job)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == [
        "plots/comparison.png",
        *(f"{job}/plots/{name}" for job in ("0", "1") for name in ("metrics.png", "val_predictions.png")),
    ]


# ---------------------------------------------------------------------- writing into a README
def test_readme_mode_keeps_the_hand_written_text(random_run, tmp_path):
    readme = tmp_path / "experiments" / "demo" / "README.md"
    readme.parent.mkdir(parents=True)
    readme.write_text("# Demo: shapes\n\nHand-written setup.\n\n## Setup\n\n- batch 4\n")

    main([str(random_run), "-o", str(readme)])  # no markers yet: the text stays, as the introduction
    first = readme.read_text()
    assert first.startswith(
        "# Demo: shapes\n\nHand-written setup.\n\n## Setup\n\n- batch 4\n\n" + BEGIN_MARKER
    )
    assert first.rstrip().endswith(END_MARKER)

    # Text after the generated part, and edits of the introduction, survive the next report.
    readme.write_text(first.replace("- batch 4", "- batch 4, lr 2e-4") + "\n## Conclusion\n\nPlateau.\n")
    main([str(random_run), "-o", str(readme)])
    second = readme.read_text()
    assert second.count(BEGIN_MARKER) == 1 and second.count("## Run `random`") == 1
    assert "- batch 4, lr 2e-4" in second and second.endswith("## Conclusion\n\nPlateau.\n")

    notes = tmp_path / "notes.md"
    notes.write_text("# From the notes\n\nNew introduction.\n")
    main([str(random_run), "-o", str(readme), "--notes", str(notes)])
    third = readme.read_text()
    assert third.startswith("# From the notes\n\nNew introduction.\n\n" + BEGIN_MARKER)
    assert "Hand-written setup." not in third and third.endswith("## Conclusion\n\nPlateau.\n")
    assert f"report {random_run} -o {readme}`" in third  # how to write it again: --notes is a one-off
    main([str(random_run), "-o", str(readme), "--title", "Demo"])
    assert readme.read_text().startswith("# Demo\n\nNew introduction.\n\n")
    assert (readme.parent / "plots" / "metrics.png").is_file()


def test_report_to_standard_output(random_run, capsys):
    main([str(random_run), "-o", "-"])
    assert "## Run `random`" in capsys.readouterr().out
    assert not (random_run / "report.md").exists()


def test_clear_errors(tmp_path, random_run, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "neither a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(random_run), str(random_run)])
    assert "-o OUT.md" in capsys.readouterr().err


def test_first_epoch_reaching_a_reference_figure():
    rows = [{"epoch": str(e), "val/map": v} for e, v in enumerate(["0.1", "nan", "", "0.35", "0.2", "0.5"])]
    assert first_reaching(epoch_series(rows, "val/map"), 0.3, "max") == 3
    assert first_reaching(epoch_series(rows, "val/map"), 0.5, "max") == 5
    assert first_reaching(epoch_series(rows, "val/map"), 0.6, "max") is None
    assert first_reaching(epoch_series(rows, "val/map"), 0.15, "min") == 0
    assert first_reaching(epoch_series(rows, "val/loss"), 0.15, "min") is None  # no such column
