"""Report: the markdown tables (counter labels kept), the PNG plots next to the markdown, and the CLI."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from harness import cli
from harness.analyze.frontier import frontier_rows
from harness.analyze.plots import pareto_front, pareto_plot, plot_points, trace_plot
from harness.analyze.report import render, report_paths, write_report
from harness.common.contract import CellRecord, Status
from tests.helpers import as_records, cell_records, make_record

FIXTURES = Path(__file__).parent / "fixtures"
H100 = FIXTURES / "h100-qwen-image-edit-5090.records.jsonl"
CPU = FIXTURES / "cpu-qwen-image-edit-tiny.records.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(path: Path) -> list[CellRecord]:
    return cell_records(path)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_render_keeps_counter_labels_cuda():
    text = render(records(H100), title="t")
    for label in (
        "load peak MiB (alloc reserved)", "runtime peak MiB (alloc reserved)", "peak MiB (alloc allocated)",
        "peak MiB (NVML per-process)", "pinned host MiB (requested)", "host RSS peak MiB",
        "denoise ms/step (median of steps 2..n)", "denoise first step ms",
    ):
        assert label in text
    assert "## qwen-image-edit-5090" in text and "## qwen-image-edit-5090-legacy" in text
    assert "oom in load" in text and "[same as cpu0-lw1-te0-vae0-pf4-pin1]" in text


def test_render_keeps_counter_labels_cpu():
    text = render(records(CPU), title="t")
    assert "load peak MiB (ledger)" in text and "runtime peak MiB (ledger)" in text
    assert "NVML" not in text.split("Counters:")[0]


def test_report_paths():
    assert report_paths("out/x.md") == Path("out/x.md")
    assert report_paths("out/dir") == Path("out/dir/report.md")


@pytest.mark.parametrize("fixture", [H100, CPU])
def test_write_report_markdown_and_pngs(tmp_path, fixture):
    recs = records(fixture)
    written = write_report(recs, tmp_path / "r.md", title="fixture run")
    md = written[0]
    assert md == tmp_path / "r.md"
    text = md.read_text()
    for r in recs:
        assert r.cell_id in text
    label = "alloc reserved" if fixture == H100 else "ledger"
    assert f"load peak MiB ({label})" in text
    pngs = written[1:]
    groups = {(r.scenario, r.card_name) for r in recs}
    assert len(pngs) == 2 * len(groups)
    for png in pngs:
        assert png.parent == tmp_path and png.name.startswith("r-")
        width, height = png_size(png)
        assert width > 300 and height > 200
        assert f"]({png.name})" in text  # linked by relative path
    assert {p.name for p in tmp_path.glob("*.png")} == {p.name for p in pngs}


def test_cli_report_to_a_folder(tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli.main(["report", str(H100), "--out", str(out), "--title", "H100 run"]) == 0
    md = out / "report.md"
    text = md.read_text()
    assert text.startswith("# H100 run")
    assert "## Plots" in text
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        png_size(png)
        assert f"]({png.name})" in text
    err = capsys.readouterr().err
    assert f"wrote {md}" in err


def test_cli_report_no_plots_and_stdout(tmp_path, capsys):
    assert cli.main(["report", str(CPU), "--out", str(tmp_path / "x.md"), "--no-plots"]) == 0
    assert not list(tmp_path.glob("*.png")) and "## Plots" not in (tmp_path / "x.md").read_text()
    capsys.readouterr()
    assert cli.main(["report", str(CPU)]) == 0
    out = capsys.readouterr().out
    assert "load peak MiB (ledger)" in out and not list(Path.cwd().glob("report-*.png"))


def test_cli_report_errors_are_clear(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["report", str(empty)]) == 4  # exitcodes.NO_RECORDS: its own code, not a usage error
    assert "no records" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_pareto_front():
    pts = [("a", 1.0, 10.0), ("b", 2.0, 5.0), ("c", 3.0, 6.0), ("d", 4.0, 1.0), ("e", 2.0, 5.0)]
    front = [p[0] for p in pareto_front(pts)]
    assert front == ["a", "b", "e", "d"]  # c is beaten by b on both; ties both stay


def test_plot_points_skip_unfinished_and_copies():
    recs = records(H100)
    points, others = plot_points([r for r in recs if r.card_name == "rtx5090-32g"])
    assert [p[0].rsplit("/", 1)[-1] for p in points] == ["cpu1-lw1-te0-vae0-pf4-pin1"]
    assert all(r.status is Status.OOM for r in others)
    legacy = [r for r in recs if str(r.scenario).endswith("legacy")]
    points, others = plot_points(legacy)
    assert points == [] and len(others) == 1  # the same_as copy is not drawn twice


def test_plots_without_finished_cells_or_trace(tmp_path):
    recs = [r for r in records(H100) if str(r.scenario).endswith("legacy")]
    png_size(pareto_plot(recs, tmp_path / "p.png", "nothing finished"))
    bare = [dataclasses.replace(r, trace=[]) for r in records(CPU)][:2]
    png_size(trace_plot(bare, tmp_path / "t.png", "no traces"))


def test_render_evaluates_expectations_of_records_made_in_another_checkout(monkeypatch):
    # records from the GPU box name its checkout (/root/w/scenarios/...); the report finds ./scenarios/... instead
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    flux = records(root / "results/h100/flux-dev-4090.records.jsonl")
    rec = flux[-1]
    assert not Path(str(rec.scenario_file)).exists() and "scenarios" in Path(str(rec.scenario_file)).parts
    text = render(flux)
    assert "- **lowest_peak** on rtx4090-24g: PASS" in text and "- **invariants** on rtx4090-24g: PASS" in text
    rec.scenario_file = "/nowhere/else.toml"
    assert "**lowest_peak**" not in render([rec])


def test_render_skips_cards_that_did_not_run_and_latents_it_cannot_read(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    part = records(root / "results/h100/qwen-image-edit-5090-s2.records.jsonl")
    text = render(part)  # pytest -k rtx5090: the native card of that scenario never ran
    assert "on rtx5090-32g: PASS" in text and "on native" not in text
    peer = records(root / "results/h100/wan21-14b-peer.records.jsonl")
    text = render(peer)
    assert "**close_output** on native: not re-evaluated here" in text and "**beats_peer** on native: PASS" in text


def test_plots_style_backends_apart_and_share_their_scales(tmp_path):
    """Plots: one colour and marker per backend (an engine release drawn as its engine), every cell numbered with
    its name in a key (labels beside points overprinted each other), host memory and first-vs-steady step panels,
    and one scale across the memory trace's panels."""
    from harness.analyze.plots import backend_style

    assert len({backend_style(b) for b in ("harness", "diffusers-group", "diffusers-group-rs", "sglang")}) == 4
    assert backend_style("sglang@0.5.23") == backend_style("sglang")
    root = Path(__file__).resolve().parents[1]
    peer = records(root / "results/h100/qwen-image-peer.records.jsonl")
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path

    import harness.analyze.plots as plots

    original = plots._save
    plots._save = keep
    try:
        pareto_plot(peer, tmp_path / "p.png", "peer")
        trace_plot(peer, tmp_path / "t.png", "peer")
    finally:
        plots._save = original
    pareto, trace = figures
    device, host, steps, key = pareto.axes
    # every cell numbered once; points close on screen share one label ("3,4") instead of overprinting
    numbers = [n for t in device.texts if t.get_text()[0].isdigit() for n in t.get_text().split(",")]
    assert sorted(numbers) == ["1", "2", "3", "4"]
    assert "2  cpu1-lw1-te0-vae0-pf1-pin1: ok" in key.texts[0].get_text()
    assert host.get_xlabel() == "host memory (GiB)"
    assert next(t.get_text() for t in steps.get_legend().get_texts()) == "first step"
    panels = [ax for ax in trace.axes if ax.get_ylabel().startswith("device")]
    assert len(panels) == 4
    assert len({ax.get_ylim() for ax in panels}) == 1 and len({ax.get_xlim() for ax in panels}) == 1
    twins = [ax for ax in trace.axes if ax.get_ylabel() == "host RSS GiB"]
    assert len(twins) == 4 and len({ax.get_ylim() for ax in twins}) == 1


def test_frontier_marks_the_fastest_cell_that_fits_and_the_pareto_front() -> None:
    def cell(resident: float, runtime_mib: int, step_ms: float, status: str = "ok") -> dict:
        r = make_record(True, True, status=status, runtime=runtime_mib * 2**20,
                        dit_layerwise_resident_layers=resident)
        r["phases"]["denoise"]["step_ms"] = [999.0, step_ms, step_ms]
        return r

    slow, mid, fast, dominated = cell(0, 100, 1000.0), cell(15, 300, 700.0), cell(30, 500, 500.0), cell(38, 600, 800.0)
    over = cell(48, 0, 0.0, status="oom")
    rows = {r["cell"]: r for r in frontier_rows(as_records([slow, mid, fast, dominated, over]))}
    assert list(rows) == [x["cell_id"].rsplit("/", 1)[-1] for x in (slow, mid, fast, dominated)]  # by peak; oom out
    assert [rows[k]["frontier"] for k in rows] == ["yes", "yes", "yes", ""]
    assert [rows[k]["fastest that fits"] for k in rows] == ["", "", "**fastest**", ""]
    assert rows[fast["cell_id"].rsplit("/", 1)[-1]]["vs resident 0"] == "2.00x faster"
    assert rows[slow["cell_id"].rsplit("/", 1)[-1]]["vs resident 0"] == ""


def test_a_recorded_scenario_path_is_read_from_this_checkout_first(tmp_path: Path) -> None:
    """Another checkout's copy (the GPU box's /work/main) may differ from this one's: expectations use this one's."""
    from harness.common.locations import local_scenario_file, scenarios_dir

    elsewhere = tmp_path / "other-checkout" / "scenarios" / "gpu" / "flux_dev_4090.toml"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("name = 'an older copy'\n")
    assert local_scenario_file(str(elsewhere)) == scenarios_dir() / "gpu" / "flux_dev_4090.toml"
    only_there = elsewhere.with_name("not_in_this_checkout.toml")
    only_there.write_text("name = 'x'\n")
    assert local_scenario_file(str(only_there)) == only_there
    assert local_scenario_file(str(tmp_path / "scenarios" / "missing.toml")) is None
    assert local_scenario_file(None) is None


def test_capacity_probes_get_no_plots_and_scenario_cells_do(tmp_path: Path) -> None:
    """A capacity search is one cell per probe (`<scenario>@<axis>-<value>`): two PNGs a probe made 24 for one
    search on the H200; the capacity table is its picture. Cells of an ordinary scenario keep theirs."""
    from harness.analyze.report import plot_paths

    probes = as_records([make_record(True, True, scenario=f"cap@resolution-{v}") for v in (512, 1024)])
    plain = as_records([make_record(True, True, scenario="plain")])
    assert plot_paths(probes, tmp_path, "x") == {}
    assert list(plot_paths(probes + plain, tmp_path, "x")) == [("plain", "tiny-6m")]


def test_a_latents_check_is_masked_only_when_its_latents_are_elsewhere(tmp_path: Path) -> None:
    """A committed report regenerated away from the GPU machine cannot compare latents files it does not have:
    that verdict is flagged (the report reads "not re-evaluated here"; the gate still fails it). Any other problem
    of the same check (a reference cell that did not run) keeps it a plain FAIL."""
    from harness.analyze.expect import cfg_batch_verdict, same_output_verdict

    def cell(cpu: bool, batched: bool, status: str = "ok", latents: str | None = None) -> dict:
        r = make_record(cpu, True, status=status, failed_phase=None if status == "ok" else "denoise")
        r["run_options"] = {"cfg_batch": batched}
        r["latents_path"] = latents or str(tmp_path / "gpu-box" / f"{cpu}-{batched}.pt")  # not on this machine
        return r

    elsewhere = as_records([cell(True, False), cell(True, True)])
    v = cfg_batch_verdict("native", elsewhere, 0.05)
    assert not v.passed and v.latents_elsewhere and "FileNotFoundError" in v.message
    no_reference = as_records([cell(True, False, status="oom"), cell(True, True)])
    v = cfg_batch_verdict("native", no_reference, 0.05)
    assert not v.passed and not v.latents_elsewhere
    both = as_records([cell(True, False), cell(True, True), cell(False, False, status="oom"), cell(False, True)])
    v = cfg_batch_verdict("native", both, 0.05)
    assert not v.passed and not v.latents_elsewhere
    import torch

    here = tmp_path / "here.pt"
    torch.save(torch.ones(4), here)
    v = cfg_batch_verdict("native", as_records([cell(True, False, latents=str(here)),
                                                cell(True, True, latents=str(here))]), 0.05)
    assert v.passed and not v.latents_elsewhere
    assert not same_output_verdict("native", elsewhere).latents_elsewhere


# ------------------------------------------------------------------------------------------ verdicts of a run


def test_the_verdicts_a_runs_end_wrote_are_read_not_judged_again(tmp_path: Path, monkeypatch) -> None:
    """`finish_run` judges a run once and writes verdicts.json beside its records; reading the run takes them as
    written (no expectation is evaluated); a records file changed since (a resumed run) is judged again."""
    import harness.analyze.expect as expect
    from harness.analyze.readout import finish_run, read_run
    from harness.analyze.summary import build_summary

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "records.jsonl").write_bytes(CPU.read_bytes())
    written = finish_run(run / "records.jsonl")
    assert written == run / "verdicts.json" and written.is_file()
    judged = read_run(run / "records.jsonl").verdicts
    assert "qwen-image-edit-tiny" in [s.scenario for s in judged] and judged[0].verdicts

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a stored run was judged again")

    monkeypatch.setattr(expect, "evaluate", no_evaluation)
    stored = read_run(run / "records.jsonl")
    assert stored.verdicts == judged
    text = render(stored.records, summary=build_summary(stored.records, verdicts=stored.verdicts))
    assert f"**{judged[0].verdicts[0].check}** on" in text
    with open(run / "records.jsonl", "a") as f:  # a resumed run appended: the stored verdicts judged other bytes
        f.write(CPU.read_text().splitlines()[0] + "\n")
    with pytest.raises(AssertionError, match="judged again"):
        read_run(run / "records.jsonl")


def test_a_records_file_beside_its_verdicts_names_them_after_itself() -> None:
    from harness.analyze.expect import verdicts_path

    assert verdicts_path("results/runs/r/records.jsonl") == Path("results/runs/r/verdicts.json")
    assert verdicts_path("results/h200/pr-tier.records.jsonl") == Path("results/h200/pr-tier.verdicts.json")


def test_the_report_renders_and_does_not_evaluate() -> None:
    """The report, its summary and the HTML page import no evaluation and no planning: verdicts come from the run
    (`harness.analyze.readout`) and plans from the records; the summary's one way to verdicts for records handed
    without them is `expect.run_verdicts`."""
    import ast

    forbidden = {"evaluate", "load_scenario", "plan_for_record", "plan_entry", "plan_on_read"}
    for name in ("report", "summary", "html"):
        path = Path(__file__).resolve().parent.parent / "harness" / "analyze" / f"{name}.py"
        taken = {a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
                 for a in node.names}
        assert not taken & forbidden, (name, taken & forbidden)
