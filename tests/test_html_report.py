"""The HTML page of a run (`report --html`): self-contained, summary first, words for cells with the compact label
on hover, sortable tables, inline PNGs. The page in a real browser: tests/test_report_browser.py (slow)."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path

from harness import cli
from harness.analyze.html import render_html
from harness.analyze.labels import flag_words
from harness.analyze.summary import build_summary
from harness.common.flags import OffloadFlags
from tests.helpers import cell_records

FIXTURES = Path(__file__).parent / "fixtures"
H100 = FIXTURES / "h100-qwen-image-edit-5090.records.jsonl"
CPU = FIXTURES / "cpu-qwen-image-edit-tiny.records.jsonl"


def test_flag_words_name_what_is_on() -> None:
    both = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, text_encoder_cpu_offload=True,
                        vae_cpu_offload=False, dit_offload_prefetch_size=1, pin_cpu_memory=True)
    assert flag_words(both) == "DiT CPU offload + layerwise (prefetch 1) · text encoder offload · pinned"
    none = OffloadFlags(dit_offload_prefetch_size=1, pin_cpu_memory=False)
    assert flag_words(none) == "all on the device · pageable (not pinned)"
    assert "engine default" in flag_words(replace(both, dit_cpu_offload=None))


def test_summary_of_the_seed_scenario() -> None:
    s = build_summary(cell_records(H100))
    assert {c.card for c in s.seed} == {"rtx5090-32g", "native"} and all(c.passed for c in s.seed
                                                                         if c.scenario == "qwen-image-edit-5090")
    assert s.fates["rtx5090-32g"]["oom in load"] >= 1
    assert any(p.card == "rtx5090-32g" and p.cell.label == "cpu1-lw1-te0-vae0-pf4-pin1" for p in s.picks)
    assert s.comparison is not None  # the committed H100 baseline
    assert build_summary(cell_records(H100), "/nonexistent").comparison is None


def test_page_is_self_contained_with_summary_first_and_hover_labels() -> None:
    recs = cell_records(CPU)
    page = render_html(recs, "cpu run")
    assert page.index('id="summary"') < page.index("<h2")
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched at view time
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) >= 3 * len({(r.scenario, r.card_name) for r in recs})
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for r in recs:  # the words, with the compact label on hover
        assert f'title="{r.label}"' in page
    assert page.count('class="sortable"') >= 3 and "function sortTable" in page


def test_cli_report_html_beside_the_markdown(tmp_path: Path, capsys) -> None:
    assert cli.main(["report", str(CPU), "--out", str(tmp_path / "r.md"), "--html", "--no-plots"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<h1>" in page and "Seed assertion" in page
    assert (tmp_path / "r.md").read_text().split("\n## ", 2)[1].startswith("Summary")
    assert cli.main(["report", str(CPU), "--html", str(tmp_path / "only.html"), "--no-plots"]) == 0
    assert (tmp_path / "only.html").exists() and not (tmp_path / "only.md").exists()


def test_history_of_the_committed_h200_runs(tmp_path: Path) -> None:
    """`history results/h200`: the Qwen-Image-Edit 5090 both-on cell's reserved peak and step over every committed
    run of it, the run under SGLang 0.5.8's policy (ran out of memory in load) marked as a fate change."""
    from harness.analyze.history import collect

    root = Path(__file__).resolve().parents[1]
    by_sku = collect([str(root / "results/h200")])
    trend = next(t for t in by_sku["nvidia-h200"] if t.key[0] == "qwen-image-edit" and t.key[1] == "rtx5090-32g"
                 and t.label == "cpu1-lw1-te0-vae0-pf4-pin1")
    runs = {p.run_id for p in trend.points}
    assert {"pr-tier", "20261202-021856-dd1e49", "20261202-022208-e01d1e"} <= runs and len(runs) >= 5
    assert [p.created for p in trend.points] == sorted(p.created for p in trend.points)
    assert all("runtime_peak_reserved_bytes" in p.metrics and "denoise_steady_step_ms" in p.metrics
               for p in trend.points if p.fate == "ok")
    assert any("ok -> oom in load" in what for _, what in trend.changes())
    page = tmp_path / "history.html"
    assert cli.main(["history", str(root / "results/h200"), "--out", str(page)]) == 0
    text = page.read_text()
    assert "qwen-image-edit on rtx5090-32g" in text and text.count("data:image/png;base64,") >= 5


def test_list_shows_words_and_labels_on_request(capsys) -> None:
    root = Path(__file__).resolve().parents[1]
    assert cli.main(["list", "--scenarios", str(root / "scenarios/cpu")]) == 0
    words = capsys.readouterr().out
    assert "tiny-6m: DiT CPU offload + layerwise (prefetch 1) · pinned  [qwen-image-edit-tiny/tiny-6m/" in words
    assert cli.main(["list", "--scenarios", str(root / "scenarios/cpu"), "--labels"]) == 0
    assert "  qwen-image-edit-tiny/tiny-6m/cpu1-lw1-te0-vae0-pf1-pin1  -> effective" in capsys.readouterr().out


def test_history_reads_a_records_file_once_given_with_its_folder(tmp_path: Path, monkeypatch) -> None:
    """`history RUN.records.jsonl FOLDER` (or the folder, then the file; or one of them through another path):
    each records file is one run, read once."""
    from harness.analyze.history import collect, run_files

    folder = tmp_path / "runs"
    folder.mkdir()
    f = folder / "cpu.records.jsonl"
    f.write_text(CPU.read_text())
    monkeypatch.chdir(tmp_path)
    once = {sku: [len(t.points) for t in trends] for sku, trends in collect([str(f)]).items()}
    for paths in ([str(f), str(folder)], [str(folder), str(f)], ["runs/cpu.records.jsonl", str(folder)],
                  [str(folder), "./runs/", "runs/../runs/cpu.records.jsonl"]):
        assert [p.resolve() for p in run_files(paths)] == [f.resolve()], paths
        assert {sku: [len(t.points) for t in trends] for sku, trends in collect(paths).items()} == once, paths


def test_a_check_whose_latents_stayed_on_the_gpu_machine_is_not_a_failure(tmp_path: Path) -> None:
    """The committed Qwen-Image peer run (3 checks judged here, among them peer_step_ratio[sglang]): its close_output
    needs latents files that stay on the H200; the page says it was not re-evaluated here (a grey badge, counted
    apart), not FAIL."""
    records = Path(__file__).parent.parent / "results" / "h200" / "qwen-image-peer-sglang.records.jsonl"
    out = tmp_path / "peer.html"
    assert cli.main(["report", str(records), "--html", str(out), "--no-plots"]) == 0
    page = out.read_text()
    summary = page[page.index('id="summary"'):page.index("<h2")]
    assert "Expectations: 3 of 3 checks pass; 1 not re-evaluated here." in summary
    assert 'class="badge unknown"' in summary and 'class="badge fail"' not in summary
