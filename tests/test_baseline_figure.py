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
