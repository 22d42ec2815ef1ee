"""A run as the analysis reads it (`readout`): the latest record of each cell, each with its plan, and the verdicts
of the run's scenario expectations.

The one place where what an older records file lacks is filled in on read, so that the report, the HTML page and
the summary render what they are given and compute none of it: the plan of a record written before the runner
stored plans, or whose planning failed when it ran, is derived here once (`harness.plan.planner.plan_on_read`; the
report's plan column says "derived"), and the verdicts are the ones the run's end wrote beside its records
(`finish_run`), or, for a records file without them (the committed ones), judged here once
(`harness.analyze.expect.verdicts_of`). Nothing is written back: the records file stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.analyze.expect import ScenarioVerdicts, verdicts_of, write_verdicts
from harness.common.contract import CellRecord
from harness.common.records import latest_by_cell, read_cell_records
from harness.plan.planner import plan_on_read


@dataclass
class Readout:
    """What the analysis reads of one run."""

    path: Path  # the records file
    records: list[CellRecord]  # the latest record of each cell, in file order, each with its plan
    verdicts: list[ScenarioVerdicts]  # per scenario whose file this checkout has


def with_plans(records: list[CellRecord]) -> list[CellRecord]:
    """`records`, each with its plan (`plan_on_read`, in place)."""
    for record in records:
        plan_on_read(record)
    return records


def readout(path: Path | str, records: list[CellRecord]) -> Readout:
    """The run of the records file `path`, from `records` (the latest of each cell, as read from it)."""
    return Readout(Path(path), with_plans(records), verdicts_of(path, records))


def _latest(path: Path | str) -> list[CellRecord]:
    return list(latest_by_cell(read_cell_records(Path(path)).records).values())


def read_run(path: Path | str) -> Readout:
    """`readout` of a records file (unreadable lines skipped: `harness.common.records.read_cell_records`)."""
    return readout(path, _latest(path))


def finish_run(records_path: Path | str) -> Path | None:
    """Judges a run that has ended and writes its verdicts beside its records (`expect.write_verdicts`), while the
    latents files its close-output checks read are still there: what the runner, the pytest session and merge call
    last. None where the run left no records file."""
    if not Path(records_path).is_file():
        return None
    return write_verdicts(records_path, with_plans(_latest(records_path)))
