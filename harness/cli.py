"""Command line: `python -m harness {bench,report,baseline,compare,list}`.

- bench: runs the scenario suite through pytest (the same as `make bench`), passing options through.
- report: renders a run's records.jsonl as markdown (stdout), or with --out as markdown plus PNG plots.
- baseline: writes or refreshes results/baselines/<gpu sku>.json from a run's records.
- compare: compares a run with its SKU's baseline; exit 1 on a regression or a lost, changed or missing cell.
- list: the scenarios and their cells, with effective flags, without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness.baseline import BaselineError
from harness.compare import CheckSpecError
from harness.results import ResultsError, latest_by_cell, read_records
from harness.scenario import ScenarioError, discover, expand

REPO = Path(__file__).resolve().parent.parent


def _records_path(arg: str) -> Path:
    p = Path(arg)
    return p / "records.jsonl" if p.is_dir() else p


def _read_run(arg: str) -> tuple[Path, list[dict[str, Any]]]:
    """The latest record of each cell of a run; unreadable lines are warned about. No records: ResultsError."""
    path = _records_path(arg)
    result = read_records(path)
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    records = list(latest_by_cell(result.records).values())
    if not records:
        raise ResultsError(f"{path}: no records")
    return path, records


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import render, write_report

    _, records = _read_run(args.run)
    title = args.title or f"offload-bench run {records[0].get('run_id', '')}"
    if args.out:
        try:
            written = write_report(records, args.out, title=title, plots=not args.no_plots)
        except ModuleNotFoundError as e:
            if e.name != "matplotlib":
                raise
            print("error: the plots need matplotlib (pip install matplotlib), or pass --no-plots", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    else:
        print(render(records, title=title))
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from harness.baseline import BaselineError, baseline_path, build_baseline, read_baseline, run_sku, write_baseline

    path, records = _read_run(args.run)
    sku = run_sku(records, args.sku, where=str(path))
    out = Path(args.out) if args.out else baseline_path(sku, args.baselines_dir)
    previous = None
    if out.exists():
        try:
            previous = read_baseline(out)
        except BaselineError as e:
            raise BaselineError(f"{e} (fix it or delete it to write a fresh baseline)") from None
    baseline = build_baseline(records, sku, previous=previous, merge=args.merge, source=str(path))
    for cell_id, cell in baseline["cells"].items():
        if cell["status"] in ("error", "crash", "timeout"):
            print(f"warning: {cell_id} is in the baseline as {cell['status']} in {cell['failed_phase']}",
                  file=sys.stderr)
    write_baseline(out, baseline)
    cells = baseline["cells"]
    fates = ", ".join(f"{n} {s}" for s in ("ok", "oom", "error", "crash", "timeout")
                      if (n := sum(c["status"] == s for c in cells.values())))
    note = ""
    if previous is not None:
        added = sorted(set(cells) - set(previous["cells"]))
        dropped = sorted(set(previous["cells"]) - set(cells))
        note = f"; refreshed ({len(added)} cells added, {len(dropped)} dropped, tolerances kept)"
    print(f"wrote {out}: SKU {sku}, {len(cells)} cells ({fates}) from {path}{note}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.baseline import BaselineError, baseline_path, read_baseline, run_cells, run_sku
    from harness.compare import Check, compare, gab_entries, render

    path, records = _read_run(args.run)
    sku = run_sku(records, args.sku, where=str(path))
    cells = run_cells(records, sku)
    checks = [Check.parse(spec) for spec in args.threshold]
    if args.gab_json:
        Path(args.gab_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.gab_json).write_text(json.dumps(gab_entries(cells, sku), indent=1) + "\n")
        print(f"wrote {args.gab_json}", file=sys.stderr)
    base_file = Path(args.baseline) if args.baseline else baseline_path(sku, args.baselines_dir)
    if not args.baseline and not base_file.exists():
        text = (
            f"No baseline for SKU {sku} ({base_file} does not exist): nothing compared. "
            f"To make one from this run: python -m harness baseline {args.run}\n"
        )
        print(text, end="")
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(f"# Comparison with the {sku} baseline\n\n{text}")
        return 0
    baseline = read_baseline(base_file)
    if baseline["sku"] != sku:
        raise BaselineError(f"{base_file}: baseline is for SKU {baseline['sku']!r}, the run is {sku!r}")
    only = {cell_id.split("/", 1)[0] for cell_id in cells} if args.partial else None
    shown = base_file.resolve()
    shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown
    comparison = compare(baseline, cells, overrides=checks, only_scenarios=only, source=str(shown))
    print(render(comparison), end="")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render(comparison, markdown=True))
        print(f"wrote {args.markdown}", file=sys.stderr)
    for failure in comparison.failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return comparison.exit_code


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
    rep = sub.add_parser("report", help="markdown report of a run (with --out: and PNG plots)")
    rep.add_argument("run", help="a run folder or a records.jsonl file")
    rep.add_argument("--out", help="a .md file or a folder (report.md): markdown plus PNGs next to it")
    rep.add_argument("--title")
    rep.add_argument("--no-plots", action="store_true", help="with --out: the markdown only")
    base = sub.add_parser("baseline", help="write/refresh results/baselines/<sku>.json from a run")
    base.add_argument("run", help="a run folder or a records.jsonl file")
    base.add_argument("--sku", help="the GPU SKU to take (required when the run mixes SKUs)")
    base.add_argument("--baselines-dir", help="folder of <sku>.json files (default: results/baselines)")
    base.add_argument("--out", help="write this file instead of <baselines-dir>/<sku>.json")
    base.add_argument("--merge", action="store_true", help="keep the baseline's cells this run did not measure")
    cmp = sub.add_parser("compare", help="compare a run with its SKU's baseline (exit 1 on regression)")
    cmp.add_argument("run", help="a run folder or a records.jsonl file")
    cmp.add_argument("--baseline", help="baseline file (default: <baselines-dir>/<run's sku>.json)")
    cmp.add_argument("--baselines-dir", help="folder of <sku>.json files (default: results/baselines)")
    cmp.add_argument("--sku", help="the GPU SKU to take (required when the run mixes SKUs)")
    cmp.add_argument("--markdown", help="also write the comparison as markdown here")
    cmp.add_argument("--gab-json", help="write github-action-benchmark customSmallerIsBetter JSON here")
    cmp.add_argument("--threshold", action="append", default=[], metavar="METRIC:+N%",
                     help="override a metric's tolerance (repeatable), e.g. e2e_ms:+30%%")
    cmp.add_argument("--partial", action="store_true",
                     help="only the baseline cells of scenarios the run has (a run of some scenarios)")
    ls = sub.add_parser("list", help="list scenarios and cells")
    ls.add_argument("--scenarios", default=str(REPO / "scenarios"))
    args, rest = parser.parse_known_args(argv)
    try:
        if args.cmd == "bench":
            return cmd_bench(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.cmd == "report":
            return cmd_report(args)
        if args.cmd == "baseline":
            return cmd_baseline(args)
        if args.cmd == "compare":
            return cmd_compare(args)
        return cmd_list(args)
    except (ScenarioError, ResultsError, BaselineError, CheckSpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
