"""The regression gate never passes silently: every way `compare` can fail to judge has its own exit code and one
line saying why (harness/common/exitcodes.py), and the Makefile targets accept a records file as RUN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import cli
from harness.analyze.baseline import build_baseline, run_cells
from harness.analyze.compare import NOT_COMPARABLE, NOT_COMPARED, REGRESSED, compare
from harness.common import exitcodes
from harness.common.records import append_record
from harness.plan.scenario import ScenarioError, expand, load_scenario
from tests.helpers import (
    BASELINES,
    CPU,
    H100,
    OK,
    SKU,
    VARIANT,
    S,
    as_records,
    base_scenario,
    mutate,
    tiny_scenario_file,
    to_toml,
)

REPO = Path(__file__).resolve().parent.parent


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_records(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("wrote ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------ exit codes


def test_exit_codes_are_distinct():
    codes = [exitcodes.OK, exitcodes.FAILED, exitcodes.USAGE, exitcodes.NO_BASELINE, exitcodes.NO_RECORDS,
             exitcodes.ALL_SKIPPED, exitcodes.ALL_FAILED, exitcodes.UNWRITABLE, exitcodes.DISK_FULL,
             exitcodes.MERGE_CONFLICT, exitcodes.NEWER_RECORD, exitcodes.SIGINT, exitcodes.SIGTERM]
    assert len(set(codes)) == len(codes) and set(codes) == set(exitcodes.MEANING)


def test_new_sku_without_baseline_names_the_command_that_makes_one(tmp_path, capsys):
    """A first run on a new machine (the H200) used to print a note and exit 0: the gate passed."""
    recs = records(H100)
    for r in recs:
        r["machine"]["sku"] = "nvidia-h200"
    run = write_records(tmp_path / "h200.records.jsonl", recs)
    md = tmp_path / "c.md"
    assert cli.main(["compare", str(run), "--markdown", str(md)]) == exitcodes.NO_BASELINE
    line = one_line_error(capsys.readouterr().err)
    assert "no baseline for SKU nvidia-h200" in line
    assert f"make baseline RUN={run}" in line and f"python -m harness baseline {run}" in line
    assert "Nothing compared" in md.read_text()


def test_run_with_no_records(tmp_path, capsys):
    empty = tmp_path / "empty.records.jsonl"
    empty.write_text("")
    assert cli.main(["compare", str(empty), "--baselines-dir", str(BASELINES)]) == exitcodes.NO_RECORDS
    assert "no records" in one_line_error(capsys.readouterr().err)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n{also not\n")
    assert cli.main(["compare", str(garbage), "--baselines-dir", str(BASELINES)]) == exitcodes.NO_RECORDS
    assert "2 unreadable lines" in capsys.readouterr().err
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    md = folder / "compare.md"
    assert cli.main(["compare", str(folder), "--markdown", str(md)]) == exitcodes.NO_RECORDS
    assert "without records.jsonl" in one_line_error(capsys.readouterr().err)
    assert "no records" in md.read_text()


def test_missing_path_is_still_a_usage_error(tmp_path, capsys):
    md = tmp_path / "new" / "c.md"
    rc = cli.main(["compare", str(tmp_path / "typo.jsonl"), "--baselines-dir", str(BASELINES), "--markdown", str(md)])
    assert rc == exitcodes.USAGE
    assert "no such results file" in one_line_error(capsys.readouterr().err)
    assert not md.parent.exists()  # the writability check leaves nothing behind


def test_every_cell_skipped(tmp_path, capsys):
    recs = records(H100)
    for r in recs:
        r.update(status="skipped", failed_phase=None, reason="host RAM: 1.0 GiB available, the cell needs 40.0 GiB")
    run = write_records(tmp_path / "run.jsonl", recs)
    rc = cli.main(["compare", str(run), "--baselines-dir", str(BASELINES)])
    assert rc == exitcodes.ALL_SKIPPED
    line = one_line_error(capsys.readouterr().err)
    assert f"all {len(recs)} cells were skipped" in line and "host RAM" in line


@pytest.mark.parametrize("fates", [["crash"], ["crash", "timeout", "error"], ["crash", "skipped"]])
def test_every_cell_crashed(tmp_path, capsys, fates):
    """Crash records carry no machine (the child died before measuring): this used to be 'no record names its
    machine SKU', a usage error (exit 2), indistinguishable from a typo."""
    recs = records(H100)
    for i, r in enumerate(recs):
        r.update(status=fates[i % len(fates)], failed_phase="load", reason="child killed by signal 9 (SIGKILL)")
        r.pop("machine")
    run = write_records(tmp_path / "run.jsonl", recs)
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES)]) == exitcodes.ALL_FAILED
    line = one_line_error(capsys.readouterr().err)
    assert "without a measurement" in line and "crash" in line


def test_some_cells_crashed_is_a_regression_not_all_failed(tmp_path, capsys):
    recs = records(H100)
    crashed = next(r for r in recs if r["cell_id"] == OK)
    crashed.update(status="crash", failed_phase="denoise")
    run = write_records(tmp_path / "run.jsonl", recs)
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES)]) == exitcodes.FAILED


def test_regressed_run_exits_1_and_identical_run_0(capsys):
    assert cli.main(["compare", str(VARIANT), "--baselines-dir", str(BASELINES)]) == exitcodes.FAILED
    assert cli.main(["compare", str(H100), "--baselines-dir", str(BASELINES)]) == exitcodes.OK


# ------------------------------------------------------------------------------------------------ RUN as a file


def test_compare_write_beside_a_records_file(tmp_path, capsys):
    """`make compare RUN=<file>` used to write <file>/compare.md: FileExistsError."""
    run = tmp_path / "x.records.jsonl"
    shutil.copy(VARIANT, run)
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES), "--write"]) == exitcodes.FAILED
    assert "## Metrics" in (tmp_path / "x.compare.md").read_text()
    assert json.loads((tmp_path / "x.benchmark.json").read_text())
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    shutil.copy(H100, folder / "records.jsonl")
    assert cli.main(["compare", str(folder), "--baselines-dir", str(BASELINES), "--write"]) == exitcodes.OK
    assert (folder / "compare.md").exists() and (folder / "benchmark.json").exists()


def test_report_write_beside_a_records_file(tmp_path, capsys):
    run = tmp_path / "x.records.jsonl"
    shutil.copy(CPU, run)
    assert cli.main(["report", str(run), "--write", "--no-plots"]) == 0
    assert (tmp_path / "x.report.md").read_text().startswith("#")


def _make(target: str, run: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # -o deps: take the install check as done (the test process already imports everything it needs)
    return subprocess.run(
        ["make", "-s", "-o", "deps", target, f"RUN={run}", f"BASELINES={BASELINES}", f"PYTHON={sys.executable}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_compare_and_report_accept_a_records_file(tmp_path):
    run = tmp_path / "x.records.jsonl"
    shutil.copy(VARIANT, run)
    proc = _make("compare", run, tmp_path)
    # GNU make reports any failing recipe as 2; the recipe says what harness compare itself returned
    assert proc.returncode == 2 and "FileExistsError" not in proc.stderr
    assert "harness compare exited 1" in proc.stderr
    assert (tmp_path / "x.compare.md").exists() and (tmp_path / "x.benchmark.json").exists()
    ok = tmp_path / "ok.records.jsonl"
    shutil.copy(H100, ok)
    assert _make("compare", ok, tmp_path).returncode == 0
    proc = _make("report", ok, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ok.report.md").exists()


# ------------------------------------------------------------------------------------------------ --partial=card


def test_partial_by_card(tmp_path, capsys):
    """A run of one card of a scenario: --partial (by scenario) still reports the other card's cells missing."""
    run = tmp_path / "run.jsonl"
    write_records(run, [r for r in records(H100) if r["cell_id"].startswith(f"{S}/native/")])
    base = ["compare", str(run), "--baselines-dir", str(BASELINES)]
    assert cli.main([*base, "--partial"]) == exitcodes.FAILED
    assert cli.main([*base, "--partial=card"]) == exitcodes.OK
    out = capsys.readouterr().out
    assert "rtx5090-32g" not in out.split("Metrics:")[-1]
    # a cell of the selected card that the run lacks is still missing
    write_records(run, [r for r in records(H100) if r["cell_id"].startswith(f"{S}/native/") and r["cell_id"] != OK])
    assert cli.main([*base, "--partial=card"]) == exitcodes.FAILED


# ------------------------------------------------------------------------------------------------ spec and machine


def _with_spec(recs: list[dict[str, Any]], digest: str) -> list[dict[str, Any]]:
    for r in recs:
        r["portable_spec_hash"] = f"{digest}-{r['cell_id']}"
    return recs


def test_baseline_keeps_the_portable_spec_hash():
    base = build_baseline(as_records(_with_spec(records(H100), "a")))
    assert base.cells[OK].portable_spec_hash == f"a-{OK}"


def test_edited_cell_is_not_comparable_never_regressed():
    base = build_baseline(as_records(_with_spec(records(H100), "a")))
    recs = _with_spec(records(H100), "a")
    edited = next(r for r in recs if r["cell_id"] == OK)
    edited["portable_spec_hash"] = "b"  # e.g. `steps` changed in the scenario file
    edited["phases"]["load"]["alloc_peak_reserved_bytes"] *= 2
    comp = compare(base, run_cells(as_records(recs), SKU))
    cell = next(c for c in comp.cells if c.cell_id == OK)
    assert cell.verdict == NOT_COMPARABLE and "spec changed" in cell.note
    assert {r.verdict for r in comp.rows if r.cell_id == OK} == {NOT_COMPARED}
    assert not comp.failed
    # the same edit without a spec change is a regression
    edited["portable_spec_hash"] = f"a-{OK}"
    comp = compare(base, run_cells(as_records(recs), SKU))
    assert any(r.verdict == REGRESSED for r in comp.rows if r.cell_id == OK) and comp.failed


def test_old_baseline_without_spec_hashes_says_so(tmp_path, capsys):
    run = write_records(tmp_path / "run.jsonl", _with_spec(records(H100), "a"))
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES)]) == exitcodes.OK
    assert "Note: the baseline predates portable_spec_hash" in capsys.readouterr().out


def test_every_cell_not_comparable_is_no_baseline(tmp_path, capsys):
    baseline = build_baseline(as_records(_with_spec(records(H100), "a")))
    (tmp_path / f"{SKU}.json").write_text(json.dumps(baseline.to_dict()))
    run = write_records(tmp_path / "run.jsonl", _with_spec(records(H100), "b"))
    assert cli.main(["compare", str(run), "--baselines-dir", str(tmp_path)]) == exitcodes.NO_BASELINE
    assert "every cell's spec changed" in one_line_error(capsys.readouterr().err)


def test_portable_spec_hash_ignores_the_checkout(tmp_path):
    src = REPO / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml"
    other = tmp_path / "elsewhere" / src.name
    other.parent.mkdir()
    other.write_text(src.read_text())
    a, b = expand(load_scenario(src))[0], expand(load_scenario(other))[0]
    assert a.spec_hash("cpu") != b.spec_hash("cpu")  # the resume key includes the path
    assert a.portable_spec_hash("cpu") == b.portable_spec_hash("cpu")
    other.write_text(src.read_text().replace("steps = 2", "steps = 3"))
    assert expand(load_scenario(other))[0].portable_spec_hash("cpu") != a.portable_spec_hash("cpu")


def test_software_change_is_one_warning_line(tmp_path, capsys):
    recs = records(H100)
    for r in recs:
        r["machine"].update(torch="2.13.0+cu130", driver="590.1")
    run = write_records(tmp_path / "run.jsonl", recs)
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES)]) == exitcodes.OK
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "driver 580.159.04 -> 590.1" in warnings[0] and "torch 2.11.0+cu130 -> 2.13.0+cu130" in warnings[0]
    assert "cuda" not in warnings[0]
    assert "Note: the run's software differs" in captured.out
    assert cli.main(["compare", str(H100), "--baselines-dir", str(BASELINES)]) == exitcodes.OK
    assert "warning:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ CPU profile


def test_cpu_profile_compares_memory_and_validity_not_timing(tmp_path, capsys):
    (tmp_path / "cpu.json").write_text(json.dumps(build_baseline(as_records(records(CPU))).to_dict()))
    slow = records(CPU)
    for r in slow:
        for phase in r["phases"].values():
            phase["time_ms"] *= 3  # CPU noise on a shared box
            phase.pop("step_ms", None)
    run = write_records(tmp_path / "slow.jsonl", slow)
    assert cli.main(["compare", str(run), "--baselines-dir", str(tmp_path)]) == exitcodes.OK
    out = capsys.readouterr().out
    assert "memory and validity only (CPU profile: timing not compared)" in out.splitlines()[0]
    assert "e2e_ms" not in out and "ledger" in out
    assert cli.main(["compare", str(run), "--baselines-dir", str(tmp_path), "--timing"]) == exitcodes.FAILED
    capsys.readouterr()
    hungry = records(CPU)
    for r in hungry:
        for phase in r["phases"].values():
            phase["ledger_peak_bytes"] = int(phase["ledger_peak_bytes"] * 1.5)
    run = write_records(tmp_path / "hungry.jsonl", hungry)
    assert cli.main(["compare", str(run), "--baselines-dir", str(tmp_path)]) == exitcodes.FAILED


# ------------------------------------------------------------------------------------------------ unwritable outputs


def test_unwritable_outputs_are_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "sub"  # a folder under a regular file cannot be made, even by root
    rc = cli.main(["compare", str(tmp_path / "no-such-run"), "--markdown", str(bad / "c.md")])
    assert rc == exitcodes.UNWRITABLE  # checked before the run is even read
    assert str(bad) in one_line_error(capsys.readouterr().err)
    assert cli.main(["report", str(H100), "--out", str(bad / "r.md")]) == exitcodes.UNWRITABLE
    assert str(bad) in one_line_error(capsys.readouterr().err)
    assert cli.main(["baseline", str(H100), "--baselines-dir", str(bad)]) == exitcodes.UNWRITABLE
    assert str(bad) in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ -k and set tests


def _collect(args: list[str], results: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "PYTEST_ADDOPTS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "scenarios", "-p", "no:cacheprovider", "--collect-only", "-q",
         "--bench-profile", "cpu", "--bench-results", str(results), "--bench-scenario", "qwen-image-edit-tiny",
         *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_k_that_drops_cells_of_a_card_drops_its_set_test(tmp_path):
    """The set-level test used to stay selected and run every cell of its card that -k had deselected."""
    proc = _collect(["-k", "not cpu0"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_expectations[" not in proc.stdout.split("offload-bench:")[0]
    assert "2 set-level tests deselected because -k/-m left out cells of their card" in proc.stdout
    assert "test_expectations[qwen-image-edit-tiny/native]" in proc.stdout  # named in the summary line
    # nothing deselected: every set test stays
    proc = _collect([], tmp_path)
    assert proc.stdout.count("test_expectations[") == 2 and "set-level tests deselected" not in proc.stdout


def test_set_test_stays_when_the_left_out_cells_are_already_recorded(tmp_path):
    scenario = load_scenario(REPO / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml")
    path = tmp_path / "runs" / "r" / "records.jsonl"
    for cell in expand(scenario):
        append_record(path, {"schema_version": 1, "cell_id": cell.cell_id, "status": "ok",
                             "spec_hash": cell.spec_hash("cpu")})
    proc = _collect(["-k", "not cpu0", "--bench-run-id", "r"], tmp_path)
    assert proc.stdout.count("test_expectations[") == 2, proc.stdout  # it only reads records: nothing reruns



# ------------------------------------------------------------------------------------------------ pytest scenarios


def _pytest_scenarios(args: list[str], results: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "PYTEST_ADDOPTS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "scenarios", "-p", "no:cacheprovider", "--collect-only", "-q",
         "--bench-profile", "cpu", "--bench-results", str(results), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def _lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def test_bench_scenario_that_matches_nothing_lists_the_names(tmp_path):
    """It used to be INTERNALERROR TypeError 'NotSetType', exit 3."""
    proc = _pytest_scenarios(["--bench-scenario", "nope"], tmp_path)
    assert proc.returncode == 4
    [line] = _lines(proc)
    assert line.startswith("ERROR: offload-bench: --bench-scenario nope matches no scenario; the scenarios are: ")
    assert "qwen-image-edit-tiny" in line


def test_bench_scenarios_dir_and_a_bad_scenario_is_one_line(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    tiny_scenario_file(folder, "mine", {"dit_cpu_offload": [True], "dit_layerwise_offload": [True]})
    proc = _pytest_scenarios(["--bench-scenarios-dir", str(folder)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_cell[mine/native/cpu1-lw1-te0-vae0-pf1-pin1]" in proc.stdout and "qwen" not in proc.stdout
    (folder / "bad.toml").write_text('name = "bad"\nmodel = "qwen-image-edit-tiny"\nsteps = "many"\n')
    proc = _pytest_scenarios(["--bench-scenarios-dir", str(folder)], tmp_path)
    assert proc.returncode == 4
    [line] = _lines(proc)
    assert line.startswith(f"ERROR: offload-bench: {folder / 'bad.toml'}: ") and "Traceback" not in proc.stderr
    # selected by name, the good scenario runs despite the unrelated bad file (a one-line warning names it)
    proc = _pytest_scenarios(["--bench-scenarios-dir", str(folder), "--bench-scenario", "mine"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_cell[mine/native/cpu1-lw1-te0-vae0-pf1-pin1]" in proc.stdout
    assert f"offload-bench: skipping {folder / 'bad.toml'}: " in proc.stdout + proc.stderr
    # asked for a name that only a bad file could hold: that file's error, not "matches no scenario"
    proc = _pytest_scenarios(["--bench-scenarios-dir", str(folder), "--bench-scenario", "bad"], tmp_path)
    assert proc.returncode == 4 and f"ERROR: offload-bench: {folder / 'bad.toml'}: " in proc.stdout + proc.stderr
    proc = _pytest_scenarios(["--bench-scenarios-dir", str(tmp_path / "nope")], tmp_path)
    assert proc.returncode == 4 and "no such folder" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ scenario load


def _scenario(tmp_path: Path, name: str = "unit", **changes: Any) -> Path:
    """The helpers' base scenario with `a__b__0=value` changes (a path of keys and list indices)."""
    data = base_scenario()
    data["name"] = name
    for key, value in changes.items():
        data = mutate(data, tuple(int(k) if k.isdigit() else k for k in key.split("__")), value)
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(data))
    return path


def test_expectations_outside_the_matrix_fail_at_load(tmp_path):
    load_scenario(_scenario(tmp_path))  # the base scenario is fine
    # excluded cell named by lowest_peak: it used to fail only after the whole suite ("0 cells match")
    bad = _scenario(tmp_path, expect__lowest_peak={"dit_cpu_offload": False, "dit_layerwise_offload": False})
    with pytest.raises(ScenarioError, match=r"expect\.lowest_peak: .* matches 0 harness-backend cells"):
        load_scenario(bad)
    # a fate whose where matches no cell used to check nothing, silently
    fate = {"status": "oom", "where": {"dit_cpu_offload": False, "dit_layerwise_offload": False}}
    bad = _scenario(tmp_path, expect__fate=[fate])
    with pytest.raises(ScenarioError, match=r"expect\.fate\[0\]\.where: .* matches no cell of the matrix"):
        load_scenario(bad)


@pytest.mark.parametrize("card", ["", " ", "a/b"])
def test_card_names_must_be_usable_in_cell_ids(tmp_path, card):
    with pytest.raises(ScenarioError, match=r"cards\[0\]\.name: (expected a non-empty name|must be a plain folder)"):
        load_scenario(_scenario(tmp_path, cards__0={"name": card, "mib": 6}))


def test_duplicate_scenario_names_name_both_files(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _scenario(tmp_path / "a", "same"), _scenario(tmp_path / "b", "same")
    assert cli.main(["list", "--scenarios", str(tmp_path)]) == exitcodes.USAGE
    line = one_line_error(capsys.readouterr().err)
    assert str(a) in line and str(b) in line


def test_list_on_a_missing_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["list", "--scenarios", str(tmp_path / "nope")]) == exitcodes.USAGE
    assert "no such scenarios folder" in one_line_error(capsys.readouterr().err)
