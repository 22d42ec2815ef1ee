"""Roofline of layerwise offload: how close a layerwise cell's denoise steps come to what the hardware allows.

Every DiT forward streams all streamed layers from the host once, so a step can be no faster than

    predicted step = forwards x max(compute of one resident forward, streamed bytes / pinned H2D rate)

with forwards the step's DiT calls (`CellRecord.dit_calls_per_step`: its CFG passes, or one where cfg_batch runs
both as one batch; counting a cfg-batch cell's two passes put it at 199 % of its probe's rate,
`results/h200/fidelity-qwen-image.records.jsonl`), the compute time taken from a cell of the same scenario whose DiT
was whole on the device (resident, or CPU-offloaded: it is moved once per denoise phase, not per step) and the H2D
rate from the pinned-copy probe the same child ran at start (`machine.pinned_h2d_gbps`). Efficiency is predicted /
measured; the effective H2D rate is streamed bytes x forwards / measured step time. Both read records only.

Each row names its backend: our layerwise runtime (streamed bytes: its per-layer host regions) or diffusers'
group offload (streamed bytes: the block groups it moves on its stream; the non-block weights it moves
synchronously around each forward are left out of the prediction, so they show as lost efficiency). The
whole-DiT reference is the fastest resident / CPU-offloaded cell of the scenario, whatever its backend (those
cells run the same code under every backend).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness.common.contract import STEP_CONVENTION, CellRecord, Placement, Status

__all__ = ["STEP_CONVENTION", "roofline_rows"]


def _streamed_bytes(dit: dict[str, Any]) -> int | None:
    """Bytes a streamed DiT moves host -> device per forward: our runtime's streamed layer regions (not its
    resident layers), diffusers' groups, or SGLang's managers' host buffers (no resident layers: every layer
    streams every forward)."""
    if dit.get("layerwise"):
        # resident layers move once per pipeline call, not per forward (records from before them: all streamed)
        return dit["layerwise"].get("streamed_bytes", dit["layerwise"]["host_bytes"])
    if dit.get("diffusers_group"):
        return dit["diffusers_group"]["streamed_bytes"]
    if dit.get("sglang_layerwise"):
        groups = dit["sglang_layerwise"]["groups"].values()
        if any(g.get("resident_layers") for g in groups):
            return None  # resident layers stream once per use, not per forward: not this model's shape
        return sum(g["host_bytes"] for g in groups) or None
    return None


def roofline_rows(records: Iterable[CellRecord]) -> list[dict[str, Any]]:
    """One row per streamed-DiT cell that ran (any backend), against the fastest whole-DiT cell of its scenario."""
    ok = [r for r in records if r.status is Status.OK and r.components]
    rows = []
    for r in ok:
        streamed = _streamed_bytes(r.components["dit"])
        measured = r.median_step_s()
        if not streamed or measured is None:
            continue
        whole = [
            s for x in ok
            if x.scenario == r.scenario and Placement(x.components["dit"]["placement"]).whole_on_device
            and (s := x.median_step_s()) is not None
        ]
        forwards = r.dit_calls_per_step  # a cfg-batch cell streams its layers once a step for both passes
        compute_s = min(whole) / forwards if whole else None
        gbps = r.h2d_gbps
        transfer_s = streamed / (gbps * 1e9) if gbps else None
        parts = [v for v in (compute_s, transfer_s) if v is not None]
        predicted = forwards * max(parts) if parts else None
        rows.append({
            "cell": r.cell_id,
            "backend": r.backend,
            "forwards/step": forwards,
            "streamed GB/forward": round(streamed / 1e9, 2),
            "probe H2D GB/s": gbps,
            "resident compute s/forward": None if compute_s is None else round(compute_s, 3),
            "bound": None if not parts else ("transfer" if (transfer_s or 0) >= (compute_s or 0) else "compute"),
            "predicted s/step": None if predicted is None else round(predicted, 3),
            f"measured s/step ({STEP_CONVENTION})": round(measured, 3),
            "efficiency % (predicted/measured)": None if predicted is None else round(100 * predicted / measured, 1),
            "effective H2D GB/s": round(streamed * forwards / measured / 1e9, 2),
            "H2D % of probe": None if not gbps else round(100 * streamed * forwards / measured / 1e9 / gbps, 1),
            "overhead % vs whole-DiT step": None if not whole else round(100 * (measured / min(whole) - 1), 1),
        })
    return rows
