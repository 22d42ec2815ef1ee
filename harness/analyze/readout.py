"""A run as the analysis reads it (`readout`): the latest record of each cell, each with its plan.

The one place where what an older records file lacks is filled in on read, so that the report, the HTML page and
the expectations render what they are given and compute none of it: the plan of a record written before the
runner stored plans, or whose planning failed when it ran, is derived here once (`harness.plan.planner.plan_on_read`;
the report's plan column says "derived"). Nothing is written back: the records file stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.common.contract import CellRecord
from harness.common.records import latest_by_cell, read_cell_records
from harness.plan.planner import plan_on_read


@dataclass
class Readout:
    """What the analysis reads of one run."""

    path: Path  # the records file
    records: list[CellRecord]  # the latest record of each cell, in file order, each with its plan


def readout(path: Path | str, records: list[CellRecord]) -> Readout:
    """The run of the records file `path`, from `records` (the latest of each cell, as read from it)."""
    for record in records:
        plan_on_read(record)
    return Readout(Path(path), records)


def read_run(path: Path | str) -> Readout:
    """`readout` of a records file (unreadable lines skipped: `harness.common.records.read_cell_records`)."""
    return readout(path, list(latest_by_cell(read_cell_records(Path(path)).records).values()))
