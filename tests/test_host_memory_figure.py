"""The report's host-memory figure (`harness.analyze.figures.host_memory_png`, issue #32): per cell the RSS peak and
the pinned bytes by who pinned them, in the colour of the backend that pins that way, and where SGLang's managers
hosted each layer group: counted bytes in records that have SGLang's pin counters, the release's plan as counts
in the committed ones that predate them (never bytes made up from a plan)."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

from matplotlib.image import imread

from harness.analyze.figures import host_memory_png, pinned_by_whom, sglang_hosting
from harness.analyze.html import render_html
from harness.analyze.plots import MAX_HEIGHT_IN, PINNERS, backend_style
from harness.common.contract import CellRecord
from tests.helpers import cell_records

REPO = Path(__file__).resolve().parent.parent
QWEN = REPO / "results/h200/qwen-image-peer-sglang.records.jsonl"
WAN = REPO / "results/h200/wan21-14b-peer-sglang.records.jsonl"
WAN_RERUN = REPO / "results/h200/wan21-14b-peer-sglang.rerun-hosting.records.jsonl"
LAYER = 679_662_592  # bytes of one synthetic block in the counted record below


def _sglang_cell(path: Path) -> CellRecord:
    return next(r for r in cell_records(path) if r.backend.startswith("sglang@")
                and (r.components or {}).get("dit", {}).get("sglang_layerwise"))


def _counted(record: CellRecord) -> CellRecord:
    """The committed SGLang cell as a record with the harness's SGLang counters would have it (49 of 60 pinned)."""
    out = copy.deepcopy(record)
    group = out.components["dit"]["sglang_layerwise"]["groups"]["transformer_blocks"]  # type: ignore[index]
    group["host"] = {"pinned_bytes": 49 * LAYER, "pageable_bytes": 11 * LAYER, "mapped_bytes": 0,
                     "layers": {"pinned": 49, "pageable": 11}}
    for stats in out.phases.values():
        stats.pinned_sglang_manager_bytes = stats.pinned_sglang_registered_bytes = 49 * LAYER
    return out


def test_committed_sglang_records_show_the_plan_as_counts_only() -> None:
    qwen = _sglang_cell(QWEN)
    assert sglang_hosting(qwen) == ["transformer_blocks: 49/60 pinned, 11 pageable (SGLang's plan)"]
    assert dict((who, b) for who, _, b in pinned_by_whom(qwen))["SGLang manager (its cudaHostRegister)"] == 0
    assert sglang_hosting(_sglang_cell(WAN_RERUN)) == ["blocks: 40/40 pinned (SGLang's plan)"]
    assert sglang_hosting(_sglang_cell(WAN)) == ["blocks: 40 layers; no hosting recorded"]  # before layer_hosting
    harness = next(r for r in cell_records(QWEN) if r.backend == "harness")
    assert sglang_hosting(harness) == []


def test_a_record_with_sglang_counters_shows_their_bytes_in_sglangs_colour() -> None:
    counted = _counted(_sglang_cell(QWEN))
    assert sglang_hosting(counted) == ["transformer_blocks: 49/60 pinned, 11 pageable (31.0 GiB pinned, "
                                       "7.0 GiB pageable)"]
    stack = {who: (pinner, b) for who, pinner, b in pinned_by_whom(counted)}
    assert stack["SGLang manager (its cudaHostRegister)"] == ("sglang", 49 * LAYER)
    assert [backend_style(pinner)[0] for _, _, pinner in PINNERS] == [
        backend_style("harness")[0], backend_style("diffusers-group")[0], backend_style("sglang@0.5.23")[0]]
    diffusers = next(r for r in cell_records(QWEN) if r.backend == "diffusers-group" and not r.same_as
                     and r.requested.dit_layerwise_offload)
    assert dict((who, b) for who, _, b in pinned_by_whom(diffusers))["torch caching host allocator"] > 60e9


def test_the_figure_stays_within_a_screen_for_many_cells() -> None:
    cells = []
    for i in range(12):
        for r in [*cell_records(QWEN), _counted(_sglang_cell(QWEN))]:
            r = copy.deepcopy(r)
            r.cell_id, r.same_as = f"{r.cell_id}-{i}", None
            cells.append(r)
    png = host_memory_png(cells, "many cells")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(BytesIO(png)).shape[0] <= MAX_HEIGHT_IN * 110 + 1


def test_the_page_has_a_host_memory_figure_per_scenario_and_card() -> None:
    recs = cell_records(QWEN) + cell_records(WAN)
    page = render_html(recs, "h200 peers", plots=True)
    pairs = {(str(r.scenario), str(r.card_name)) for r in recs}
    for s, c in pairs:
        section = page.index(f'<h2 id="s-{s}"')
        at = page.index(f'alt="{s} on {c}: host memory"')
        following = page.find("<h2", section + 1)
        assert section < at and (following == -1 or at < following)
