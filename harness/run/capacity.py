"""Capacity: how large an image or video a flag combination can still produce on a card, found on the device.

A scenario with a `[capacity]` table (axis "frames" or "resolution", min, max, step) is not run by pytest; instead

    python -m harness capacity scenarios/gpu/wan21_14b_capacity.toml [--model M] [--results results] [--run-id ID]

searches, per card and combination, the largest value of the axis that completes, with OOM as the oracle: each
probe is a normal isolated cell (its own child and record in the run's records.jsonl, id
`<scenario>@<axis>-<value>/<card>/<flags>`, so `--run-id` resumes a search without repeating probes). The
search starts at the plan's capacity (`harness.plan.planner`), then steps outward by doubling until the fate flips,
then bisects: two probes when the plan is right. Beside the plan's largest value the table gives its largest with
`advise`'s safety margin of the card left: a cap the weights nearly fill makes the first a hairline (FLUX.1-dev
with the DiT CPU-offloaded whole on the 4090 cap: planned 1280, completed 1024, none within the margin). A probe
that ends neither ok nor oom (error, crash, timeout, skipped) stops its combination's search, which is reported as
undecided with that probe's fate. The result, next to the plan's prediction, goes to `capacity.md` and
`capacity.json` in the run folder; `--from-records RECORDS` prints the table of a search that ran, with today's
plans, without running a probe. `--model M` (a zoo name or a diffusers pipeline folder) searches the scenario on
that model: the run folder keeps the scenario with the model replaced (`scenario-<file name>`), which its probes
record as theirs.

This module imports no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness.common import exitcodes
from harness.common.contract import PROBE_MARK, CellRecord
from harness.common.inputs import InputError, check_environment, check_name
from harness.common.records import UnwritableError, ensure_writable, latest_by_cell, read_cell_records
from harness.plan.advise import DEFAULT_MARGIN
from harness.plan.planner import Workload, plan
from harness.plan.scenario import (
    HARNESS_BACKEND,
    CapacitySpec,
    Cell,
    Scenario,
    ScenarioError,
    expand,
    load_scenario,
    with_model,
)


@dataclass(frozen=True)
class Probe:
    value: int
    status: str
    cell_id: str


@dataclass(frozen=True)
class SearchResult:
    largest_ok: int | None  # None: not even the smallest value completed
    smallest_oom: int | None  # None: the largest value completed
    probes: tuple[Probe, ...]
    undecided: str | None = None  # why the search stopped early (a probe's fate other than ok / oom)


def search(values: list[int], probe: Callable[[int], Probe], start: int | None = None) -> SearchResult:
    """The boundary between values that complete and values that run out of memory (assumed monotone: a larger
    value needs more memory), starting at `start` (the plan's answer; else the middle) and probing outward by
    doubling steps until the fate flips, then bisecting."""
    ok_i, oom_i = -1, len(values)  # values[ok_i] completed, values[oom_i] ran out of memory (sentinels outside)
    probes: list[Probe] = []

    def run(i: int) -> bool | None:
        p = probe(values[i])
        probes.append(p)
        if p.status not in ("ok", "oom"):
            return None
        return p.status == "ok"

    i = len(values) // 2 if start is None else max((k for k, v in enumerate(values) if v <= start), default=0)
    step = 1
    while True:
        fits = run(i)
        if fits is None:
            return _result(values, ok_i, oom_i, probes, f"{probes[-1].cell_id} ended {probes[-1].status}")
        if fits:
            ok_i = i
        else:
            oom_i = i
        if oom_i - ok_i <= 1:
            return _result(values, ok_i, oom_i, probes)
        if ok_i >= 0 and oom_i < len(values):  # bracketed: bisect
            i = (ok_i + oom_i) // 2
        elif fits:  # still climbing: double the stride
            i = min(len(values) - 1, i + step)
            step *= 2
        else:
            i = max(0, i - step)
            step *= 2


def _result(values: list[int], ok_i: int, oom_i: int, probes: list[Probe], why: str | None = None) -> SearchResult:
    return SearchResult(values[ok_i] if ok_i >= 0 else None, values[oom_i] if oom_i < len(values) else None,
                        tuple(probes), why)


def probe_scenario(scenario: Scenario, value: int) -> Scenario:
    """The scenario of one probe: the axis set to `value` (a resolution probe keeps the aspect ratio, the width
    rounded to the model's pixel grid), under a name of its own so its cells have ids of their own."""
    cap = scenario.capacity
    assert cap is not None
    if cap.axis == "frames":
        return replace(scenario, name=f"{scenario.name}{PROBE_MARK}frames-{value}", frames=value)
    from harness.models import get_model

    spec = get_model(scenario.model)
    grid = spec.vae_scale * spec.patch
    width = max(grid, round(value * scenario.width / scenario.height / grid) * grid)
    return replace(scenario, name=f"{scenario.name}{PROBE_MARK}resolution-{value}", height=value, width=width)


def probe_cell(cell: Cell, value: int) -> Cell:
    return replace(cell, scenario=probe_scenario(cell.scenario, value), same_as=None)


def planned_capacity(cell: Cell, values: list[int], margin: float = 0.0) -> int | None:
    """The largest value whose plan fits the cell's card with `margin` of the card's memory left over, checked as
    `advise` checks it (planned at the full cap, then peak device bytes <= cap x (1 - margin)); None: none does, or
    the planner does not model the cell's backend."""
    if cell.backend != HARNESS_BACKEND:
        return None
    cap = cell.card.cap_bytes
    best = None
    lo, hi = 0, len(values) - 1
    while lo <= hi:  # the plan's need grows with the axis: bisect
        mid = (lo + hi) // 2
        s = probe_scenario(cell.scenario, values[mid])
        w = Workload(s.height, s.width, s.frames, s.true_cfg_scale, s.steps, cell.cfg_batch,
                     s.run.empty_cache_between_phases)
        p = plan(s.model, cell.resolution.effective, cap, w, card=cell.card.name)
        if p.fits and (cap is None or p.peak_device_bytes <= cap * (1 - margin)):
            best, lo = values[mid], mid + 1
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class CapacityRow:
    cell: str  # the combination's cell id at the scenario's own size
    card: str
    flags: str
    axis: str
    planned: int | None
    planned_within_margin: int | None  # the plan's largest with advise's margin (DEFAULT_MARGIN) of the card left
    largest_ok: int | None
    smallest_oom: int | None
    probes: tuple[Probe, ...]
    undecided: str | None


def run_capacity(scenario: Scenario, probe_fn: Callable[[Cell], CellRecord]) -> list[CapacityRow]:
    """Searches every combination of `scenario` (cells that duplicate another are searched once); `probe_fn`
    runs one probe cell and returns its record (`harness.run.runner.run_cell` on the device)."""
    values = _capacity(scenario).values()
    rows = []
    for cell in _combinations(scenario):

        def probe(value: int, cell: Cell = cell) -> Probe:
            pc = probe_cell(cell, value)
            record = probe_fn(pc)
            return Probe(value, str(record.status), pc.cell_id)

        rows.append(_row(scenario, cell, search(values, probe, planned_capacity(cell, values))))
    return rows


def rows_from_records(scenario: Scenario, records: list[CellRecord]) -> list[CapacityRow]:
    """The table of a search that already ran, from its probes' records (latest per cell) and today's plans: no
    probe runs. A combination's largest completed value and first OOM above it are read off its probes."""
    values = _capacity(scenario).values()
    status = {cid: str(r.status) for cid, r in latest_by_cell(records).items()}
    rows = []
    for cell in _combinations(scenario):
        ids = {probe_cell(cell, v).cell_id: v for v in values}
        probes = tuple(Probe(ids[cid], st, cid) for cid, st in status.items() if cid in ids)
        ok = [p.value for p in probes if p.status == "ok"]
        largest = max(ok) if ok else None
        above = [p.value for p in probes if p.status == "oom" and (largest is None or p.value > largest)]
        other = [p for p in probes if p.status not in ("ok", "oom")]
        rows.append(_row(scenario, cell, SearchResult(largest, min(above) if above else None, probes,
                                                      f"{other[0].cell_id} ended {other[0].status}" if other
                                                      else None)))
    return rows


def _capacity(scenario: Scenario) -> CapacitySpec:
    if scenario.capacity is None:
        raise ScenarioError(f"{scenario.path}: no [capacity] table: not a capacity scenario")
    return scenario.capacity


def _combinations(scenario: Scenario) -> list[Cell]:
    """The scenario's cells at its own size, one per combination (a cell that duplicates another is left out)."""
    return [cell for cell in expand(scenario) if cell.same_as is None]


def _row(scenario: Scenario, cell: Cell, found: SearchResult) -> CapacityRow:
    """A combination's row: its plans (plain and within advise's margin) beside what the probes found."""
    cap = _capacity(scenario)
    values = cap.values()
    return CapacityRow(cell.cell_id, cell.card.name, cell.resolution.effective.label(), cap.axis,
                       planned_capacity(cell, values), planned_capacity(cell, values, DEFAULT_MARGIN),
                       found.largest_ok, found.smallest_oom, found.probes, found.undecided)


def render(rows: list[CapacityRow], title: str) -> str:
    from tabulate import tabulate

    table = [{
        "card": r.card,
        "flags (effective)": r.flags,
        f"planned max {r.axis}": "none fits" if r.planned is None else r.planned,
        f"planned within the {DEFAULT_MARGIN:.0%} margin": "none" if r.planned_within_margin is None
        else r.planned_within_margin,
        f"measured max {r.axis}": "none completed" if r.largest_ok is None else r.largest_ok,
        "first OOM": r.smallest_oom if r.smallest_oom is not None else "none up to max",
        "plan error": "" if None in (r.planned, r.largest_ok) else f"{r.planned - r.largest_ok:+d}",
        "probes": ", ".join(f"{p.value}:{p.status}" for p in r.probes),
        "note": r.undecided or "",
    } for r in rows]
    return f"# {title}\n\n" + tabulate(table, headers="keys", tablefmt="github") + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", type=Path, help="a scenario file with a [capacity] table")
    parser.add_argument("--model", help="search on this model instead of the scenario's: a zoo name or a diffusers "
                        "pipeline folder (the run folder keeps the scenario with it, as scenario-<file name>)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--run-id", help="run id (a folder under RESULTS/runs); an existing run keeps its probes")
    parser.add_argument("--from-records", type=Path, metavar="RECORDS",
                        help="run no probe: print the table of the search in this records.jsonl with today's plans")
    return parser.parse_args(argv)


def _load(path: Path, model: str | None, folder: Path) -> Scenario:
    """The capacity scenario, on `model` when given (its copy written in `folder`)."""
    if model is not None:
        path = with_model(path, model, folder / f"scenario-{path.name}")
    scenario = load_scenario(path)
    if scenario.capacity is None:
        raise ScenarioError(f"{path}: no [capacity] table: not a capacity scenario")
    return scenario


def _from_records(args: argparse.Namespace) -> int:
    if not args.from_records.is_file():
        print(f"error: {args.from_records}: no such records file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        scenario = _load(args.scenario, args.model, Path(tmp))
    rows = rows_from_records(scenario, read_cell_records(args.from_records).records)
    if not any(r.probes for r in rows):
        print(f"error: {args.from_records}: no probe of {scenario.name} in it (probe cell ids start "
              f"'{scenario.name}{PROBE_MARK}')", file=sys.stderr)
        return 2
    assert scenario.capacity is not None
    print(render(rows, f"capacity: {scenario.name} ({scenario.capacity.axis}), from {args.from_records.name}"), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    from harness.run.runner import Run, detect_device, run_cell

    args = _parse(argv)
    try:
        if args.from_records:
            return _from_records(args)
        with tempfile.TemporaryDirectory() as tmp:
            scenario = _load(args.scenario, args.model, Path(tmp))  # a bad file: one line, before any run folder
        check_environment()  # before any probe: a bad OFFLOAD_BENCH_* would fail every child, one by one
        if args.run_id is not None:
            check_name(args.run_id, "run id", "--run-id")
        ensure_writable(args.results / "runs")  # a read-only results folder: one line, before any probe
        run = Run.create(args.results, detect_device(), args.run_id)
        if args.model is not None:
            scenario = _load(args.scenario, args.model, run.run_dir)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UnwritableError as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.UNWRITABLE
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.USAGE
    assert scenario.capacity is not None
    rows = run_capacity(scenario, lambda cell: run_cell(run, cell, label="[capacity]"))
    text = render(rows, f"capacity: {scenario.name} ({scenario.capacity.axis}), run {run.run_id}")
    (run.run_dir / "capacity.md").write_text(text)
    (run.run_dir / "capacity.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    print(text, end="")
    print(f"wrote {run.run_dir / 'capacity.md'} and capacity.json", file=sys.stderr)
    return 0
