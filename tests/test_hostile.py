"""Hostile input and real faults, round two (issue #30): each case of the issue, one row or test each. Every bad
input ends in one line naming the input and the form it accepts, with its exit code, before any child starts;
nothing is silent, nothing is dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main as cli
from harness.common import exitcodes
from harness.common.contract import SCHEMA_VERSION
from harness.common.inputs import InputError, check_environment, check_output_file
from harness.common.records import read_cell_records
from harness.plan.scenario import ReleaseNotInstalled, ScenarioError, expand, load_scenario
from tests.helpers import H100, TINY_SCENARIO, base_scenario, mutate, to_toml
from tests.helpers import planned as planned_record

REPO = Path(__file__).resolve().parent.parent


def write(folder: Path, data: dict[str, Any], name: str = "scenario.toml") -> Path:
    path = folder / name
    path.write_text(to_toml(data))
    return path


def wan(**over: Any) -> dict[str, Any]:
    data = {**base_scenario(), "model": "wan-tiny", "frames": 5, "true_cfg_scale": 1.0}
    for key in ("expect", "exclude", "flags"):
        data.pop(key)
    data["cards"] = ["native"]
    return {**data, **over}


# ------------------------------------------------------------------------------------------- 1. lost record


def test_merge_of_a_record_of_a_newer_schema_refuses_with_its_own_code_and_drops_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = H100.read_text().splitlines()
    newer = json.loads(lines[0])
    newer.update(schema_version=SCHEMA_VERSION + 1, cell_id=newer["cell_id"] + "-newer")
    (run / "records.jsonl").write_text("\n".join([*lines, json.dumps(newer)]) + "\n")
    out = tmp_path / "merged"
    assert cli(["merge", str(run), "--out", str(out)]) == exitcodes.NEWER_RECORD == 10
    err = capsys.readouterr().err
    assert "merge refused" in err and f"schema_version {SCHEMA_VERSION + 1} is newer" in err
    assert not (out / "records.jsonl").exists()
    assert exitcodes.NEWER_RECORD in exitcodes.MEANING
    assert "| 10 | `NEWER_RECORD` |" in (REPO / "docs" / "exit-codes.md").read_text()


def test_a_torn_last_line_is_no_newer_record(tmp_path):
    """Only whole records of a newer schema refuse a merge; a torn line (an interrupted write) stays a warning."""
    path = tmp_path / "records.jsonl"
    path.write_text(H100.read_text() + '{"schema_version": 99, "cell_id": "x"')
    result = read_cell_records(path)
    assert result.problems and not result.newer


# ---------------------------------------------------------------------------- 2. silent wrong results: scenario


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (mutate(base_scenario(), ("frames",), 81), "frames", "makes images"),
        (wan(frames=6), "frames", "1 + a multiple of 4"),
        (wan(frames=4097 + 4), "frames", "at most 4097"),
        (mutate(base_scenario(), ("height",), 2**40), "height", "at most 16384"),
        (mutate(base_scenario(), ("width",), 2**20), "width", "at most 16384"),
        (mutate(base_scenario(), ("name",), "bad\nname"), "name", "control or format character"),
        (mutate(base_scenario(), ("name",), "   "), "name", "non-empty"),
        (mutate(base_scenario(), ("name",), "a\x00b"), "name", "control or format character"),
        (mutate(base_scenario(), ("name",), " lead"), "name", "leading or trailing blanks"),
        (mutate(base_scenario(), ("name",), "abc\u202edef"), "name", "bidi override"),
        (mutate(base_scenario(), ("name",), "x" * 300), "name", "300 bytes long; at most 100"),
        (mutate(base_scenario(), ("name",), "ü" * 60), "name", "120 bytes long"),
        (mutate(base_scenario(), ("cards", 0, "name"), "c" * 65), "cards[0].name", "at most 64"),
        (mutate(base_scenario(), ("cards", 0, "name"), "tab\tcard"), "cards[0].name", "control or format character"),
        (mutate(base_scenario(), ("backends",), ["harness", "sglang@9.9.9"]), "backends[1]", "no release"),
    ],
    ids=["frames-on-image", "wan-frames-6", "wan-frames-huge", "height-2**40", "width-huge", "name-newline",
         "name-blank", "name-nul", "name-leading-blank", "name-rtl-override", "name-300", "name-utf8-bytes",
         "card-name-long", "card-name-tab", "backend-unknown-release"],
)
def test_scenario_field_refused_at_load_naming_the_field(tmp_path, data, field, words):
    with pytest.raises(ScenarioError) as e:
        load_scenario(write(tmp_path, data))
    assert f": {field}: " in str(e.value) and words in str(e.value), str(e.value)
    assert not isinstance(e.value, ReleaseNotInstalled)


@pytest.mark.parametrize("frames", [1, 5, 81])
def test_wan_frames_one_plus_4k_load(tmp_path, frames):
    assert load_scenario(write(tmp_path, wan(frames=frames))).frames == frames


def test_backend_release_known_but_not_installed_follows_the_policy_rule(tmp_path, monkeypatch):
    """A release this harness knows but this machine lacks: ReleaseNotInstalled (listed and skipped, an error when
    asked for by name), exactly what `policy = "sglang@<that version>"` gives."""
    import harness.engine.install as install

    monkeypatch.setattr(install, "installed", lambda *a, **k: {})
    data = mutate(base_scenario(), ("backends",), ["harness", "sglang@0.5.23"])
    with pytest.raises(ReleaseNotInstalled) as e:
        load_scenario(write(tmp_path, data))
    assert e.value.version == "0.5.23" and "backends[1]" in str(e.value)


def test_one_file_is_one_scenario_however_its_path_is_typed(tmp_path, monkeypatch):
    path = write(tmp_path, base_scenario())
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    hashes = {tuple(c.spec_hash("cpu") for c in expand(load_scenario(p))) for p in (path, Path(path.name), link)}
    assert len(hashes) == 1


# ---------------------------------------------------------------------------------- 2./3. run ids, environment


def run_runner(args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OFFLOAD_BENCH_PROFILE": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "harness.run.runner", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=full_env, timeout=timeout)


@pytest.mark.parametrize(
    ("run_id", "words"),
    [("", "non-empty"), ("a/b", "plain folder name"), ("x" * 300, "at most 128"), ("..", "plain folder name"),
     ("a\nb", "control or format character")],
    ids=["empty", "slash", "overlong", "dotdot", "newline"],
)
def test_bad_run_id_is_one_usage_line_before_any_cell(tmp_path, run_id, words):
    for extra in ([], ["--resume"]):
        proc = run_runner([str(TINY_SCENARIO), "--results", str(tmp_path / "r"), "--run-id", run_id, *extra],
                          tmp_path)
        assert proc.returncode == exitcodes.USAGE, proc.stderr
        assert proc.stderr.count("\n") == 1 and "--run-id" in proc.stderr and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


@pytest.mark.parametrize(
    ("name", "value", "form"),
    [("OFFLOAD_BENCH_RESULTS_FREE_BYTES", "lots", "byte count"),
     ("OFFLOAD_BENCH_RESULTS_MIN_FREE_BYTES", "1GB", "byte count"),
     ("OFFLOAD_BENCH_GPU_TOTAL_BYTES", "80G", "memory size in bytes"),
     ("OFFLOAD_BENCH_GPU_TOTAL_BYTES", "0", "memory size in bytes: a number > 0"),
     ("OFFLOAD_BENCH_RESULTS_FREE_BYTES", "1e400", "byte count"),
     ("OFFLOAD_BENCH_HOST_AVAILABLE_BYTES", "lots", "byte count"),
     ("OFFLOAD_BENCH_DISK_FREE_BYTES", "-5", "byte count"),
     ("OFFLOAD_BENCH_GPU_FREE_BYTES", "nan", "byte count"),
     ("OFFLOAD_BENCH_PROGRESS_S", "soon", "seconds > 0"),
     ("OFFLOAD_BENCH_PROGRESS_S", "0", "seconds > 0"),
     ("OFFLOAD_BENCH_GUARD_MARGIN", "ten", "fraction >= 0"),
     ("OFFLOAD_BENCH_GPU_MAX_FOREIGN_FRACTION", "5", "from 0 to 1"),
     ("OFFLOAD_BENCH_PROFILE", "gpuu", "one of cpu, gpu, auto"),
     ("OFFLOAD_BENCH_GUARDS", "of", "one of 0, 1"),
     ("OFFLOAD_BENCH_H2D_PROBE", "eahc", "one of each, first")],
)
def test_bad_environment_variable_named_with_its_form(name, value, form):
    with pytest.raises(InputError) as e:
        check_environment({name: value})
    assert str(e.value).startswith(f"{name}={value!r}: expected") and form in str(e.value)


def test_runner_refuses_a_bad_environment_variable_before_any_child(tmp_path):
    proc = run_runner([str(TINY_SCENARIO), "--results", str(tmp_path / "r")], tmp_path,
                      env={"OFFLOAD_BENCH_HOST_AVAILABLE_BYTES": "lots"})
    assert proc.returncode == exitcodes.USAGE
    assert "OFFLOAD_BENCH_HOST_AVAILABLE_BYTES='lots': expected a byte count" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_every_environment_variable_the_code_reads_is_checked_or_not_a_number():
    """grep OFFLOAD_BENCH_ over the harness: every variable holding a number or a choice is in inputs.ENV."""
    import re

    from harness.common.inputs import ENV

    free_form = {"OFFLOAD_BENCH_CACHE", "OFFLOAD_BENCH_SGLANG_ROOT", "OFFLOAD_BENCH_SGLANG_ANSWERS",
                 "OFFLOAD_BENCH_GIT_SHA", "OFFLOAD_BENCH_FAULT", "OFFLOAD_BENCH_SGLANG"}
    seen = set()
    for path in (REPO / "harness").rglob("*.py"):
        seen |= set(re.findall(r"OFFLOAD_BENCH_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert seen - free_form <= set(ENV), sorted(seen - free_form - set(ENV))


# -------------------------------------------------------------------------------- 3. folders where files go


def test_check_output_file_refuses_a_folder(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        check_output_file(tmp_path, "--markdown")


def test_capacity_into_a_read_only_results_folder_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into a chmod 555 folder; the read-only mount case needs a bind mount")
    results = tmp_path / "ro"
    results.mkdir()
    results.chmod(0o555)
    try:
        rc = cli(["capacity", str(REPO / "scenarios" / "gpu" / "flux_dev_capacity_4090.toml"), "--results",
                  str(results)])
    finally:
        results.chmod(0o755)
    assert rc == exitcodes.UNWRITABLE
    assert "not writable" in capsys.readouterr().err


def test_capacity_into_an_unwritable_results_path_is_one_line(tmp_path, capsys):
    """As root a chmod does not stop writes: a results path under a regular file cannot be made by anyone."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = cli(["capacity", str(REPO / "scenarios" / "gpu" / "flux_dev_capacity_4090.toml"), "--results",
              str(blocker / "results")])
    assert rc == exitcodes.UNWRITABLE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not writable" in err


# ---------------------------------------------------------------------------- 2. silent wrong results: outputs


def test_non_finite_output_is_an_error_never_ok(tmp_path, monkeypatch):
    """true_cfg_scale = 1e308 (a valid number) drives the latents to inf: the cell ran, its result is garbage."""
    import tomllib
    from dataclasses import replace

    from harness.cell.worker import run_cell
    from harness.run.runner import spec_for_child

    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path / "cache"))
    data = tomllib.loads(TINY_SCENARIO.read_text())
    for key in ("expect", "exclude", "xfail"):
        data.pop(key, None)
    data.update(name="nonfinite", cards=["native"], true_cfg_scale=1e308,
                axes={"dit_cpu_offload": [False], "dit_layerwise_offload": [False]})
    cell = expand(load_scenario(write(tmp_path, data)))[0]
    record = run_cell(replace(spec_for_child(cell, "cpu"), warmup=0, rounds=1))
    assert record.outputs and record.outputs["latents_stats"]["finite"] is False
    assert record.status == "error" and record.status.unexpected
    assert "non-finite output: latents_stats" in str(record.reason)


# ------------------------------------------------------------------------------------------- 3./4. disk full


def tiny(tmp_path: Path, name: str) -> Path:
    from tests.helpers import tiny_scenario_file

    return tiny_scenario_file(tmp_path, name, {"dit_cpu_offload": [True]})


def test_enospc_writing_cell_json_stops_the_run_with_exit_8_in_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from harness.run import runner

    monkeypatch.setenv("OFFLOAD_BENCH_PROFILE", "cpu")
    real = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == "cell.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    rc = runner.main([str(tiny(tmp_path, "enospc-spec")), "--results", str(tmp_path / "r"), "--run-id", "r"])
    assert rc == exitcodes.DISK_FULL
    err = capsys.readouterr().err
    assert "cell.json: no space left to write the cell's spec" in err and "--resume" in err


def test_a_disk_filled_mid_cell_says_so_in_the_crash_record(tmp_path):
    proc = run_runner([str(tiny(tmp_path, "enospc-mid")), "--results", str(tmp_path / "r"), "--run-id", "r"],
                      tmp_path, env={"OFFLOAD_BENCH_FAULT": "denoise:enospc", "OFFLOAD_BENCH_CACHE":
                                     str(tmp_path / "cache")})
    assert proc.returncode == exitcodes.FAILED, proc.stderr
    [rec] = read_cell_records(tmp_path / "r" / "runs" / "r" / "records.jsonl").records
    assert rec.status == "crash" and rec.failed_phase == "denoise"
    assert "the disk was full" in str(rec.reason) and "--retry-failed" in str(rec.reason)


# ------------------------------------------------------------------------------- 2./3. compare, report, files

BASELINES = Path(__file__).resolve().parent / "fixtures" / "baselines"


def test_compare_threshold_of_an_unknown_metric_is_refused_listing_the_known_ones(capsys):
    rc = cli(["compare", str(H100), "--baselines-dir", str(BASELINES), "--threshold", "nosuch_ms:+10%"])
    assert rc == exitcodes.USAGE
    err = capsys.readouterr().err
    assert "unknown metric 'nosuch_ms'" in err and "e2e_ms" in err and "load_peak_reserved_bytes" in err


@pytest.mark.parametrize(
    ("argv", "option"),
    [(["compare", "{run}", "--baselines-dir", str(BASELINES), "--markdown", "{dir}"], "--markdown"),
     (["compare", "{run}", "--baselines-dir", str(BASELINES), "--gab-json", "{dir}"], "--gab-json"),
     (["report", "{run}", "--out", "{dir}/x.md", "--no-plots"], "--out"),
     (["report", "{run}", "--html", "{dir}", "--no-plots"], "--html"),
     (["baseline", "{run}", "--out", "{dir}"], "--out"),
     (["history", "{run}", "--out", "{dir}"], "--out")],
    ids=["compare-markdown", "compare-gab-json", "report-out-md", "report-html", "baseline-out", "history-out"],
)
def test_a_folder_where_a_file_goes_is_refused_before_anything_prints(tmp_path, capsys, argv, option):
    folder = tmp_path / "out"
    (folder / "x.md").mkdir(parents=True)
    rc = cli([a.format(run=H100, dir=folder) for a in argv])
    out, err = capsys.readouterr()
    assert rc == exitcodes.USAGE, err
    assert out == "" and "PASS" not in err and err.count("\n") == 1
    assert f"error: {option} " in err and "is a folder" in err


def test_a_run_whose_records_jsonl_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / "records.jsonl").mkdir(parents=True)
    for argv in (["report", str(tmp_path / "run")], ["compare", str(tmp_path / "run")],
                 ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m")]):
        assert cli(argv) == exitcodes.USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "records.jsonl: is a folder, not a records file" in err, err


# ------------------------------------------------------------------------------------- 3./4. under pytest


def pytest_bench(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "scenarios", "-p", "no:cacheprovider", "--collect-only",
                           "-q", "--bench-profile", "cpu", "--bench-results", str(tmp_path / "results"), *args],
                          capture_output=True, text=True, cwd=REPO, env=full_env, timeout=300)


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [(["--bench-run-id", "a/b"], {}, "--bench-run-id: must be a plain folder name"),
     (["--bench-run-id", ""], {}, "--bench-run-id: expected a non-empty name"),
     (["--bench-run-id", "x" * 300], {}, "--bench-run-id: is 300 bytes long"),
     ([], {"OFFLOAD_BENCH_PROGRESS_S": "soon"}, "OFFLOAD_BENCH_PROGRESS_S='soon': expected a number of seconds")],
    ids=["run-id-slash", "run-id-empty", "run-id-overlong", "env-progress"],
)
def test_pytest_session_refuses_bad_input_in_one_usage_line(tmp_path, args, env, words):
    proc = pytest_bench(args, tmp_path, env)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error, before collection
    assert words in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def test_bench_scenario_typo_is_named_not_an_unrelated_bad_file(tmp_path):
    folder = tmp_path / "scenarios"
    folder.mkdir()
    write(folder, mutate(base_scenario(), ("name",), "good"), "good.toml")
    write(folder, mutate(base_scenario(), ("policy",), "sglang@bogus"), "broken.toml")  # an unrelated bad file
    proc = pytest_bench(["--bench-scenarios-dir", str(folder), "--bench-scenario", "godo"], tmp_path)
    assert proc.returncode == 4
    assert "--bench-scenario godo matches no scenario" in proc.stderr and "broken.toml" not in proc.stderr
    # asked for by its name, the bad file's own error is shown
    proc = pytest_bench(["--bench-scenarios-dir", str(folder), "--bench-scenario", "unit"], tmp_path)
    assert proc.returncode == 4 and "broken.toml: policy" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------- 6. round one leftovers


def test_a_second_runner_takes_the_next_unclaimed_cell_not_the_one_being_run(tmp_path, monkeypatch):
    """Two runners on one run id used to move in lock-step: the second waited on the first's cell. Now it runs the
    next cell nobody holds and comes back to the held one (recorded by then: not rerun)."""
    import fcntl
    import threading
    import time

    from harness.common.records import append_record
    from harness.run import runner
    from tests.helpers import tiny_scenario_file

    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path / "cache"))
    path = tiny_scenario_file(tmp_path, "lockstep", {"dit_cpu_offload": [True], "dit_layerwise_offload": [False, True]})
    first, second = expand(load_scenario(path))
    run = runner.Run.create(tmp_path / "results", "cpu", "l", verbose=False)
    lock = os.open(runner._cell_dir(run, first) / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # "the other runner" is running the first cell
    done: list[dict] = []
    t = threading.Thread(target=lambda: done.append(runner._run_all(run, [first, second], None)))
    t.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and second.cell_id not in run.finished():
            time.sleep(0.2)
        assert second.cell_id in run.finished() and first.cell_id not in run.finished()
        append_record(run.records_path, {"schema_version": 2, "cell_id": first.cell_id, "status": "ok",
                                         "spec_hash": first.spec_hash("cpu"), "by": "the other runner"})
    finally:
        os.close(lock)
    t.join(60)
    assert done and done[0][first.cell_id].extra["by"] == "the other runner"
    assert done[0][second.cell_id].status == "ok"
    assert len(read_cell_records(run.records_path).records) == 2  # nothing run twice


def test_runner_exits_all_skipped_when_every_cell_was_skipped(tmp_path):
    gpu = REPO / "scenarios" / "gpu" / "flux_tiny_cuda.toml"  # a GPU-profile scenario on the CPU profile
    proc = run_runner([str(gpu), "--results", str(tmp_path / "r"), "--run-id", "s", "--quiet"], tmp_path)
    assert proc.returncode == exitcodes.ALL_SKIPPED == 5, proc.stdout + proc.stderr
    assert "every cell was skipped, nothing measured" in proc.stderr


# ------------------------------------------------------------------------------------------- 5. gate noise


@pytest.mark.parametrize(("planned_mib", "measured_mib", "passes"),
                         [(142, 132, True), (142, 110, True), (600, 540, False), (142, 190, False)],
                         ids=["10MiB-7pct", "32MiB-floor", "60MiB-10pct", "48MiB-34pct"])
def test_plan_within_peak_has_an_absolute_floor(monkeypatch, planned_mib, measured_mib, passes):
    """Qwen-Image on the 4090 cap: load 132 MiB against 142 planned (-7 %, 10 MiB) failed peak = 0.05."""
    import dataclasses

    import harness.plan.planner as planner
    from harness.analyze.expect import PLAN_PEAK_FLOOR_BYTES, plan_within_verdict
    from harness.common.contract import as_record

    assert PLAN_PEAK_FLOOR_BYTES == planner.WARM_KERNELS_BYTES == 32 * 2**20
    rec = next(json.loads(line) for line in (REPO / "results" / "h100" / "qwen-image-edit-5090-s2.records.jsonl")
               .read_text().splitlines() if json.loads(line)["status"] == "ok")
    real = planner.check_record(planned_record(rec))
    planned, measured = planned_mib * 2**20, measured_mib * 2**20
    fake = dataclasses.replace(real, predicted_load=planned, measured_load=measured)  # load_error derives
    monkeypatch.setattr(planner, "check_record", lambda record: fake)
    verdict = plan_within_verdict("rtx4090-24g", [as_record(rec)], {"peak": 0.05, "time": 0.10})
    assert verdict.passed is passes, verdict.message
    if not passes:
        assert "load peak" in verdict.message and "> 32 MiB" in verdict.message


# ------------------------------------------------------------------------------------ own cases (round two)


def test_one_file_given_twice_to_the_runner_is_one_scenario(tmp_path, monkeypatch):
    from harness.run import runner

    monkeypatch.chdir(TINY_SCENARIO.parent)
    scenarios = runner._load_scenarios([Path(TINY_SCENARIO.name), TINY_SCENARIO], None)
    assert [s.name for s in scenarios] == ["qwen-image-edit-tiny"]


def test_capacity_refuses_an_empty_run_id_naming_the_option(tmp_path, capsys):
    rc = cli(["capacity", str(REPO / "scenarios" / "gpu" / "flux_dev_capacity_4090.toml"), "--run-id", "",
              "--results", str(tmp_path / "r")])
    assert rc == exitcodes.USAGE
    assert capsys.readouterr().err == "error: --run-id: expected a non-empty name, got ''\n"
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())
