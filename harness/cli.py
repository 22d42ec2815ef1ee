"""Command line: `python -m harness {bench,report,list}`.

- bench: runs the scenario suite through pytest (the same as `make bench`), passing options through.
- report: renders a run's records.jsonl as markdown (stdout or --out).
- list: the scenarios and their cells, with effective flags, without running anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.results import ResultsError, latest_by_cell, read_records
from harness.scenario import ScenarioError, discover, expand

REPO = Path(__file__).resolve().parent.parent


def _records_path(arg: str) -> Path:
    p = Path(arg)
    return p / "records.jsonl" if p.is_dir() else p


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import render

    path = _records_path(args.run)
    result = read_records(path)
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    records = list(latest_by_cell(result.records).values())
    if not records:
        print(f"error: {path}: no records", file=sys.stderr)
        return 2
    text = render(records, title=args.title or f"offload-bench run {records[0].get('run_id', '')}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for s in discover(args.scenarios):
        print(f"{s.name} [{s.profile}] model={s.model} policy={s.policy}: {s.description}")
        for c in expand(s):
            note = f" (same as {c.same_as.rsplit('/', 1)[-1]})" if c.same_as else ""
            eff = c.resolution.effective.label()
            print(f"  {c.cell_id}  -> effective {eff}{note}")
            for m in c.resolution.messages:
                print(f"      policy: {m}")
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import pytest

    return int(pytest.main([str(REPO / "scenarios"), "-p", "no:cacheprovider", "-rA", *rest]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offload-bench", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bench", help="run the scenario suite (extra args go to pytest)")
    rep = sub.add_parser("report", help="markdown report of a run")
    rep.add_argument("run", help="a run folder or a records.jsonl file")
    rep.add_argument("--out", help="write the markdown here instead of stdout")
    rep.add_argument("--title")
    ls = sub.add_parser("list", help="list scenarios and cells")
    ls.add_argument("--scenarios", default=str(REPO / "scenarios"))
    args, rest = parser.parse_known_args(argv)
    try:
        if args.cmd == "bench":
            return cmd_bench(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return cmd_report(args) if args.cmd == "report" else cmd_list(args)
    except (ScenarioError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
