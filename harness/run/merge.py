"""`python -m harness merge RUN... [--out DIR]`: the records of several runs of one run id (the shards of a nightly,
each on its own machine, or copies of one run folder) joined into one run folder that report, baseline and
compare read like any other.

Nothing is dropped: a source holding a record of a newer schema than this harness reads (a shard run by a newer
checkout) is refused with exit 10, `exitcodes.NEWER_RECORD`, naming file:line; merge with the newer harness.

What must agree (else exit 9, `exitcodes.MERGE_CONFLICT`, one line naming both sources):
- the run id: every record of every source has the same `run_id`;
- the git sha: each source's set of commits (over each cell's latest record) is the same as every other's. One
  source may hold several (a run resumed after a pull); two sources may not differ;
- a cell's spec: the latest record of a cell in each source has the same `portable_spec_hash` (the spec without
  the scenario file's path, which differs between machines' checkouts; `spec_hash` where a record lacks it).

Records of one cell, and when they conflict:
- identical records (the same JSON) in several sources are one record (a folder given twice, an artifact
  downloaded twice);
- within one source a cell may have several records, in file order: `--resume --retry-failed` appends a rerun of
  a crash/error/timeout, a cell rerun after its scenario changed appends one of the new spec. The latest counts,
  as everywhere (`results.latest_by_cell`);
- across sources, a crash, error or timeout in one and any record in another is a retry on another machine, not a
  conflict: the merged file keeps both, in `created` order, so the later one counts;
- two different records that ended in a verdict (ok, oom, skipped) in two sources conflict: the cell was measured
  twice (overlapping shards, a run id reused) and nothing says which measurement counts.

The merged folder gets `records.jsonl` (every distinct record, ordered by `created`; a stable sort, so each source's
own order of one cell's records is kept), `merge.json` (the sources, and per source its hosts, shards and record
count) and each source's `cells/` folders (logs, specs, latents). Records are not rewritten: each keeps its
`machine` (the child's GPU, host, driver, probe), `runner_host` and `shard` (the runner's), so the report shows which
machine ran which cell.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import exitcodes
from harness.common.contract import CellRecord, JsonObject
from harness.common.records import NoRecordsError, ResultsError, ensure_writable, latest_by_cell, read_cell_records


class MergeConflict(ValueError):
    """The sources are not one run, or measured one cell twice. The message names both sources."""

    code = exitcodes.MERGE_CONFLICT


class NewerRecord(MergeConflict):
    """A source holds a record of a newer schema than this harness reads: merging would drop it, so merge refuses."""

    code = exitcodes.NEWER_RECORD


@dataclass
class Source:
    """One input: a run folder or a records file, with its readable records in file order."""

    label: str
    folder: Path | None  # the run folder (its cells/ are copied), None for a bare records file
    records: list[CellRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Merged:
    records: list[CellRecord]
    sources: list[Source]
    run_id: str
    duplicates: int  # identical records seen in more than one source, kept once
    retried: list[str]  # cells whose failure in one source was rerun in another

    def summary(self) -> JsonObject:
        """What merge.json holds: the run and, per source, what came from it."""
        return {
            "run_id": self.run_id,
            "records": len(self.records),
            "cells": len(latest_by_cell(self.records)),
            "duplicates_dropped": self.duplicates,
            "retried_across_sources": self.retried,
            "sources": [
                {
                    "source": s.label,
                    "records": len(s.records),
                    "hosts": sorted({h for r in s.records if (h := r.host)}),
                    "shards": sorted({str(r.shard) for r in s.records if r.shard}),
                    "unreadable_lines": len(s.problems),
                }
                for s in self.sources
            ],
        }


def read_source(arg: str | Path) -> Source:
    """A run folder (its records.jsonl) or a records file. A missing path is a ResultsError (usage); a source
    without a readable record is a NoRecordsError."""
    path = Path(arg)
    folder = path if path.is_dir() else None
    records_path = path / "records.jsonl" if folder else path
    if folder and not records_path.exists():
        raise NoRecordsError(f"{arg}: run folder without records.jsonl: nothing to merge")
    result = read_cell_records(records_path)
    if result.newer:  # a whole record this harness cannot read, so cannot carry: never dropped (issue #30)
        raise NewerRecord(f"{result.newer[0]}"
                          + (f" (and {len(result.newer) - 1} more such records)" if len(result.newer) > 1 else "")
                          + "; nothing merged: merge with the harness that wrote it, or a newer one")
    if not result.records:
        raise NoRecordsError(f"{records_path}: no readable record")
    return Source(str(arg), folder, result.records, result.problems)


def _spec_of(record: CellRecord) -> str | None:
    return record.portable_spec_hash or record.spec_hash


def _check_one_run(sources: Sequence[Source]) -> str:
    """The run id all sources share; raises MergeConflict naming two sources that differ in run id or commits."""
    first: dict[str, str] = {}
    for s in sources:
        for r in s.records:
            run_id = str(r.run_id)
            first.setdefault(run_id, s.label)
            if len(first) > 1:
                (a_id, a_src), (b_id, b_src) = list(first.items())[:2]
                raise MergeConflict(f"not one run: {a_src} holds run {a_id!r}, {b_src} holds run {b_id!r} "
                                    f"(cell {r.cell_id}); merge the shards of one run id")
    shas = [(s, sorted({str(r.git_sha) for r in latest_by_cell(s.records).values()})) for s in sources]
    for s, sha in shas[1:]:
        if sha != shas[0][1]:
            raise MergeConflict(f"not one commit: {shas[0][0].label} ran git {', '.join(shas[0][1])}, {s.label} ran "
                                f"git {', '.join(sha)}; rerun the shards from one commit")
    return next(iter(first))


def merge(sources: Sequence[Source]) -> Merged:
    """Joins `sources` into one run's records (see the module docstring for what must agree and what conflicts).

    Raises:
        MergeConflict: the sources disagree on run id, commit or a cell's spec, or hold two verdicts of one cell.
    """
    run_id = _check_one_run(sources)
    kept: dict[str, tuple[CellRecord, str]] = {}  # the record's JSON line -> (record, first source holding it)
    duplicates = 0
    for s in sources:
        for r in s.records:
            key = r.to_json()
            if key in kept:
                duplicates += 1
            else:
                kept[key] = (r, s.label)
    by_cell: dict[str, list[tuple[CellRecord, str]]] = {}
    for r, label in kept.values():
        by_cell.setdefault(r.cell_id, []).append((r, label))
    retried = []
    for cell_id, entries in by_cell.items():
        labels = {label for _, label in entries}
        if len(labels) < 2:
            continue  # one source's own history: its order decides, as in any run
        latest: dict[str, CellRecord] = {}
        for r, label in entries:
            latest[label] = r
        specs = {label: _spec_of(r) for label, r in latest.items()}
        (a, a_spec), *others = specs.items()
        for b, b_spec in others:
            if a_spec != b_spec:
                raise MergeConflict(f"{cell_id}: the cell's spec differs: {a} ran spec {a_spec}, {b} ran spec "
                                    f"{b_spec} (the scenario changed between the runs)")
        # a crash, error or timeout may be followed by a rerun elsewhere without a conflict
        verdicts = [(r, label) for r, label in entries if not r.status.unexpected]
        for (r1, l1), (r2, l2) in itertools.pairwise(verdicts):
            if l1 != l2:
                raise MergeConflict(
                    f"{cell_id}: measured twice: {l1} has it {r1.fate} (created {r1.created}, host "
                    f"{r1.host}), {l2} has it {r2.fate} (created {r2.created}, host {r2.host}); "
                    "keep one of the two runs' records of this cell"
                )
        retried.append(cell_id)
    records = sorted((r for r, _ in kept.values()), key=lambda r: str(r.created or ""))
    return Merged(records, list(sources), run_id, duplicates, sorted(retried))


def missing_shards(records: Sequence[CellRecord]) -> list[str]:
    """Shards i/N absent from records that name shards of one N (a matrix job that uploaded nothing)."""
    seen = {str(r.shard) for r in records if r.shard}
    counts = {s.split("/")[1] for s in seen}
    if len(counts) != 1:
        return []
    n = int(next(iter(counts)))
    return [f"{i}/{n}" for i in range(1, n + 1) if f"{i}/{n}" not in seen]


def write_merged(merged: Merged, out: Path) -> None:
    """The merged run folder: records.jsonl, merge.json, the sources' cells/ folders (locks left out) and the
    merged run's verdicts.json."""
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(r.to_json() + "\n" for r in merged.records)
    tmp = out / ".records.jsonl.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / "records.jsonl")
    (out / "merge.json").write_text(json.dumps(merged.summary(), indent=1) + "\n", encoding="utf-8")
    for s in merged.sources:
        cells = s.folder / "cells" if s.folder else None
        if cells is not None and cells.is_dir():
            shutil.copytree(cells, out / "cells", dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))
    from harness.analyze.readout import finish_run

    finish_run(out / "records.jsonl")  # the merged run's verdicts, judged on all its cells


def default_out(first: str, run_id: str) -> Path:
    """`<folder of the first source>/<run id>-merged`: beside the runs it came from."""
    return Path(first).parent / f"{run_id}-merged"


def run_merge(inputs: Sequence[str], out: str | None) -> int:
    """The command: reads, checks, writes, prints one summary line; returns the exit code (raises the errors that
    harness.cli turns into codes: MergeConflict 9, NoRecordsError 4, ResultsError 2, UnwritableError 7)."""
    if out:
        ensure_writable(Path(out), create=False)  # before reading: a merge that cannot be written says so first
        if (Path(out) / "records.jsonl").exists():
            raise ResultsError(f"--out {out}: already holds records.jsonl; merge into a new folder")
    sources = [read_source(arg) for arg in inputs]
    for s in sources:
        for problem in s.problems:
            print(f"warning: {problem}", file=sys.stderr)
    merged = merge(sources)
    target = Path(out) if out else default_out(inputs[0], merged.run_id)
    if not out:
        ensure_writable(target.parent, create=False)
        if (target / "records.jsonl").exists():
            raise ResultsError(f"{target}: already holds records.jsonl; pass --out to merge into a new folder")
    write_merged(merged, target)
    for shard in missing_shards(merged.records):
        print(f"warning: no records of shard {shard}: its cells will be missing from the merged run",
              file=sys.stderr)
    s = merged.summary()
    hosts = sorted({h for src in s["sources"] for h in src["hosts"]})
    print(f"merged {s['records']} records of {s['cells']} cells from {len(sources)} sources (run {merged.run_id}; "
          f"hosts {', '.join(hosts) or 'unknown'}; {merged.duplicates} duplicate records kept once; "
          f"{len(merged.retried)} cells retried on another source) -> {target / 'records.jsonl'}")
    return exitcodes.OK
