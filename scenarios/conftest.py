"""pytest glue: every scenario file under scenarios/ becomes one test per cell plus one set-level test per card.

`pytest scenarios` (what `make bench` runs) picks the profile from the machine: the GPU scenarios where NVML
sees a GPU, the CPU profile (tiny models, simulated cards) otherwise, and says which in the header. Cells of the
other profile are skipped with the reason. Records go to <results>/runs/<run id>/records.jsonl as each cell ends.

Several GPUs (pytest-xdist): `pytest scenarios -n auto` (or `-n N`, N at most the visible GPUs) runs one worker per
GPU; worker gw<k> starts its cell children with CUDA_VISIBLE_DEVICES=<k-th visible GPU> (`harness.run.gpus`). All
workers share one run id and append to one records.jsonl; cells are handed out longest first, and a card's
set-level test runs after its cells (a cell still running on another worker is waited for through the runner's
per-cell lock, one missing is run there, so no cell runs twice).

Several machines: `--shard I/N` keeps the cards of the I-th of N cost-balanced shares (harness/run/shard.py, the same
share the runner's --shard picks) and deselects the rest; `--tier pr` keeps the scenarios whose file says
tier = "pr". `python -m harness merge` joins the shards' run folders afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from harness.common import exitcodes
from harness.common.contract import CellRecord
from harness.common.inputs import InputError, check_environment, check_name
from harness.common.records import DiskFullError, UnwritableError, ensure_writable, latest_by_cell, read_cell_records
from harness.plan.scenario import Cell, ReleaseNotInstalled, Scenario, ScenarioError, expand, in_tier, load_all
from harness.pytest_options import add_options
from harness.run.gpus import cell_cost, child_env, gpu_for_worker, longest_first, nvml_count, visible_gpus
from harness.run.runner import Run, detect_device, eta_text, new_run_id, run_cell
from harness.run.shard import Shard, ShardError, assign_cards, card_key, parse_shard

HERE = Path(__file__).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)  # a no-op under the checkout's root conftest.py, which registered them first


def _shard(config: pytest.Config) -> Shard | None:
    text = config.getoption("bench_shard")
    if text is None:
        return None
    try:
        return parse_shard(text)
    except ShardError as e:
        raise pytest.UsageError(f"offload-bench: {e}") from None


def _profile(config: pytest.Config) -> str:
    chosen = config.getoption("--bench-profile")
    if chosen == "auto":
        return "gpu" if detect_device() == "cuda" else "cpu"
    return chosen


def _scenarios(config: pytest.Config) -> list[Scenario]:
    cached = getattr(config, "_offload_bench_scenarios", None)
    if cached is None:
        cached = config._offload_bench_scenarios = _load_scenarios(config)  # type: ignore[attr-defined]
    return cached


def _load_scenarios(config: pytest.Config) -> list[Scenario]:
    """The selected scenarios. A bad scenario file is one usage line naming file and field (not a pluggy
    traceback), and a --bench-scenario name that matches nothing lists the names there are (it used to be an
    INTERNALERROR from an empty parametrization)."""
    folder = Path(config.getoption("--bench-scenarios-dir") or HERE)
    if not folder.is_dir():
        raise pytest.UsageError(f"offload-bench: --bench-scenarios-dir {folder}: no such folder")
    try:
        scenarios, errors = load_all(folder)
    except ScenarioError as e:
        raise pytest.UsageError(f"offload-bench: {e}") from None
    wanted = config.getoption("--bench-scenario")
    # A scenario whose SGLang release is missing is skipped with one line, unless it is asked for by name.
    missing = [e for e in errors if isinstance(e, ReleaseNotInstalled)]
    for e in missing:
        if e.name in wanted:
            raise pytest.UsageError(f"offload-bench: --bench-scenario {e.line()}")
    errors = [e for e in errors if not isinstance(e, ReleaseNotInstalled)]
    config._offload_bench_unavailable = [e.line() for e in missing]  # type: ignore[attr-defined]
    names = sorted([s.name for s in scenarios] + [e.name for e in missing])
    unknown = [w for w in wanted if w not in names]
    # A bad file may be the one asked for (its error, not "unknown"): the one whose `name` is the name asked for.
    # A name no file has is the typo it is, not the first unrelated file's error (issue #30).
    asked_bad = [e for e in errors if getattr(e, "scenario_name", None) in unknown]
    if asked_bad or (errors and not wanted):
        raise pytest.UsageError(f"offload-bench: {(asked_bad or errors)[0]}")
    for e in errors:  # every scenario asked for by name loaded: an unrelated bad file does not block them
        config.issue_config_time_warning(pytest.PytestConfigWarning(f"offload-bench: skipping {e}"), stacklevel=2)
    if unknown:
        raise pytest.UsageError(
            f"offload-bench: --bench-scenario {', '.join(unknown)} matches no scenario; the scenarios are: "
            f"{', '.join(names)}"
        )
    chosen = [s for s in scenarios if not wanted or s.name in wanted]
    tier = config.getoption("bench_tier")
    in_it = [s for s in chosen if in_tier(s, tier)]
    if not in_it:
        raise pytest.UsageError(f"offload-bench: --tier {tier}: none of the selected scenarios is of that tier "
                                f"({', '.join(s.name for s in chosen)})")
    return in_it


def _xdist_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers this (controller) session starts: 0 without xdist."""
    if config.getoption("dist", "no") == "no":
        return 0
    count = 0
    for spec in config.getoption("tx", None) or []:
        head, star, _ = str(spec).partition("*")
        count += int(head) if star and head.isdigit() else 1
    return count


def _worker_id(config: pytest.Config) -> str | None:
    """This process's pytest-xdist worker id (its PYTEST_XDIST_WORKER), or None in the controller / without xdist."""
    workerinput = getattr(config, "workerinput", None)
    return workerinput.get("workerid") if workerinput else None


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's, which reads --benchmark-json as it starts
def pytest_configure(config: pytest.Config) -> None:
    """Refuses an unwritable --bench-results before any cell runs (one line naming it, pytest's usage exit 4).
    Controller of an xdist run: refuses more workers than GPUs on the GPU profile, and picks the one run id that
    every worker appends to."""
    try:
        ensure_writable(Path(config.getoption("--bench-results")) / "runs", create=False)  # --collect-only: no folder
    except UnwritableError as e:
        raise pytest.UsageError(f"offload-bench: --bench-results: {e}") from None
    try:  # before any child: a bad OFFLOAD_BENCH_* or run id would fail every test, one by one
        check_environment()
        if config.getoption("--bench-run-id") is not None:
            check_name(config.getoption("--bench-run-id"), "run id", "--bench-run-id")
    except InputError as e:
        raise pytest.UsageError(f"offload-bench: {e}") from None
    _scenarios(config)  # scenario problems are usage errors before collection
    _shard(config)  # and so is a bad --shard
    if _worker_id(config) is not None:
        return
    # One run id for the session, chosen here: xdist workers get it (pytest_configure_node), and pytest-benchmark's
    # JSON goes into that run's folder (results/runs/<id>/), not into the results tree beside the runs.
    run_id = config.getoption("--bench-run-id")
    config._offload_bench_run_id = new_run_id() if run_id is None else run_id  # type: ignore[attr-defined]
    _benchmark_json_in_run_folder(config)
    workers = _xdist_workers(config)
    if not workers:
        return
    if _profile(config) == "gpu":
        gpus = visible_gpus(os.environ, nvml_count())
        if workers > len(gpus):
            raise pytest.UsageError(
                f"offload-bench: -n {workers} asks for more pytest-xdist workers than visible GPUs ({len(gpus)}: "
                f"{', '.join(gpus) or 'none'}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
                "Each worker owns one GPU: use -n auto or -n <= the number of GPUs."
            )


def _benchmark_json_in_run_folder(config: pytest.Config) -> None:
    """Without --benchmark-json, pytest-benchmark's JSON (the measured rounds fed by test_cell) is written to
    <results>/runs/<run id>/pytest-benchmark.json beside the records, so a bench run leaves nothing outside the
    ignored runs/ folder. Nothing under --collect-only, without pytest-benchmark, or under xdist (which turns
    pytest-benchmark off)."""
    option = config.option
    if option.collectonly or not hasattr(option, "benchmark_json") or option.benchmark_json is not None:
        return
    if _xdist_workers(config) or getattr(option, "benchmark_disable", False) or getattr(option, "benchmark_skip", 0):
        return
    run_id: str = config._offload_bench_run_id  # type: ignore[attr-defined]
    run_dir = Path(config.getoption("--bench-results")) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    option.benchmark_json = _benchmark_json_value(run_dir / "pytest-benchmark.json")


def _benchmark_json_value(path: Path) -> Any:
    """What this pytest-benchmark takes for --benchmark-json: a path from 5.3 on (it opens the file itself), an open
    binary file before (its option was argparse.FileType("wb"), and it writes and closes what it is given). Handing
    5.3 the open file ended `make bench` in a TypeError from its pytest_sessionfinish, after every cell had run."""
    from pytest_benchmark import __version__

    major, minor = (int(part) for part in __version__.split(".")[:2])
    return path if (major, minor) >= (5, 3) else open(path, "wb")  # pytest-benchmark closes it


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run's verdicts, judged once every cell and card has run and written beside its records
    (`harness.analyze.readout.finish_run`): by the one process of a plain session, by the controller of an xdist
    one; nothing under --collect-only or where no cell ran."""
    config = session.config
    run_id = getattr(config, "_offload_bench_run_id", None)
    if _worker_id(config) is not None or config.option.collectonly or run_id is None:
        return
    from harness.analyze.readout import finish_run

    finish_run(Path(config.getoption("--bench-results")) / "runs" / run_id / "records.jsonl")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` on the GPU profile: one worker per visible GPU (the CPU profile keeps xdist's CPU count)."""
    if _profile(config) != "gpu":
        return None
    return len(visible_gpus(os.environ, nvml_count())) or None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Every worker gets the controller's run id, so that all of them append to one records.jsonl."""
    node.workerinput["offload_bench_run_id"] = getattr(node.config, "_offload_bench_run_id", None)


def pytest_report_header(config: pytest.Config) -> list[str]:
    profile = _profile(config)
    lines = []
    workers = _xdist_workers(config)
    if workers:
        run_id = getattr(config, "_offload_bench_run_id", None)
        if profile == "gpu":
            gpus = visible_gpus(os.environ, nvml_count())
            where = ", ".join(f"gw{k} -> GPU {g}" for k, g in enumerate(gpus[:workers]))
        else:
            where = "CPU profile, no GPU assignment"
        lines.append(f"offload-bench: {workers} pytest-xdist workers ({where}); run {run_id}, records -> "
                     f"{Path(config.getoption('--bench-results')) / 'runs' / str(run_id) / 'records.jsonl'}")
    if profile == "cpu":
        return [
            "offload-bench: no CUDA GPU selected: running the CPU profile (tiny models, simulated cards, "
            "device memory = harness ledger of weight bytes). GPU scenarios are skipped.",
            *lines,
        ]
    return ["offload-bench: GPU profile (real models, synthetic checkpoints, CUDA allocator + NVML counters)", *lines]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    profile = _profile(config)
    scenarios = _scenarios(config)

    def marks(s: Scenario) -> list[Any]:
        m: list[Any] = [pytest.mark.gpu] if s.profile == "gpu" else []
        if s.profile != profile:
            why = "no CUDA GPU (CPU profile)" if s.profile == "gpu" else "the GPU profile runs instead"
            m.append(pytest.mark.skip(reason=f"{s.name}: {why}"))
        elif s.capacity is not None:
            m.append(pytest.mark.skip(reason=f"{s.name}: a capacity search: python -m harness capacity {s.path}"))
        return m

    if "cell" in metafunc.fixturenames:
        params = [pytest.param(c, id=c.cell_id, marks=marks(s)) for s in scenarios for c in expand(s)]
        metafunc.parametrize("cell", params)
    if "scenario_card" in metafunc.fixturenames:
        params = []
        for s in scenarios:
            m = marks(s)
            if s.xfail:
                m.append(pytest.mark.xfail(reason=s.xfail, strict=True))
            params += [pytest.param((s, card.name), id=f"{s.name}/{card.name}", marks=m) for card in s.cards]
        metafunc.parametrize("scenario_card", params)


MACHINE: dict[str, Any] = {}


def _param(item: pytest.Item, name: str) -> Any:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(name) if callspec is not None else None


def _recorded(config: pytest.Config) -> set[str]:
    """Cell ids with a complete record of their current spec in the --bench-run-id run (none without one)."""
    run_id = config.getoption("--bench-run-id")
    path = Path(config.getoption("--bench-results")) / "runs" / str(run_id) / "records.jsonl"
    if not run_id or not path.is_file():
        return set()
    device = "cuda" if _profile(config) == "gpu" else "cpu"
    hashes = {c.cell_id: c.spec_hash(device) for s in _scenarios(config) for c in expand(s)}
    return {r.cell_id for r in read_cell_records(path).records if hashes.get(r.cell_id) == r.spec_hash}


def _deselect_partial_sets(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A card's set-level test runs every cell of the card that has no record yet. When -k/-m deselected some of
    them, running it would run those cells anyway: it is deselected with them (unless each such cell is already
    recorded in the --bench-run-id run, when the set test only reads records), and the summary says so."""
    selected = {c.cell_id for i in items if isinstance(c := _param(i, "cell"), Cell)}
    recorded: set[str] | None = None
    dropped: list[pytest.Item] = []
    for item in items:
        pair = _param(item, "scenario_card")
        if not isinstance(pair, tuple):
            continue
        scenario, card = pair
        left_out = [c.cell_id for c in expand(scenario) if c.card.name == card and c.cell_id not in selected]
        if not left_out:
            continue
        recorded = _recorded(config) if recorded is None else recorded
        if any(cid not in recorded for cid in left_out):
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]
        config._offload_bench_partial_sets = [i.name for i in dropped]  # type: ignore[attr-defined]


def _deselect_other_shards(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--shard i/N: the cells and set-level tests of the cards of the other shards are deselected (whole cards, so
    a set-level test never runs another shard's cells; harness/run/shard.py)."""
    shard = _shard(config)
    if shard is None:
        return
    device = "cuda" if _profile(config) == "gpu" else "cpu"
    all_cells = [c for s in _scenarios(config) for c in expand(s)]
    mine = assign_cards(all_cells, shard.count, device)[shard.index - 1]

    def key(item: pytest.Item) -> str | None:
        cell, pair = _param(item, "cell"), _param(item, "scenario_card")
        if isinstance(cell, Cell):
            return card_key(cell)
        return f"{pair[0].name}/{pair[1]}" if isinstance(pair, tuple) else None

    dropped = [i for i in items if (k := key(i)) is not None and k not in mine]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]
    config._offload_bench_shard_line = (  # type: ignore[attr-defined]
        f"offload-bench: shard {shard}: {len(mine)} cards ({', '.join(sorted(mine)) or 'none'})")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in getattr(config, "_offload_bench_unavailable", []):
        terminalreporter.write_line(f"offload-bench: skipped {line}")
    shard_line = getattr(config, "_offload_bench_shard_line", None)
    if shard_line:
        terminalreporter.write_line(shard_line)
    dropped = getattr(config, "_offload_bench_partial_sets", None)
    if dropped:
        terminalreporter.write_line(
            f"offload-bench: {len(dropped)} set-level tests deselected because -k/-m left out cells of their card "
            f"(they would have run them): {', '.join(dropped)}"
        )


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so the set-level check sees what is selected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Set-level tests whose card lost cells to -k/-m are deselected with them (`_deselect_partial_sets`). Then
    longest cells first (`harness.run.gpus.cell_cost`), then every set-level test after all cells (costliest
    scenario first), then what this profile skips. Deterministic, so every xdist worker collects the same order,
    and xdist's load schedulers (`--dist load`, the default with -n, or `loadgroup`) hand out the costliest cells
    first."""
    _deselect_other_shards(config, items)
    _deselect_partial_sets(config, items)
    cells = [i for i in items if isinstance(_param(i, "cell"), Cell)]
    sets = [i for i in items if _param(i, "scenario_card") is not None]
    placed = {id(i) for i in cells + sets}
    cells = longest_first(cells, lambda i: cell_cost(_param(i, "cell")))
    sets = longest_first(sets, lambda i: cell_cost(expand(_param(i, "scenario_card")[0])[0]))
    ordered = cells + sets + [i for i in items if id(i) not in placed]
    items[:] = [i for i in ordered if not i.get_closest_marker("skip")] + [
        i for i in ordered if i.get_closest_marker("skip")
    ]
    runnable = [i for i in cells if not i.get_closest_marker("skip")]
    config._offload_bench_cells = len(runnable)  # type: ignore[attr-defined]
    # the run's ETA: what is left of the cost hints of the cells that run a child (copies take no time)
    config._offload_bench_cost = sum(  # type: ignore[attr-defined]
        cell_cost(c) for i in runnable if (c := _param(i, "cell")).same_as is None)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """pytest-benchmark's machine info knows no GPU: add the child's (name, memory, driver, CUDA, torch, PCIe)."""
    keys = ("gpu", "gpu_memory_bytes", "sku", "driver", "cuda", "torch", "diffusers", "pcie_gen", "pcie_width",
            "pinned_h2d_gbps", "allocator_conf")
    machine_info["offload_bench"] = {k: MACHINE.get(k) for k in keys}


class Records:
    """The session's run: runs a cell on first request, then serves its record."""

    def __init__(self, run: Run, total: int = 0, env: dict[str, str] | None = None, total_cost: float = 0) -> None:
        self.run = run
        self.count = 0
        self.total = total
        self.cost_left = total_cost
        self.env = env  # on top of os.environ for every cell child (an xdist worker's CUDA_VISIBLE_DEVICES)
        self.started = time.monotonic()

    def get(self, cell: Cell) -> CellRecord:
        if cell.same_as is not None and cell.same_as not in self.run.finished():
            source = next(c for c in expand(cell.scenario) if c.cell_id == cell.same_as)
            self.get(source)
        known = self.run.recorded(cell)
        if known is not None:
            return known
        self.count += 1
        left = max(self.total - self.count, 0)
        eta = eta_text(self.run.pace.estimate_s(self.cost_left))
        label = f"[cell {self.count}/{self.total}, {left} left, {time.monotonic() - self.started:.0f} s, run {eta}]"
        if cell.same_as is None:
            self.cost_left = max(self.cost_left - cell_cost(cell), 0)
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker:  # the other workers run the rest: no count of what is left here
            label = f"[{worker} cell {self.count}, {time.monotonic() - self.started:.0f} s]"
        try:
            record = run_cell(self.run, cell, label, env=self.env)
        except DiskFullError as e:
            # every later cell would fail the same way: stop the session with the runner's code and one line
            pytest.exit(f"offload-bench: {e}", returncode=exitcodes.DISK_FULL)
        if record.machine and not MACHINE:
            MACHINE.update(record.machine)
        return record

    def group(self, scenario: Scenario, card: str) -> list[CellRecord]:
        # Under xdist a cell may be running on another worker: run_cell waits on its per-cell lock and then takes
        # that worker's record; a cell no worker has started yet runs here, on this worker's GPU.
        for cell in expand(scenario):
            if cell.card.name == card:
                self.get(cell)
        recs = latest_by_cell(read_cell_records(self.run.records_path).records).values()
        return [r for r in recs if r.scenario == scenario.name and r.card_name == card]


def worker_child_env(worker_id: str | None, device: str, env: Mapping[str, str]) -> dict[str, str]:
    """What this worker's cell children get on top of `env`: under xdist on the GPU profile, the worker's own GPU
    as CUDA_VISIBLE_DEVICES (`harness.run.gpus.child_env`); nothing without xdist or on the CPU profile."""
    if worker_id is None or device != "cuda":
        return {}
    return child_env(gpu_for_worker(worker_id, visible_gpus(env, nvml_count())), env)


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest) -> Iterator[Records]:
    config = request.config
    device = "cuda" if _profile(config) == "gpu" else "cpu"
    worker = _worker_id(config)
    run_id = (getattr(config, "workerinput", None) or {}).get("offload_bench_run_id")
    run_id = run_id or getattr(config, "_offload_bench_run_id", None) or config.getoption("--bench-run-id")
    run = Run.create(Path(config.getoption("--bench-results")), device, run_id)
    run.shard = _shard(config)
    env = worker_child_env(worker, device, os.environ)
    where = f" ({worker}: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})" if env else ""
    if worker is None:  # an xdist worker's terminal is not shown: its lines stay in the captured output
        run.sink = live_lines(config)
    (run.sink or print)(f"offload-bench: records -> {run.records_path}{where}")
    yield Records(run, getattr(config, "_offload_bench_cells", 0), env or None,
                  getattr(config, "_offload_bench_cost", 0))
    run.close()  # the session's fork server (harness.run.cell_start) ends with it


def live_lines(config: pytest.Config) -> Callable[[str], None] | None:
    """Writes a line through pytest's terminal writer with capture suspended for it (as pytest's live logging
    does), so progress shows while a cell runs instead of after its test; None without a terminal reporter."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return None

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(line)

    return write
