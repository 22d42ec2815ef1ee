"""Committed reports regenerate from their records with today's code: `report` of each committed records file
(results/**/<name>.records.jsonl beside <name>.md) gives the committed tables, expectations and plot links, so a
change to the report (or to a scenario's expectations) that would make a committed report stale fails here
(regenerate with: python -m harness report <records> --out <md> --title "<its first heading>")."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.analyze.readout import read_run
from harness.analyze.report import plot_paths, plots_section, render
from harness.analyze.summary import build_summary

REPO = Path(__file__).resolve().parent.parent
REPORTS = sorted(md for md in (REPO / "results").rglob("*.md") if md.with_name(f"{md.stem}.records.jsonl").exists())


def test_there_are_committed_reports_with_records() -> None:
    assert len(REPORTS) >= 10


@pytest.mark.parametrize("md", REPORTS, ids=lambda p: str(p.relative_to(REPO / "results")))
def test_committed_report_regenerates_from_its_records(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # records made on the GPU box name its checkout; the report finds ./scenarios/...
    committed = md.read_text(encoding="utf-8")
    title = committed.splitlines()[0].removeprefix("# ")
    run = read_run(md.with_name(f"{md.stem}.records.jsonl"))  # as `report` reads it: no verdicts stored, judged
    records = run.records
    text = render(records, title=title, summary=build_summary(records, verdicts=run.verdicts))
    assert committed.startswith(text), f"{md} is stale: regenerate it from its records"
    # the plots section names the same PNGs, which are committed beside it (their pixels are not compared)
    plots = plot_paths(records, md.parent, md.stem)
    assert committed == text + "\n" + plots_section(plots, md.parent, records)
    assert all(png.is_file() for files in plots.values() for png in files.values())
