"""harness/common/records.py: JSON-lines records, torn lines, schema checks, peaks, and concurrent appends."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
from pathlib import Path

import pytest

from harness.common.contract import CellRecord, RecordError
from harness.common.records import (
    SCHEMA_VERSION,
    ResultsError,
    append_record,
    git_sha,
    latest_by_cell,
    migrate,
    read_cell_records,
    write_json_atomic,
)
from tests.helpers import as_records, make_record


def test_records_round_trip_if_appended_and_read(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "records.jsonl"
    records = [make_record(True, True), make_record(False, True, status="oom", failed_phase="load")]
    for r in records:
        append_record(path, r)
    result = read_cell_records(path)
    assert result.records == as_records(records)
    assert result.problems == []
    assert path.read_text().count("\n") == 2


def test_torn_last_line_is_reported_and_other_records_survive(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_record(path, make_record(True, True))
    append_record(path, make_record(False, False))
    with open(path, "a") as f:
        f.write('{"schema_version": 1, "status": "o')  # a crash mid-write: no newline
    result = read_cell_records(path)
    assert [r.cell_id for r in result.records] == [
        make_record(True, True)["cell_id"],
        make_record(False, False)["cell_id"],
    ]
    assert len(result.problems) == 1
    assert result.problems[0].startswith(f"{path}:3: torn last line")


def test_unreadable_middle_line_is_reported_as_unreadable_not_torn(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_record(path, make_record(True, True))
    with open(path, "a") as f:
        f.write("not json\n")
    append_record(path, make_record(False, True))
    result = read_cell_records(path)
    assert len(result.records) == 2
    assert len(result.problems) == 1 and result.problems[0].startswith(f"{path}:2: unreadable record")


def test_strict_read_raises_naming_file_and_line_if_a_line_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_record(path, make_record())
    with open(path, "a") as f:
        f.write('{"sche')
    with pytest.raises(ResultsError, match=rf"^{path}:2: torn last line"):
        read_cell_records(path, strict=True)


def test_read_raises_if_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="no such results file"):
        read_cell_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": SCHEMA_VERSION + 1}, "is newer than this harness"),
        ({"schema_version": None}, "no integer schema_version"),
        ({"schema_version": "1"}, "no integer schema_version"),
        ({"status": None}, "status None is not one of"),
        ({"status": "exploded"}, "status 'exploded' is not one of"),
    ],
    ids=["newer-schema", "no-schema", "string-schema", "no-status", "unknown-status"],
)
def test_record_is_refused_if(tmp_path: Path, change: dict, message: str) -> None:
    record = {**make_record(), **change}
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(RecordError, match=rf"^here: .*{message}"):
        migrate(record, "here")
    path = tmp_path / "records.jsonl"
    append_record(path, record)
    append_record(path, make_record())
    result = read_cell_records(path)
    assert len(result.records) == 1
    assert len(result.problems) == 1 and result.problems[0].startswith(f"{path}:1: unreadable record")
    with pytest.raises(ResultsError, match=rf"^{path}:1: .*{message}"):
        read_cell_records(path, strict=True)


def test_json_array_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text("[1, 2]\n")
    assert read_cell_records(path).problems == [f"{path}:1: unreadable record: not a JSON object"]


def test_latest_by_cell_keeps_the_last_record_of_each_cell() -> None:
    first, other, last = as_records([make_record(True, True, status="error", failed_phase="load"),
                                     make_record(False, True), make_record(True, True, status="ok")])
    latest = latest_by_cell([first, other, last])
    assert latest == {first.cell_id: last, other.cell_id: other}


@pytest.mark.parametrize(("device", "counter"), [("cuda", "alloc_peak_reserved_bytes"), ("cpu", "ledger_peak_bytes")])
def test_peaks_uses_the_device_counter(device: str, counter: str) -> None:
    record = make_record(device=device, load=500, runtime=3_000)
    # a decoy: the other counter, much larger, must be ignored
    other = "ledger_peak_bytes" if device == "cuda" else "alloc_peak_reserved_bytes"
    for phase in record["phases"].values():
        phase[other] = 10**12
    peaks = CellRecord.from_dict(record).peaks.as_dict()
    assert peaks == {"counter": counter, "load": 500, "runtime": 3_000, "peak": 3_000}


def test_peaks_takes_load_if_above_runtime() -> None:
    peaks = CellRecord.from_dict(make_record(load=9_000, runtime=3_000)).peaks.as_dict()
    assert (peaks["load"], peaks["runtime"], peaks["peak"]) == (9_000, 3_000, 9_000)


def test_peaks_is_none_if_no_phase_ran() -> None:
    peaks = CellRecord.from_dict(make_record(load=None, runtime=None)).peaks.as_dict()
    assert (peaks["load"], peaks["runtime"], peaks["peak"]) == (None, None, None)


def test_peaks_has_no_runtime_if_failed_in_load() -> None:
    record = make_record(status="oom", failed_phase="load", load=7_000, runtime=None)
    peaks = CellRecord.from_dict(record).peaks.as_dict()
    assert (peaks["load"], peaks["runtime"], peaks["peak"]) == (7_000, None, 7_000)


@pytest.mark.parametrize(
    ("status", "phase", "expected"),
    [
        ("ok", None, True),
        ("oom", "denoise", True),
        ("oom", "encode", True),
        ("error", "decode", True),
        ("oom", "load", False),
        ("error", "load", False),
        ("error", "setup", False),
        ("skipped", None, False),
    ],
)
def test_loaded_if_status_and_phase(status: str, phase: str | None, expected: bool) -> None:
    assert CellRecord.from_dict(make_record(status=status, failed_phase=phase)).loaded is expected


def test_write_json_atomic_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "record.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


# ------------------------------------------------------------------------------------------------ concurrency

PROCS, PER_PROC, PAD = 4, 50, 20_000  # lines larger than the write buffer, so an unlocked write could tear


def _append_many(path: str, proc: int) -> None:
    for i in range(PER_PROC):
        record = {"schema_version": 1, "status": "ok", "cell_id": f"p{proc}/{i}", "pad": "x" * PAD}
        append_record(Path(path), {**record, "values": list(range(2_000))})


def test_concurrent_appends_from_several_processes_keep_every_line_intact(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), p)) for p in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = path.read_text().split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == PROCS * PER_PROC
    result = read_cell_records(path, strict=True)
    ids = sorted(r.cell_id for r in result.records)
    assert ids == sorted(f"p{p}/{i}" for p in range(PROCS) for i in range(PER_PROC))
    assert all(len(r.extra["pad"]) == PAD and r.extra["values"] == list(range(2_000)) for r in result.records)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_git_sha_says_dirty_if_a_tracked_file_differs_from_the_commit(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLOAD_BENCH_GIT_SHA", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "--short=12", "HEAD")
    (tmp_path / "untracked.txt").write_text("not code that ran\n")
    assert git_sha(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_sha(tmp_path) == f"{head}-dirty"
    monkeypatch.setenv("OFFLOAD_BENCH_GIT_SHA", "given")
    assert git_sha(tmp_path) == "given"
