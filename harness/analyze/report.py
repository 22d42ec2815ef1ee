"""Markdown report of a run's records: one table per scenario, every memory column labelled with its counter.

`render` gives the markdown alone; `write_report` writes it with PNG plots next to it (`harness.analyze.plots`): per
scenario and card, peak memory against denoise latency with the Pareto front and the card's cap, and each cell's
memory over time (NVML per-process, host RSS, phases shaded). The markdown links the PNGs by relative path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.analyze.expect import evaluate
from harness.analyze.roofline import roofline_rows
from harness.common.contract import (
    PHASES,
    RUNTIME_PHASES,
    STEP_CONVENTION,
    CellRecord,
    JsonObject,
    Status,
    is_probe,
    label_in,
)
from harness.common.locations import scenarios_dir
from harness.common.records import by_gpu
from harness.common.units import MIB
from harness.plan.planner import plan_rows
from harness.plan.scenario import ScenarioError, load_scenario
from harness.run.merge import host_of


def _mib(v: Any) -> str:
    return "" if v is None else f"{v / MIB:,.0f}"


def _flag_diff(record: CellRecord) -> str:
    req, eff = record.requested, record.effective
    changed = [f"{k}={eff[k]}" for k in eff if req.get(k) != eff.get(k) and k != "dit_offload_prefetch_size"]
    return ", ".join(changed) or "as requested"


def cell_row(rec: CellRecord) -> dict[str, str]:
    """One row of a scenario's table: a markdown table's cells, by column header."""
    peaks = rec.peaks
    cuda = rec.device == "cuda"
    row = {
        "card": rec.card_name or "",
        "requested": rec.label,
        "effective": _flag_diff(rec),
        "status": rec.fate + (f" [same as {label_in(rec.same_as)}]" if rec.same_as else ""),
        f"load peak MiB ({'alloc reserved' if cuda else 'ledger'})": _mib(peaks.load),
        f"runtime peak MiB ({'alloc reserved' if cuda else 'ledger'})": _mib(peaks.runtime),
    }
    if cuda:
        row["peak MiB (alloc allocated)"] = _mib(rec.phase_max("alloc_peak_allocated_bytes"))
        row["peak MiB (NVML per-process)"] = _mib(rec.phase_max("nvml_proc_peak_bytes"))
    row["pinned host MiB (requested)"] = _mib(rec.phase_max("pinned_requested_bytes"))
    if cuda:  # pin_memory() blocks, rounded up to powers of two: where diffusers' group offload pins its copies
        row["pinned host MiB (torch allocator)"] = _mib(rec.phase_max("pinned_torch_allocator_bytes"))
    row["host RSS peak MiB"] = _mib(rec.phase_max("rss_peak_bytes"))
    for p in PHASES:
        ms = stats.time_ms if (stats := rec.phases.get(p)) else None
        row[f"{p} ms"] = "" if ms is None else f"{ms:,.0f}"
    steady, first = rec.steady_step_ms(), rec.first_step_ms()
    row[f"denoise ms/step ({STEP_CONVENTION})"] = "" if steady is None else f"{steady:,.0f}"
    row["denoise first step ms"] = "" if first is None else f"{first:,.0f}"
    return row


def _fits(record: CellRecord) -> bool:
    """Ran to the end, and (where NVML measured it under a card cap) its per-process peak stayed within the cap."""
    return record.status is Status.OK and (record.cap or {}).get("within_cap") is not False


def frontier_rows(records: list[CellRecord]) -> list[dict[str, str | float]]:
    """Peak against step time, per card: every cell that ran (one row per distinct run), sorted by runtime peak,
    with the Pareto front (no other cell that ran is both lower in runtime peak and faster per median steady
    step) and the fastest cell that fits its card marked. A cell with resident DiT layers also shows its step
    against the cell with none and otherwise the same effective flags."""
    ran = [r for r in records if r.status is Status.OK and not r.same_as and r.median_step_s()]
    rows = []
    for card in dict.fromkeys(r.card_name for r in ran):
        mine = [r for r in ran if r.card_name == card]
        peak = {id(r): r.peaks.runtime for r in mine}
        step = {id(r): r.median_step_s() or 0.0 for r in mine}
        fastest = min((r for r in mine if _fits(r)), key=lambda r: step[id(r)], default=None)
        for r in sorted(mine, key=lambda r: (peak[id(r)] or 0, step[id(r)])):
            dominated = any(peak[id(o)] is not None and peak[id(r)] is not None and peak[id(o)] <= peak[id(r)]
                            and step[id(o)] <= step[id(r)] and (peak[id(o)], step[id(o)]) != (peak[id(r)], step[id(r)])
                            for o in mine)
            base = _resident_zero_twin(r, mine)
            cuda = r.device == "cuda"
            rows.append({
                "card": card,
                "cell": r.label,
                f"runtime peak MiB ({'alloc reserved' if cuda else 'ledger'})": _mib(peak[id(r)]),
                "runtime peak MiB (NVML per-process)": _mib(r.phase_max("nvml_proc_peak_bytes", RUNTIME_PHASES)),
                "step s (median, steady)": round(step[id(r)], 3),
                "vs resident 0": "" if base is None else f"{step[id(base)] / step[id(r)]:.2f}x faster"
                if step[id(r)] < step[id(base)] else f"{step[id(r)] / step[id(base)]:.2f}x slower",
                "frontier": "yes" if not dominated else "",
                "fastest that fits": "**fastest**" if r is fastest else "",
            })
    return rows


def _resident_zero_twin(record: CellRecord, records: list[CellRecord]) -> CellRecord | None:
    if not record.effective.get("dit_layerwise_resident_layers"):
        return None
    drop = ("dit_layerwise_resident_layers", "dit_layerwise_residency_policy")

    def rest(r: CellRecord) -> JsonObject:
        return {k: v for k, v in r.effective.items() if k not in drop}

    return next((o for o in records if not o.effective.get("dit_layerwise_resident_layers")
                 and rest(o) == rest(record) and o.backend == record.backend), None)


def render(records: list[CellRecord], title: str = "offload-bench run", summary: Any = None) -> str:
    """The markdown report: title, machine line, summary (`harness.analyze.summary`; built here, with the SKU's
    committed baseline, unless given), then one section per scenario."""
    from harness.analyze.summary import build_summary, summary_markdown

    out = [f"# {title}", "", *_machine_line(records)]
    out += summary_markdown(summary if summary is not None else build_summary(records))
    out += gpus_section(records)
    # a merged run of shards (harness.run.merge): each row says where it ran, as host and GPU id
    several_hosts = len({host_of(r) for r in records}) > 1
    by_scenario: dict[str | None, list[CellRecord]] = {}
    for r in records:
        by_scenario.setdefault(r.scenario, []).append(r)
    for name, recs in by_scenario.items():
        out += [f"## {name}", ""]
        rows = [cell_row(r) | ({"machine": machine_label(r)} if several_hosts else {}) for r in recs]
        out.append(tabulate(rows, headers="keys", tablefmt="github"))
        out.append("")
        front = frontier_rows(recs)
        if len(front) > 1:
            out += ["Peak against step time (runtime peak: max over encode/denoise/decode; step: median denoise "
                    "step, the first left out; frontier: no other cell both lower and faster; **fastest**: the "
                    "fastest cell that ran within its card):", ""]
            out += [tabulate(front, headers="keys", tablefmt="github"), ""]
        roof = roofline_rows(recs)
        if roof:
            out += ["Layerwise roofline (harness.analyze.roofline: predicted step = forwards x max(resident compute "
                    "per forward, streamed bytes / same-run pinned H2D probe)):", ""]
            out += [tabulate(roof, headers="keys", tablefmt="github"), ""]
        planned = plan_rows(recs)
        if planned:
            out += ["Plan vs measured (harness.plan.planner; allocator reserved peaks, median steady step; error = "
                    "measured / planned - 1; a phase that ran out of memory measured the cap, not the need):", ""]
            out += [tabulate(planned, headers="keys", tablefmt="github"), ""]
        messages = sorted({m for r in recs for m in r.messages})
        if messages:
            out.append("Policy messages: " + "; ".join(f"`{m}`" for m in messages))
            out.append("")
        out += _verdict_lines(recs)
    out.append(
        "Counters: `alloc reserved`/`alloc allocated` are PyTorch caching-allocator peaks (reset per phase); "
        "`NVML per-process` is polled every 10 ms and includes the CUDA context; `ledger` is weight bytes the "
        "harness placed on the device (the CPU profile's only device counter). A cell that ran out of memory "
        "needed more than its card, whatever its last measured peak."
    )
    return "\n".join(out) + "\n"


def _machine_line(records: list[CellRecord]) -> list[str]:
    machines = {(r.machine or {}).get("gpu") or "cpu" for r in records}
    first = next((r for r in records if r.machine), None)
    if not first or not first.machine:
        return []
    m = first.machine
    known = [f"{k} {m[k]}" for k in ("torch", "diffusers", "driver") if m.get(k)]  # only what was measured
    if m.get("pcie_gen") and m.get("pcie_width"):
        known.append(f"PCIe gen {m['pcie_gen']} x{m['pcie_width']}")
    if m.get("pinned_h2d_gbps"):
        known.append(f"pinned H2D probe {m['pinned_h2d_gbps']} GB/s")
    run = ", ".join(x for x in (first.run_id and f"Run {first.run_id}", first.git_sha and f"git {first.git_sha}")
                    if x)
    line = f"Machine: {', '.join(sorted(machines))}" + (f"; {', '.join(known)}" if known else "") + "."
    return [line + (f" {run}." if run else ""), ""]


STEP_RATIO = re.compile(r"step [0-9.]+ s vs [0-9.]+ s two-pass \([0-9.]+x\)")  # cfg_batch's note on each pair


def _verdict_lines(recs: list[CellRecord]) -> list[str]:
    """The scenario's expectations evaluated on one scenario's records, when its file is at hand."""
    scen_file = next((r.scenario_file for r in recs if r.scenario_file), None)
    scen_path = _local_scenario_file(scen_file)
    if scen_path is None:
        return []
    try:
        scenario = load_scenario(scen_path)
    except ScenarioError as e:
        return [f"(expectations not evaluated: {e})", ""]
    out = []
    ran_cards = {r.card_name for r in recs}
    for v in evaluate(scenario, recs):
        if v.card not in ran_cards:  # a run of part of the scenario (pytest -k)
            continue
        if v.latents_elsewhere:  # every problem a latents file left on the GPU machine; others stay FAIL
            steps = "; ".join(STEP_RATIO.findall(v.message))  # cfg_batch's step times are in the records
            out.append(f"- **{v.check}** on {v.card}: not re-evaluated here: the latents files stay on "
                       "the machine that ran the cells (its pytest output has the verdict)"
                       + (f"; {steps}" if steps else ""))
            continue
        note = f" (expected to fail: {scenario.xfail})" if scenario.xfail else ""
        out.append(f"- **{v.check}** on {v.card}: {'PASS' if v.passed else 'FAIL'}{note}: {v.message}")
    return [*out, ""]


def machine_label(record: CellRecord) -> str:
    """`host` or `host GPU <id>`, and the shard the record came from, for a run that several machines made."""
    gpu = record.gpu_index
    shard = f" (shard {record.shard})" if record.shard else ""
    return f"{host_of(record) or '?'}{f' GPU {gpu}' if gpu is not None else ''}{shard}"


def _local_scenario_file(recorded: str | None) -> Path | None:
    """The scenario file a record names, as this checkout has it: the same path under this checkout's scenarios
    folder first, else the recorded path itself; None if neither exists.

    This checkout's copy first, because a recorded absolute path can name another checkout's working copy: the GPU
    box runs in /work/main, so a worktree elsewhere on this machine evaluated its reports against main's files."""
    if not recorded:
        return None
    path = Path(recorded)
    if "scenarios" in path.parts:
        local = scenarios_dir() / Path(*path.parts[path.parts.index("scenarios") + 1:])
        if local.exists():
            return local
    return path if path.exists() else None


def gpus_section(records: list[CellRecord]) -> list[str]:
    """Per-GPU cell counts and wall time (`results.by_gpu`), for a run spread over GPUs by pytest-xdist (any
    record with an xdist worker, or cells on more than one GPU); nothing for a plain one-process run."""
    groups = by_gpu(records)
    spread = any(r.xdist_worker for r in records) or len([k for k in groups if k is not None]) > 1
    if not spread:
        return []
    rows = [
        {
            "GPU (CUDA_VISIBLE_DEVICES)": "cpu" if key is None else key,
            "name": g.gpu or "",
            "NVML uuid": g.gpu_uuid or "",
            "xdist workers": ", ".join(g.workers),
            "cells run": g.cells,
            "copies (same_as)": g.copies,
            "wall s (sum)": f"{g.wall_s:,.1f}",
            "fates": ", ".join(f"{k} {v}" for k, v in sorted(g.statuses.items())),
        }
        for key, g in groups.items()
    ]
    return ["## GPUs", "", tabulate(rows, headers="keys", tablefmt="github"), ""]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "x"


def report_paths(out: Path | str) -> Path:
    """The markdown file for `--out`: a path ending in .md is the file; anything else is a folder (report.md)."""
    out = Path(out)
    return out if out.suffix.lower() == ".md" else out / "report.md"


def groups(records: list[CellRecord]) -> dict[tuple[str, str], list[CellRecord]]:
    """Records by (scenario, card), in the order they first appear."""
    out: dict[tuple[str, str], list[CellRecord]] = {}
    for r in records:
        out.setdefault((str(r.scenario), str(r.card_name)), []).append(r)
    return out


def plot_paths(records: list[CellRecord], folder: Path, stem: str) -> dict[tuple[str, str], dict[str, Path]]:
    """Where the two PNGs of each scenario and card go: '<stem>-<scenario>-<card>-pareto.png' and '...-memory.png'
    (without the stem where the scenario name starts with it)."""
    out = {}
    used: set[str] = set()
    for scenario, card in groups(records):
        if is_probe(scenario):  # one cell per capacity probe: the capacity table is its picture, not 2 PNGs a probe
            continue
        # a report named after its scenario (results/h100/<scenario>.md) does not repeat the name
        base = f"{_slug(scenario)}-{_slug(card)}"
        base = base if base.startswith(f"{stem}-") else f"{stem}-{base}"
        while base in used:
            base += "-x"
        used.add(base)
        out[(scenario, card)] = {"pareto": folder / f"{base}-pareto.png", "memory": folder / f"{base}-memory.png"}
    return out


def write_plots(records: list[CellRecord], folder: Path, stem: str) -> dict[tuple[str, str], dict[str, Path]]:
    """Draws the PNGs `plot_paths` names, per scenario and card."""
    from harness.analyze.plots import pareto_plot, trace_plot

    by_group = groups(records)
    for (scenario, card), files in (out := plot_paths(records, folder, stem)).items():
        recs = by_group[(scenario, card)]
        pareto_plot(recs, files["pareto"], f"{scenario} on {card}: peak vs denoise")
        trace_plot(recs, files["memory"], f"{scenario} on {card}: memory over time")
    return out


def plots_section(
    plots: dict[tuple[str, str], dict[str, Path]], relative_to: Path, records: list[CellRecord]
) -> str:
    out = ["## Plots", ""]
    scenario = None
    by_group = groups(records)
    for (scen, card), files in plots.items():
        if scen != scenario:
            out += [f"### {scen}", ""]
            scenario = scen
        pareto = files["pareto"].relative_to(relative_to).as_posix()
        memory = files["memory"].relative_to(relative_to).as_posix()
        out += [
            f"**{card}**: peak device memory (the table's peak counter) against denoise ms/step ({STEP_CONVENTION}), "
            "one colour per backend, Pareto front marked, card cap as a horizontal line; host memory per cell (RSS, "
            "pinned); first step against steady state; then each cell's memory over time on one scale (NVML "
            "per-process, host RSS, phases shaded).",
            "",
            f"![{scen} on {card}: peak memory vs ms/step, host memory, step times]({pareto})",
            "",
            f"![{scen} on {card}: memory over time]({memory})",
            "",
        ]
        for r in by_group.get((scen, card), []):
            same = f", same record as `{r.same_as}` (not plotted)" if r.same_as else ""
            out.append(f"- `{r.cell_id}`: {r.fate}{same}")
        out.append("")
    return "\n".join(out)


def write_report(
    records: list[CellRecord], out: Path | str, title: str = "offload-bench run", plots: bool = True,
    summary: Any = None,
) -> list[Path]:
    """Writes the markdown report (and its PNGs next to it); returns the files written, markdown first."""
    md = report_paths(out)
    md.parent.mkdir(parents=True, exist_ok=True)
    text = render(records, title, summary)
    written: list[Path] = []
    if plots:
        made = write_plots(records, md.parent, md.stem)
        text += "\n" + plots_section(made, md.parent, records)
        written += [p for files in made.values() for p in files.values()]
    md.write_text(text, encoding="utf-8")
    return [md, *written]
