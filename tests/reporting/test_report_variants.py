"""Seeds pooled into variants by `python -m detr_lightning.tools.report`: budget, means, first epochs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from detr_lightning.runs import first_reaching
from detr_lightning.tools.report import collect, common_budget, group_by_seed, main

from .test_report import table


def write_run(
    root: Path, name: str, overrides: list[str], val_map: list[float], config: dict | None = None
) -> Path:
    """A run folder with ``.hydra/overrides.yaml`` (and ``config.yaml`` if given) and a ``metrics.csv``
    of ``val/map`` (mAP@0.5 = 2x)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with (run / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["epoch", "val/map", "val/map_50"])
        writer.writeheader()
        for epoch, value in enumerate(val_map):
            writer.writerow({"epoch": epoch, "val/map": value, "val/map_50": 2 * value})
    return run


@pytest.fixture
def ab_runs(tmp_path: Path) -> list[Path]:
    """Two variants of two seeds and one of a single seed; the slowest run reached 4 epochs."""
    plain = ["experiment=demo", "model.spatial_prior=none"]
    return [
        write_run(tmp_path, "plain_s1", [*plain, "seed=1"], [0.0, 0.1, 0.1, 0.2, 0.9]),
        write_run(tmp_path, "plain_s2", [*plain, "seed=2"], [0.0, 0.1, 0.2, 0.4]),
        write_run(tmp_path, "prior_s1", ["experiment=demo", "seed=1"], [0.1, 0.3, 0.5, 0.6, 0.7]),
        write_run(tmp_path, "prior_s2", ["experiment=demo", "seed=2"], [0.1, 0.2, 0.3, 0.4, 0.5]),
        write_run(tmp_path, "groups_s1", ["experiment=demo", "model.num_groups=4", "seed=1"], [0.0] * 5),
    ]


def test_runs_that_differ_only_in_seed_are_one_variant(ab_runs):
    _, runs = collect(ab_runs)
    variants = group_by_seed(runs)
    assert [variant.label for variant in variants] == ["plain", "prior", "groups"]
    assert [variant.seeds for variant in variants] == [["1", "2"], ["1", "2"], ["1"]]
    assert common_budget(variants) == 4  # plain_s2 has 4 epochs
    assert variants[0].mean_curve("val/map", 4) == pytest.approx([0.0, 0.1, 0.15, 0.3])
    assert variants[1].values_at("val/map_50", 3) == pytest.approx([1.2, 0.8])


def test_first_reaching_skips_epochs_without_a_value():
    assert first_reaching(enumerate([0.0, None, 0.2, 0.5]), 0.2, "max") == 2
    assert first_reaching(enumerate([0.0, 0.1]), 0.2, "max") is None
    assert first_reaching(enumerate([3.0, 2.0, 1.0]), 2.0, "min") == 1


def test_report_pools_seeds_over_a_common_budget(ab_runs, tmp_path):
    out = tmp_path / "report" / "README.md"
    main([*map(str, ab_runs), "-o", str(out), "--brief"])
    text = out.read_text()
    assert "## Run `" not in text  # --brief: no section per run
    assert "budget of 4 epochs (0 to 3" in text
    rows = table(text.split("## Variants (seeds pooled)", 1)[1])
    header, by_variant = rows[0], {row[0]: row for row in rows[1:]}
    assert header[2] == "`val/map` at epoch 3 (mean; per seed)"
    # plain at epoch 3: mean of 0.2 and 0.4 (its epoch 4 is past the budget)
    assert by_variant["`plain`"][2] == "0.300 (0.200; 0.400)"
    assert by_variant["`prior`"][3] == "1.000 (1.200; 0.800)"
    assert by_variant["`prior`"][4] == "0.500"  # mean of each seed's best within the budget (0.6, 0.4)
    assert header[5] == "first epoch at `plain`'s `val/map` at epoch 3 (0.300)"
    assert by_variant["`prior`"][5] == "epoch 2"  # mean curve 0.1, 0.25, 0.4: reaches 0.3 at epoch 2
    assert by_variant["`plain`"][5] == "epoch 3"
    assert by_variant["`groups`"][5] == "not reached"
    assert (tmp_path / "report" / "plots" / "variants.png").stat().st_size > 10_000
    overrides = table(text.split("Settings that differ between the variants (overrides):", 1)[1])
    assert overrides[0] == ["variant", "`model.spatial_prior`", "`model.num_groups`"]
    runs = table(text.split("Every run (all its epochs):", 1)[1])
    assert [row[0] for row in runs[1:]] == [f"`{path.name}`" for path in ab_runs]
    assert runs[1][4] == "0.900 (epoch 4)"  # the per-run line keeps all of a run's epochs


def test_runs_without_seeds_keep_the_side_by_side_comparison(tmp_path):
    runs = [
        write_run(tmp_path, "a", ["experiment=demo"], [0.1, 0.2]),
        write_run(tmp_path, "b", ["experiment=demo", "model.num_groups=4"], [0.1, 0.3]),
    ]
    out = tmp_path / "report.md"
    main([*map(str, runs), "-o", str(out)])
    text = out.read_text()
    assert "## Comparison" in text and "## Variants" not in text and "## Run `a`" in text


def test_runs_are_pooled_by_their_composed_config_less_the_seed(tmp_path):
    """Overrides alone mislead when the experiment's defaults changed between runs: the saved config
    decides. Output paths and the progress bar do not split a variant."""

    def config(seed: int, groups: float, out: str, bar: str | None) -> dict:
        return {
            "seed": seed,
            "model": {"num_groups": groups},
            "paths": {"output_dir": out},
            "callbacks": {"progress_bar": bar},
        }

    runs = [
        write_run(tmp_path, "default", [], [0.1, 0.2], config(42, 4, "/a", "rich")),
        write_run(tmp_path, "default_s43", ["seed=43"], [0.3, 0.4], config(43, 4.0, "/b", None)),
        write_run(tmp_path, "older_s43", ["seed=43"], [0.0, 0.1], config(43, 1, "/c", None)),
    ]
    _, read = collect(runs)
    variants = group_by_seed(read)
    assert [(variant.label, variant.seeds) for variant in variants] == [
        ("default", ["42", "43"]),
        ("older", ["43"]),
    ]
