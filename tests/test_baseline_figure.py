"""The baseline-vs-current figure (harness.analyze.figures.baseline_png): a PNG within a screen's height from
compare's metric rows, None where nothing has both values."""

from __future__ import annotations

from io import BytesIO

from harness.analyze.compare import MetricRow
from harness.analyze.figures import baseline_png
from harness.analyze.plots import MAX_HEIGHT_IN


def _row(cell: str, metric: str, base: float | None, cur: float | None, verdict: str = "ok") -> MetricRow:
    return MetricRow(cell, metric, base, cur, None, 0.05, verdict)


def test_paired_bars_per_metric_within_a_screen() -> None:
    rows = [_row(f"s/card/cpu1-lw{i}", m, 2.0e9 + i, 2.1e9 + i) for i in range(3)
            for m in ("runtime_peak_reserved_bytes", "load_peak_reserved_bytes")]
    rows.append(_row("s/card/cpu1-lw0", "denoise_steady_step_ms", 100.0, 130.0, "regression"))
    png = baseline_png(rows, "s on card: baseline vs current")
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height = imread(BytesIO(png)).shape[0]
    assert height <= MAX_HEIGHT_IN * 110 + 1


def test_nothing_to_draw_without_both_values() -> None:
    assert baseline_png([_row("s/card/x", "e2e_ms", None, 3.0), _row("s/card/y", "e2e_ms", 2.0, None)], "t") is None


def _baseline_figures(page: str) -> list[tuple[str, bytes]]:
    import base64
    import re

    return [(alt, base64.b64decode(data)) for alt, data in
            re.findall(r'alt="([^"]*: baseline vs current)" src="data:image/png;base64,([^"]+)"', page)]


def test_page_shows_baseline_figure_per_scenario_and_card() -> None:
    """H100 records against the committed results/baselines/nvidia-h100-80gb-hbm3.json: one figure per
    scenario/card the comparison covers, in that section, captioned with the baseline file."""
    from harness.analyze.html import render_html
    from tests.helpers import cell_records
    from tests.test_html_report import H100

    recs = cell_records(H100)
    page = render_html(recs, "h100 run")
    figures = _baseline_figures(page)
    pairs = {(str(r.scenario), str(r.card_name)) for r in recs}
    assert {alt for alt, _ in figures} == {f"{s} on {c}: baseline vs current" for s, c in pairs}
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for _, png in figures)
    assert page.count("Against the baseline results/baselines/nvidia-h100-80gb-hbm3.json:") == len(pairs)
    for s, c in pairs:  # in its scenario's section, after that card's heading
        section = page.index(f'<h2 id="s-{s}"')
        following = page.find("<h2", section + 1)
        at = page.index(f'alt="{s} on {c}: baseline vs current"')
        assert section < at and (following == -1 or at < following)


def test_page_without_a_baseline_has_no_baseline_figure() -> None:
    from harness.analyze.html import render_html
    from harness.analyze.summary import build_summary
    from tests.helpers import cell_records
    from tests.test_html_report import CPU, H100

    cpu = cell_records(CPU)  # no results/baselines/cpu.json
    page = render_html(cpu, "cpu run")
    assert _baseline_figures(page) == [] and "<figcaption>Against the baseline" not in page
    h100 = cell_records(H100)  # a baseline folder without this SKU's file
    page = render_html(h100, "h100 run", build_summary(h100, "/nonexistent"))
    assert _baseline_figures(page) == [] and "<figcaption>Against the baseline" not in page
