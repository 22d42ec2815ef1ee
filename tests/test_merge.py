"""`python -m harness merge`: shards of one run joined into one run that report and compare read as if one machine
had run it; runs that are not one run, and a cell measured twice, refused with exit 9 naming both sources."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest

from harness.cli import main as cli
from harness.common import exitcodes
from harness.common.contract import CellRecord, Status
from harness.common.records import latest_by_cell, read_cell_records
from harness.run.merge import MergeConflict, Source, merge, missing_shards
from tests.helpers import FIXTURES, H100

BASELINE = FIXTURES / "baselines" / "nvidia-h100-80gb-hbm3.json"


def _records() -> list[CellRecord]:
    return read_cell_records(H100).records


def _read(run: Path) -> list[CellRecord]:
    return read_cell_records(run / "records.jsonl").records


def _write_run(folder: Path, records: list[CellRecord]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    return folder


def _shards(tmp_path: Path) -> tuple[Path, Path]:
    """The H100 run split by card into two shards, each from its own host, as two machines would leave them."""
    one, two = [], []
    for r in _records():
        native = r.card_name == "native"
        r = replace(r, runner_host="gpu-b" if native else "gpu-a", shard="2/2" if native else "1/2")
        (two if native else one).append(r)
    return _write_run(tmp_path / "shard1", one), _write_run(tmp_path / "shard2", two)


def _canon(records: list[CellRecord]) -> list[str]:
    drop = ("runner_host", "shard")  # what a sharded runner adds to each record
    return sorted(json.dumps({k: v for k, v in r.to_dict().items() if k not in drop}, sort_keys=True)
                  for r in records)


def test_merging_two_shards_gives_the_single_run_records(tmp_path):
    a, b = _shards(tmp_path)
    out = tmp_path / "merged"
    assert cli(["merge", str(a), str(b), "--out", str(out)]) == exitcodes.OK
    merged = _read(out)
    assert _canon(merged) == _canon(_records())
    summary = json.loads((out / "merge.json").read_text())
    assert [s["hosts"] for s in summary["sources"]] == [["gpu-a"], ["gpu-b"]]
    assert [s["shards"] for s in summary["sources"]] == [["1/2"], ["2/2"]]


def test_compare_and_report_read_the_merged_run_like_the_single_run(tmp_path, capsys):
    a, b = _shards(tmp_path)
    out = tmp_path / "merged"
    cli(["merge", str(a), str(b), "--out", str(out)])
    capsys.readouterr()
    single = cli(["compare", str(H100), "--baseline", str(BASELINE)])
    single_text = capsys.readouterr().out
    merged = cli(["compare", str(out), "--baseline", str(BASELINE)])
    assert merged == single
    assert capsys.readouterr().out == single_text
    assert cli(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "| machine" in report and "gpu-a (shard 1/2)" in report and "gpu-b (shard 2/2)" in report
    cli(["report", str(H100)])
    assert "| machine" not in capsys.readouterr().out  # one machine: no column


def test_the_same_record_in_two_sources_is_kept_once(tmp_path):
    a, _ = _shards(tmp_path)
    copy_of_a = _write_run(tmp_path / "again", _read(a))
    merged = merge([Source(str(a), a, _read(a)), Source(str(copy_of_a), copy_of_a, _read(copy_of_a))])
    assert merged.duplicates == len(merged.records) == 6  # the rtx5090 card: 4 cells and the legacy scenario's 2


def test_a_cell_measured_in_two_sources_is_refused_naming_both(tmp_path, capsys):
    a, b = _shards(tmp_path)
    stolen = copy.deepcopy(next(r for r in _read(a) if r.status is Status.OK))
    stolen.phases["load"].alloc_peak_reserved_bytes += 1  # measured again, elsewhere: another number
    stolen.runner_host = "gpu-b"
    _write_run(b, [*_read(b), stolen])
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == exitcodes.MERGE_CONFLICT == 9
    err = capsys.readouterr().err
    assert f"{stolen.cell_id}: measured twice" in err and str(a) in err and str(b) in err
    assert not (tmp_path / "m" / "records.jsonl").exists()


def test_a_failure_retried_on_another_machine_is_not_a_conflict(tmp_path):
    a, b = _shards(tmp_path)
    records_a = _read(a)
    ok = next(r for r in records_a if r.status is Status.OK)
    crashed = replace(ok, status=Status.CRASH, created="2000-01-01T00:00:00+00:00", reason="child killed by signal 9")
    _write_run(b, [*_read(b), crashed])
    merged = merge([Source(str(a), a, records_a), Source(str(b), b, _read(b))])
    assert latest_by_cell(merged.records)[ok.cell_id].status == "ok"  # the later record counts
    assert merged.retried == [ok.cell_id]


def test_a_resumed_run_keeps_its_history_of_one_cell(tmp_path):
    """--resume --retry-failed appends a rerun to the same file: both records stay, the latest counts."""
    a, b = _shards(tmp_path)
    records_a = _read(a)
    ok = next(r for r in records_a if r.status is Status.OK)
    crashed = replace(ok, status=Status.CRASH, created="2000-01-01T00:00:00+00:00")
    _write_run(a, [crashed, *records_a])
    merged = merge([Source(str(a), a, _read(a)), Source(str(b), b, _read(b))])
    assert len(merged.records) == len(_records()) + 1
    assert latest_by_cell(merged.records)[ok.cell_id].status == "ok"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("run_id", "other-run", "not one run"), ("git_sha", "0123456789ab", "not one commit")],
)
def test_runs_that_are_not_one_run_are_refused(tmp_path, capsys, field, value, words):
    a, b = _shards(tmp_path)
    _write_run(b, [replace(r, **{field: value}) for r in _read(b)])
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == exitcodes.MERGE_CONFLICT
    err = capsys.readouterr().err
    assert words in err and str(a) in err and str(b) in err


def test_a_cell_whose_spec_changed_between_sources_is_refused(tmp_path):
    a, b = _shards(tmp_path)
    records_a = _read(a)
    failed = replace(records_a[0], status=Status.CRASH, portable_spec_hash="aaaaaaaaaaaa")
    _write_run(b, [*_read(b), failed])
    with pytest.raises(MergeConflict, match="spec differs"):
        merge([Source(str(a), a, records_a), Source(str(b), b, _read(b))])


def test_merge_usage_and_no_records(tmp_path, capsys):
    a, b = _shards(tmp_path)
    assert cli(["merge", str(a), str(tmp_path / "nowhere")]) == exitcodes.USAGE
    (tmp_path / "empty").mkdir()
    assert cli(["merge", str(a), str(tmp_path / "empty")]) == exitcodes.NO_RECORDS
    assert cli(["merge", str(a), str(b), "--out", str(a)]) == exitcodes.USAGE  # never over an existing run
    assert "already holds records.jsonl" in capsys.readouterr().err


def test_default_out_is_beside_the_first_run_and_missing_shards_are_named(tmp_path, capsys):
    a, _ = _shards(tmp_path)
    assert cli(["merge", str(a)]) == exitcodes.OK
    assert (tmp_path / "big-merged" / "records.jsonl").exists()
    assert "no records of shard 2/2" in capsys.readouterr().err
    assert missing_shards([CellRecord("s/c/x", Status.OK, shard=shard) for shard in ("1/3", "3/3")]) == ["2/3"]


@pytest.mark.slow
def test_two_shards_in_two_processes_merge_to_the_unsharded_run(tmp_path, capsys):
    """End to end on the CPU profile: one cell on each of two cards, run unsharded and as shards 1/2 and 2/2 of one
    run id in two runner processes, merged: the same cells, fates, peaks, latents and set-level verdicts; every
    record that ran a child carries its fixed cost."""
    from harness.analyze.expect import evaluate
    from harness.plan.scenario import load_scenario
    from harness.run import runner
    from tests.helpers import base_scenario, to_toml

    data = base_scenario()
    data["expect"].pop("fate")
    data.update(axes={"dit_cpu_offload": [True], "dit_layerwise_offload": [True]}, exclude=[])
    scenario_file = tmp_path / "unit.toml"
    scenario_file.write_text(to_toml(data))
    assert runner.main([str(scenario_file), "--results", str(tmp_path / "one"), "--run-id", "r", "--quiet"]) == 0
    for i in (1, 2):
        assert runner.main([str(scenario_file), "--results", str(tmp_path / f"s{i}"), "--run-id", "r", "--quiet",
                            "--shard", f"{i}/2"]) == 0
    shards = [str(tmp_path / f"s{i}" / "runs" / "r") for i in (1, 2)]
    assert cli(["merge", *shards, "--out", str(tmp_path / "merged")]) == exitcodes.OK
    single = latest_by_cell(_read(tmp_path / "one" / "runs" / "r"))
    merged = latest_by_cell(_read(tmp_path / "merged"))
    assert sorted(merged) == sorted(single) and len(merged) == 2
    assert {r.shard for r in merged.values()} == {"1/2", "2/2"}

    def essence(r: CellRecord) -> tuple:
        # peaks are computed from the phases since schema 2 (harness.common.contract), not stored
        return (r.status, r.failed_phase, r.peaks, (r.outputs or {}).get("latents_sha256"))

    assert {k: essence(r) for k, r in merged.items()} == {k: essence(r) for k, r in single.items()}
    scenario = load_scenario(scenario_file)
    verdicts = [(v.check, v.card, v.passed) for v in evaluate(scenario, list(merged.values()))]
    assert verdicts == [(v.check, v.card, v.passed) for v in evaluate(scenario, list(single.values()))]
    assert any(check == "lowest_peak" for check, _, _ in verdicts)
    # and as each run's end wrote them (the runner, merge): the report reads these
    from harness.analyze.readout import read_run

    for folder in (tmp_path / "one" / "runs" / "r", tmp_path / "merged"):
        assert (folder / "verdicts.json").is_file()
        written = read_run(folder / "records.jsonl").verdicts
        assert [(v.check, v.card, v.passed) for s in written for v in s.verdicts] == verdicts
    for r in merged.values():
        o = r.overhead or {}
        start = {"spawn": "process_start_s", "fork-server": "fork_s"}[o["start"]]
        assert {start, "imports_s", "guards_s", "measured_s", "teardown_s", "fixed_s", "other_s"} <= set(o)
        assert o["fixed_s"] == pytest.approx(r.elapsed_s - o["measured_s"], abs=0.01)
        assert o["teardown_s"] < 3  # os._exit: no interpreter teardown (7 s with it on the loaded CPU box)
