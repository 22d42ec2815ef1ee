"""Command line: `python -m harness {bench,report,baseline,compare,list}`.

- bench: runs the scenario suite through pytest (the same as `make bench`), passing options through.
- report: renders a run's records.jsonl as markdown (stdout), or with --out as markdown plus PNG plots.
- baseline: writes or refreshes results/baselines/<gpu sku>.json from a run's records.
- compare: compares a run with its SKU's baseline; exit 1 on a regression or a lost, changed or missing cell.
- list: the scenarios and their cells, with effective flags, without running anything.
- history: one HTML page with a trend per metric and cell across runs (run folders, records files, baselines).
- merge: joins the records of several runs of one run id (shards on several machines) into one run folder.
- plan, advise, plan-fit: what a flag combination costs on a card, before running it (harness/plan/plan_cli.py).
- capacity: the largest frame count or resolution each combination completes, searched on the device.

Exit codes (harness/common/exitcodes.py): 0 pass, 1 regressed, 2 usage or unreadable input, 3 no baseline for the SKU,
4 no records, 5 every cell skipped, 6 every cell crashed/errored/timed out, 7 an output folder is not writable,
9 merge refused (the runs disagree, or measured one cell twice), 10 merge refused (a record of a newer schema
than this harness reads). Codes 3-10 mean nothing was judged; each comes
with one line saying why.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from harness.analyze.baseline import Baseline, BaselineCell, BaselineError
from harness.analyze.compare import CheckSpecError, Comparison
from harness.common import exitcodes, locations
from harness.common.contract import CellRecord, Status, label_in
from harness.common.inputs import InputError, check_output_file
from harness.common.records import (
    NoRecordsError,
    ResultsError,
    UnwritableError,
    ensure_writable,
    latest_by_cell,
    read_cell_records,
)
from harness.models import UnknownModelError, get_model
from harness.plan import plan_cli
from harness.plan.scenario import ReleaseNotInstalled, ScenarioError, expand, load_all, same_family, with_model
from harness.run import oneshot
from harness.run.merge import MergeConflict


class Stop(Exception):
    """Ends a command with `code` (harness.exitcodes) and one line saying why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _records_path(arg: str) -> Path:
    p = Path(arg)
    return p / "records.jsonl" if p.is_dir() else p


def beside(run: str, name: str) -> Path:
    """Where a file derived from a run goes: inside a run folder, or next to a records file and named after it
    (results/h100/x.records.jsonl -> results/h100/x.compare.md), so RUN may be either (as the Makefile says)."""
    p = Path(run)
    if p.is_dir():
        return p / name
    stem = p.name.removesuffix(".jsonl").removesuffix(".records")
    return p.with_name(f"{stem}.{name}")


def _read_run(arg: str) -> tuple[Path, list[CellRecord]]:
    """The latest record of each cell of a run; unreadable lines are warned about. A path that does not exist is
    a ResultsError (usage); a run folder without records.jsonl, or a file without one readable record, is a
    NoRecordsError (its own exit code: the bench ran and left nothing)."""
    path = _records_path(arg)
    if Path(arg).is_dir() and not path.exists():
        raise NoRecordsError(f"{arg}: run folder without records.jsonl: no records (did the bench run any cell?)")
    result = read_cell_records(path)
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    records = list(latest_by_cell(result.records).values())
    if not records:
        bad = f" ({len(result.problems)} unreadable lines)" if result.problems else ""
        raise NoRecordsError(f"{path}: no records{bad}")
    return path, records


def _require_measured(records: list[CellRecord], path: Path) -> None:
    """Stops when no cell measured anything: all skipped (ALL_SKIPPED) or all skipped/crashed/errored/timed out
    with at least one failure (ALL_FAILED). Such a run compared with a baseline would read as 'every cell
    missing' at best, or pass where the baseline lacks the cells: neither says what happened."""
    statuses = [r.status for r in records]
    if any(s is not Status.SKIPPED and not s.unexpected for s in statuses):
        return
    n = len(statuses)
    if all(s is Status.SKIPPED for s in statuses):
        reason = next((r.reason for r in records if r.reason), "no reason recorded")
        reason = str(reason).replace("\n", " ")[:200]
        raise Stop(exitcodes.ALL_SKIPPED,
                   f"{path}: all {n} cells were skipped, nothing measured (first reason: {reason})")
    counts = ", ".join(f"{s} {statuses.count(s)}" for s in ("crash", "error", "timeout", "skipped") if s in statuses)
    raise Stop(exitcodes.ALL_FAILED,
               f"{path}: all {n} cells ended without a measurement ({counts}); see each record's reason and log")


def cmd_report(args: argparse.Namespace) -> int:
    from harness.analyze.report import render, report_paths, write_report
    from harness.analyze.summary import build_summary

    if args.write:
        args.out = str(beside(args.run, "report.md"))
    if args.out:
        out = Path(args.out)
        if out.suffix == ".md":  # a file (a folder named X.md is refused, not written into as X.md/report.md)
            check_output_file(out, "--out")
        else:
            ensure_writable(out, create=False)
    page = None
    if args.html:  # --html PATH, or beside the markdown, or beside the run
        page = Path(args.html) if args.html is not True else (
            report_paths(args.out).with_suffix(".html") if args.out else beside(args.run, "report.html"))
        check_output_file(page, "--html")
    from harness.analyze.readout import readout

    run = readout(*_read_run(args.run))  # each record with its plan, and the run's verdicts
    records = run.records
    title = args.title or f"offload-bench run {records[0].run_id or ''}"
    summary = build_summary(records, args.baselines_dir, verdicts=run.verdicts)
    if page is not None:
        from harness.analyze.html import write_html

        try:
            print(f"wrote {write_html(records, page, title, summary, plots=not args.no_plots)}", file=sys.stderr)
        except ModuleNotFoundError as e:
            if e.name != "matplotlib":
                raise
            print("error: the plots need matplotlib (pip install matplotlib), or pass --no-plots", file=sys.stderr)
            return 2
        if not args.out:
            return 0
    if args.out:
        try:
            written = write_report(records, args.out, title=title, plots=not args.no_plots, summary=summary)
        except ModuleNotFoundError as e:
            if e.name != "matplotlib":
                raise
            print("error: the plots need matplotlib (pip install matplotlib), or pass --no-plots", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    else:
        print(render(records, title=title, summary=summary))
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from harness.analyze.baseline import (
        BaselineError,
        baseline_path,
        build_baseline,
        read_baseline,
        run_sku,
        write_baseline,
    )

    if args.out:
        check_output_file(args.out, "--out")
    elif args.baselines_dir:
        ensure_writable(args.baselines_dir, create=False)
    path, records = _read_run(args.run)
    _require_measured(records, path)
    sku = run_sku(records, args.sku, where=str(path))
    out = Path(args.out) if args.out else baseline_path(sku, args.baselines_dir)
    ensure_writable(out.parent, create=False)
    previous = None
    if out.exists():
        try:
            previous = read_baseline(out)
        except BaselineError as e:
            raise BaselineError(f"{e} (fix it or delete it to write a fresh baseline)") from None
    baseline = build_baseline(records, sku, previous=previous, merge=args.merge, source=str(path))
    for cell_id, cell in baseline.cells.items():
        if cell.status.unexpected:
            print(f"warning: {cell_id} is in the baseline as {cell.fate}", file=sys.stderr)
    write_baseline(out, baseline)
    cells = baseline.cells
    fates = ", ".join(f"{n} {s}" for s in ("ok", "oom", "error", "crash", "timeout")
                      if (n := sum(c.status == s for c in cells.values())))
    note = ""
    if previous is not None:
        added = sorted(set(cells) - set(previous.cells))
        dropped = sorted(set(previous.cells) - set(cells))
        note = f"; refreshed ({len(added)} cells added, {len(dropped)} dropped, tolerances kept)"
    print(f"wrote {out}: SKU {sku}, {len(cells)} cells ({fates}) from {path}{note}")
    return 0


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def _make_baseline_command(args: argparse.Namespace) -> str:
    """The exact command that makes the missing baseline from this run."""
    py = f"python -m harness baseline {args.run}" + (f" --sku {args.sku}" if args.sku else "")
    if locations.checkout() is None:  # installed from a wheel: no Makefile, the console script
        py = "offload-bench" + py.removeprefix("python -m harness")
    if args.baselines_dir or locations.checkout() is None:
        return py + (f" --baselines-dir {args.baselines_dir}" if args.baselines_dir else "")
    return f"make baseline RUN={args.run}" + (f" SKU={args.sku}" if args.sku else "") + f" (or: {py})"


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.analyze.baseline import run_cells, run_sku
    from harness.analyze.compare import Check, compare, gab_entries, scenario_card

    if args.write:
        args.markdown = args.markdown or str(beside(args.run, "compare.md"))
        args.gab_json = args.gab_json or str(beside(args.run, "benchmark.json"))
    for option, out in (("--markdown", args.markdown), ("--gab-json", args.gab_json)):
        if out:  # before reading anything: a gate that cannot write its verdict must say so first (a folder
            check_output_file(out, option)  # there used to print PASS, then IsADirectoryError, exit 1)
    checks = [Check.parse(spec) for spec in args.threshold]
    try:
        path, records = _read_run(args.run)
        _require_measured(records, path)
    except NoRecordsError as e:
        raise _stop(args, exitcodes.NO_RECORDS, str(e)) from None
    except Stop as e:
        raise _stop(args, e.code, str(e)) from None
    sku = run_sku(records, args.sku, where=str(path))
    cells = run_cells(records, sku)
    if args.gab_json:
        _write(args.gab_json, json.dumps(gab_entries(cells, sku), indent=1) + "\n")
        print(f"wrote {args.gab_json}", file=sys.stderr)
    baseline, shown = _baseline_of(args, sku)
    only = {cell_id.split("/", 1)[0] for cell_id in cells} if args.partial == "scenario" else None
    only_cards = {scenario_card(cell_id) for cell_id in cells} if args.partial == "card" else None
    # CPU timings move by tens of percent from run to run on a shared box: judging them would fail on noise.
    timing = args.timing or sku != "cpu"
    comparison = compare(baseline, cells, overrides=checks, only_scenarios=only, source=str(shown),
                         only_cards=only_cards, timing=timing)
    _add_notes(comparison, baseline, cells, records, sku)
    compared = [c for c in comparison.cells if c.verdict not in ("new", "missing")]
    if compared and all(c.verdict == "not comparable" for c in compared) and not comparison.failed:
        raise _stop(args, exitcodes.NO_BASELINE,
                    f"every cell's spec changed since {shown}: nothing comparable; make a new baseline with: "
                    f"{_make_baseline_command(args)}")
    return _emit_comparison(args, comparison)


def _stop(args: argparse.Namespace, code: int, line: str) -> Stop:
    """The one-line reason, also as the markdown comparison (the nightly job shows that file)."""
    if args.markdown:
        _write(args.markdown, f"# Comparison with the baseline\n\n**Nothing compared:** {line}\n")
    return Stop(code, line)


def _baseline_of(args: argparse.Namespace, sku: str) -> tuple[Baseline, Path]:
    """The baseline to compare with (--baseline, else the SKU's), and its path as shown."""
    from harness.analyze.baseline import BaselineError, baseline_path, read_baseline

    base_file = Path(args.baseline) if args.baseline else baseline_path(sku, args.baselines_dir)
    if not args.baseline and not base_file.exists():
        raise _stop(args, exitcodes.NO_BASELINE,
                    f"no baseline for SKU {sku} ({base_file} does not exist): nothing compared; make one from this "
                    f"run with: {_make_baseline_command(args)}")
    baseline = read_baseline(base_file)
    if baseline.sku != sku:
        raise BaselineError(f"{base_file}: baseline is for SKU {baseline.sku!r}, the run is {sku!r}")
    shown = base_file.resolve()
    return baseline, shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown


def _add_notes(comparison: Comparison, baseline: Baseline, cells: dict[str, BaselineCell], records: list[CellRecord],
               sku: str) -> None:
    """What the reader of a comparison must know beyond the verdicts: another software stack, an old baseline."""
    from harness.analyze.baseline import run_machine, stack_differences

    changed = stack_differences(baseline.machine, run_machine(records, sku))
    if changed:
        line = (f"the run's software differs from the baseline machine's ({', '.join(changed)}): times and "
                "allocator figures may move for that reason alone")
        comparison.notes.append(line)
        print(f"warning: {line}", file=sys.stderr)
    if any(c.portable_spec_hash for c in cells.values()) and not any(
        c.portable_spec_hash for c in baseline.cells.values()
    ):
        comparison.notes.append("the baseline predates portable_spec_hash: an edited scenario cannot be told from a "
                                "regression until the baseline is refreshed")


def _emit_comparison(args: argparse.Namespace, comparison: Comparison) -> int:
    from harness.analyze.compare import render

    print(render(comparison, all_rows=args.all), end="")
    if args.markdown:
        _write(args.markdown, render(comparison, markdown=True))
        print(f"wrote {args.markdown}", file=sys.stderr)
    for failure in comparison.failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return comparison.exit_code


def cmd_list(args: argparse.Namespace) -> int:
    from harness.analyze.labels import flag_words

    scenarios, errors = load_all(args.scenarios or locations.scenarios_dir())
    bad = [e for e in errors if not isinstance(e, ReleaseNotInstalled)]
    if bad:
        raise bad[0]
    for s in scenarios:
        print(f"{s.name} [{s.profile}] model={s.model} policy={s.policy}: {s.description}")
        for c in expand(s):
            note = f" (same as {label_in(c.same_as)})" if c.same_as else ""
            eff = c.resolution.effective.label()
            if args.labels:
                print(f"  {c.cell_id}  -> effective {eff}{note}")
            else:  # words; the id (for pytest -k) after them
                requested, effective = flag_words(c.requested), flag_words(c.resolution.effective)
                became = "" if effective == requested else f"\n      -> the policy runs: {effective}"
                print(f"  {c.cell_id.split('/')[1]}: {requested}  [{c.cell_id}]{note}{became}")
            for m in c.resolution.messages:
                print(f"      policy: {m}")
    for e in errors:
        print(f"skipped {e.line()}")  # type: ignore[attr-defined]
    return 0


def cmd_record_answers(args: argparse.Namespace) -> int:
    """Re-records the SGLang releases' answers that the shipped scenarios need (harness/engine/answers.jsonl), on a
    machine with the releases installed: needed whenever the ServerArgs child's code changes."""
    from harness.policy import clear_cache, write_shipped

    clear_cache()
    load_all(locations.scenarios_dir())  # asks (or reads from the release folders) every request the suite makes
    print(f"wrote {write_shipped()} answers", file=sys.stderr)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from harness.analyze.history import write_history

    if not args.runs and not args.baselines:
        raise Stop(exitcodes.USAGE, "history: name at least one run (folder or records file) or --baselines DIR")
    check_output_file(Path(args.out).resolve(), "--out")
    try:
        page = write_history(args.runs, args.out, args.baselines, args.title)
    except FileNotFoundError as e:
        raise Stop(exitcodes.USAGE, str(e)) from None
    print(f"wrote {page}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    """pytest on the scenario suite: the checkout's scenarios/, or the copy an installed wheel ships
    (harness.common.locations); records go under --results (default ./results) of the working folder."""
    import pytest

    folder = Path(args.scenarios) if args.scenarios else locations.scenarios_dir()
    if not (folder / "conftest.py").is_file():
        raise Stop(exitcodes.USAGE, f"{folder}: no scenario suite there (its conftest.py is missing); pass "
                   "--scenarios <folder with conftest.py and the scenario files>")
    mine = ["--bench-results", args.results]
    if args.model:
        mine += ["--bench-scenarios-dir", str(model_scenarios(folder, args.model, Path(args.results)))]
    if args.profile:
        mine += ["--bench-profile", args.profile]
    return int(pytest.main([str(folder), "-p", "no:cacheprovider", "-rA", *mine, *rest]))


def model_scenarios(folder: Path, model: str, results: Path) -> Path:
    """`bench --model`: the suite's scenarios whose pipeline `model` runs (same family, edit or not), copied with
    their model replaced under RESULTS/model-scenarios/<model's folder or zoo name>/ (kept: `report` reads a run's
    scenario files back); the folder of the copies.

    Raises:
        Stop: `model` is no model, or no scenario of the suite runs its pipeline.
    """
    try:
        spec = get_model(model, "--model")
    except UnknownModelError as e:
        raise Stop(exitcodes.USAGE, str(e)) from None
    out = results.resolve() / "model-scenarios" / Path(spec.name).name
    shutil.rmtree(out, ignore_errors=True)
    files = [p for p in sorted(folder.rglob("*.toml")) if same_family(p, spec.name)]
    if not files:
        raise Stop(exitcodes.USAGE, f"--model {model}: no scenario under {folder} runs the {spec.family} pipeline")
    for path in files:
        with_model(path, spec.name, out / path.relative_to(folder))
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("offload-bench")
    except PackageNotFoundError:  # a checkout run without an install
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offload-bench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"offload-bench {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    bench = sub.add_parser("bench", help="run the scenario suite (extra args go to pytest)")
    bench.add_argument("--profile", choices=("auto", "cpu", "gpu"), help="pytest's --bench-profile")
    bench.add_argument("--results", default="results", help="results folder (default: ./results)")
    bench.add_argument("--scenarios", help="the scenario suite's folder (default: the checkout's or the shipped one)")
    bench.add_argument("--model", help="run the suite's scenarios of this model's pipeline on it instead: a zoo name "
                       "or a diffusers pipeline folder (copies under RESULTS/model-scenarios/)")
    rep = sub.add_parser("report", help="markdown report of a run (with --out: and PNG plots)")
    rep.add_argument("run", help="a run folder or a records.jsonl file")
    rep.add_argument("--out", help="a .md file or a folder (report.md): markdown plus PNGs next to it")
    rep.add_argument("--title")
    rep.add_argument("--no-plots", action="store_true", help="with --out: the markdown only")
    rep.add_argument("--write", action="store_true",
                     help="write report.md (and PNGs) in the run folder, or beside a records file as <name>.report.md")
    rep.add_argument("--html", nargs="?", const=True, metavar="PATH",
                     help="also write one self-contained HTML page (summary, sortable tables, inline plots): PATH, "
                     "else beside the markdown (report.html), else in the run folder / beside the records file")
    rep.add_argument("--baselines-dir", help="where the summary finds the SKU's baseline (default: results/baselines)")
    base = sub.add_parser("baseline", help="write/refresh results/baselines/<sku>.json from a run")
    base.add_argument("run", help="a run folder or a records.jsonl file")
    base.add_argument("--sku", help="the GPU SKU to take (required when the run mixes SKUs)")
    base.add_argument("--baselines-dir", help="folder of <sku>.json files (default: results/baselines)")
    base.add_argument("--out", help="write this file instead of <baselines-dir>/<sku>.json")
    base.add_argument("--merge", action="store_true", help="keep the baseline's cells this run did not measure")
    _compare_parser(sub)
    plan_cli.add_commands(sub)
    oneshot.add_command(sub)
    sub.add_parser("capacity", add_help=False,
                   help="largest frames / resolution per combination, on the device (harness/run/capacity.py)")
    mrg = sub.add_parser("merge", help="join the records of shards of one run (several run folders) into one run")
    mrg.add_argument("runs", nargs="+", help="run folders or records files of one run id")
    mrg.add_argument("--out", help="the merged run folder (default: <first run's folder>/<run id>-merged)")
    hist = sub.add_parser("history", help="one HTML page: a trend per metric and cell across runs, per GPU SKU")
    hist.add_argument("runs", nargs="*", help="run folders, records files, or folders holding them (searched)")
    hist.add_argument("--baselines", metavar="DIR", help="also each baseline file (<sku>.json) under DIR")
    hist.add_argument("--out", default="history.html", help="the page (default: ./history.html)")
    hist.add_argument("--title", default="offload-bench history")
    sub.add_parser("record-answers", help="re-record the SGLang releases' answers the shipped scenarios need "
                   "(harness/engine/answers.jsonl; needs the releases installed)")
    ls = sub.add_parser("list", help="list scenarios and cells")
    ls.add_argument("--scenarios", help="folder of scenario files (default: the checkout's or the shipped one)")
    ls.add_argument("--labels", action="store_true", help="the compact labels (cpu1-lw1-...) instead of words")
    return parser


def _compare_parser(sub: Any) -> None:
    cmp = sub.add_parser("compare", help="compare a run with its SKU's baseline (exit 1 on regression)")
    cmp.add_argument("run", help="a run folder or a records.jsonl file")
    cmp.add_argument("--baseline", help="baseline file (default: <baselines-dir>/<run's sku>.json)")
    cmp.add_argument("--baselines-dir", help="folder of <sku>.json files (default: results/baselines)")
    cmp.add_argument("--sku", help="the GPU SKU to take (required when the run mixes SKUs)")
    cmp.add_argument("--markdown", help="also write the comparison as markdown here")
    cmp.add_argument("--gab-json", help="write github-action-benchmark customSmallerIsBetter JSON here")
    cmp.add_argument("--threshold", action="append", default=[], metavar="METRIC:+N%",
                     help="override a metric's tolerance (repeatable), e.g. e2e_ms:+30%%")
    cmp.add_argument("--partial", nargs="?", const="scenario", choices=("scenario", "card"), default=None,
                     help="only the baseline cells of the scenarios the run has (--partial), or of the scenario/card "
                     "pairs it has (--partial=card: a run of some cards of a scenario)")
    cmp.add_argument("--timing", action="store_true",
                     help="judge time metrics on the CPU profile too (by default CPU runs compare memory and "
                     "validity only: CPU times are noise)")
    cmp.add_argument("--all", action="store_true",
                     help="print every metric row (by default: the verdict, the cells whose fate changed and the "
                     "metrics that regressed or are missing; --markdown keeps every row)")
    cmp.add_argument("--write", action="store_true",
                     help="write compare.md and benchmark.json in the run folder, or beside a records file as "
                     "<name>.compare.md and <name>.benchmark.json")


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    if args.cmd == "bench":
        return cmd_bench(args, rest)
    if args.cmd == "capacity":
        from harness.run.capacity import main as capacity_main

        return capacity_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "report":
        return cmd_report(args)
    if args.cmd == "baseline":
        return cmd_baseline(args)
    if args.cmd == "compare":
        return cmd_compare(args)
    if args.cmd == "history":
        return cmd_history(args)
    if args.cmd == "record-answers":
        return cmd_record_answers(args)
    if args.cmd == "merge":
        from harness.run.merge import run_merge

        return run_merge(args.runs, args.out)
    if args.cmd == "run":
        return oneshot.cmd_run(args)
    if args.cmd in plan_cli.COMMANDS:
        return plan_cli.COMMANDS[args.cmd](args)
    return cmd_list(args)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return _dispatch(parser, args, rest)
    except (Stop, MergeConflict, NoRecordsError, UnwritableError, ScenarioError, ResultsError, BaselineError,
            CheckSpecError, InputError, *plan_cli.ERRORS) as e:
        print(f"error: {'merge refused: ' if isinstance(e, MergeConflict) else ''}{e}", file=sys.stderr)
        return _exit_code(e)


def _exit_code(error: Exception) -> int:
    """The exit code of an error `main` reports in one line (harness.exitcodes); a bad input or option is USAGE."""
    if isinstance(error, Stop | MergeConflict):
        return error.code
    if isinstance(error, NoRecordsError):  # before ResultsError: it is one
        return exitcodes.NO_RECORDS
    return exitcodes.UNWRITABLE if isinstance(error, UnwritableError) else exitcodes.USAGE


if __name__ == "__main__":
    sys.exit(main())
