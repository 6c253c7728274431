"""`detr_lightning.files`: the one atomic writer, JSON/CSV readers, number and duration helpers."""

from __future__ import annotations

import pytest

from detr_lightning.files import (
    atomic_writer,
    format_duration,
    is_number,
    read_csv_rows,
    read_json,
    to_float,
    write_json,
)


def test_atomic_writer_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "new" / "folder" / "status.json"
    with atomic_writer(path) as handle:
        handle.write('{"status": "ok"}\n')
        assert not path.exists()  # nothing at the target until the write is complete
    assert path.read_text() == '{"status": "ok"}\n'

    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == '{"status": "ok"}\n'  # the old file is kept
    with atomic_writer(tmp_path / "plot.png", "wb") as handle:
        handle.write(b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []  # no temporary file left behind


def test_read_json_is_empty_for_what_is_not_a_json_object(tmp_path):
    assert read_json(tmp_path / "missing.json") == {}
    (tmp_path / "broken.json").write_text("{not json")
    assert read_json(tmp_path / "broken.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") == {}
    (tmp_path / "ok.json").write_text('{"val/map": 0.5}')
    assert read_json(tmp_path / "ok.json") == {"val/map": 0.5}


def test_write_json_round_trips_through_read_json_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "run" / "metrics.json"
    write_json(path, {"val/map": 0.5, "names": ["a"]}, indent=2)
    assert path.read_text() == '{\n  "val/map": 0.5,\n  "names": [\n    "a"\n  ]\n}\n'
    assert read_json(path) == {"val/map": 0.5, "names": ["a"]}
    with pytest.raises(TypeError):
        write_json(path, {"not serializable": object()})
    assert read_json(path) == {"val/map": 0.5, "names": ["a"]}
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_read_csv_rows(tmp_path):
    assert read_csv_rows(tmp_path / "missing.csv") == []
    (tmp_path / "metrics.csv").write_text("epoch,val/map\n0,0.1\n1,\n")
    assert read_csv_rows(tmp_path / "metrics.csv") == [
        {"epoch": "0", "val/map": "0.1"},
        {"epoch": "1", "val/map": ""},
    ]
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00bad")
    assert read_csv_rows(tmp_path / "binary.csv") == []


def test_numbers_and_durations():
    assert to_float("0.25") == 0.25 and to_float(3) == 3.0
    assert to_float("") is None and to_float(None) is None and to_float("n/a") is None
    assert is_number(1) and is_number(0.5) and not is_number(True) and not is_number("1")
    assert format_duration(4.6) == "5 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3720) == "1 h 02 min"
