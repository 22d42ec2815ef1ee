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

from harness.analyze.expect import ScenarioVerdicts
from harness.analyze.frontier import frontier_rows, mib_text
from harness.analyze.roofline import roofline_rows
from harness.common.contract import (
    PHASES,
    STEP_CONVENTION,
    CellRecord,
    is_probe,
    label_in,
)
from harness.common.records import by_gpu
from harness.plan.planner import plan_rows


def _flag_diff(record: CellRecord) -> str:
    """The effective flags the policy changed (prefetch aside), by name, in their JSON form."""
    req, eff = record.requested.as_dict(), record.effective.as_dict()
    changed = [f"{k}={eff[k]}" for k in sorted(eff) if req[k] != eff[k] and k != "dit_offload_prefetch_size"]
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
        f"load peak MiB ({'alloc reserved' if cuda else 'ledger'})": mib_text(peaks.load),
        f"runtime peak MiB ({'alloc reserved' if cuda else 'ledger'})": mib_text(peaks.runtime),
    }
    if cuda:
        row["peak MiB (alloc allocated)"] = mib_text(rec.phase_max("alloc_peak_allocated_bytes"))
        row["peak MiB (NVML per-process)"] = mib_text(rec.phase_max("nvml_proc_peak_bytes"))
    row["pinned host MiB (requested)"] = mib_text(rec.phase_max("pinned_requested_bytes"))
    if cuda:  # pin_memory() blocks, rounded up to powers of two: where diffusers' group offload pins its copies
        row["pinned host MiB (torch allocator)"] = mib_text(rec.phase_max("pinned_torch_allocator_bytes"))
    row["host RSS peak MiB"] = mib_text(rec.phase_max("rss_peak_bytes"))
    for p in PHASES:
        ms = stats.time_ms if (stats := rec.phases.get(p)) else None
        row[f"{p} ms"] = "" if ms is None else f"{ms:,.0f}"
    steady, first = rec.steady_step_ms(), rec.first_step_ms()
    row[f"denoise ms/step ({STEP_CONVENTION})"] = "" if steady is None else f"{steady:,.0f}"
    row["denoise first step ms"] = "" if first is None else f"{first:,.0f}"
    return row


def render(records: list[CellRecord], title: str = "offload-bench run", summary: Any = None) -> str:
    """The markdown report: title, machine line, summary (`harness.analyze.summary`, the run's verdicts in it;
    built here, with the SKU's committed baseline, unless given), then one section per scenario. It renders what
    it is given: plans are the records' (`record.plan`), verdicts the summary's."""
    from harness.analyze.summary import build_summary, summary_markdown

    s = summary if summary is not None else build_summary(records)
    out = [f"# {title}", "", *_machine_line(records)]
    out += summary_markdown(s)
    out += gpus_section(records)
    # a merged run of shards (harness.run.merge): each row says where it ran, as host and GPU id
    several_hosts = len({r.host for r in records}) > 1
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
        out += _verdict_lines(s.of_scenario(str(name)))
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


def _verdict_lines(judged: ScenarioVerdicts | None) -> list[str]:
    """A scenario's verdicts (none where the run's checkout has not its file)."""
    if judged is None:
        return []
    if judged.not_evaluated:
        return [f"(expectations not evaluated: {judged.not_evaluated})", ""]
    out = []
    for v in judged.verdicts:
        if v.latents_elsewhere:  # every problem a latents file left on the GPU machine; others stay FAIL
            steps = "; ".join(STEP_RATIO.findall(v.message))  # cfg_batch's step times are in the records
            out.append(f"- **{v.check}** on {v.card}: not re-evaluated here: the latents files stay on "
                       "the machine that ran the cells (its pytest output has the verdict)"
                       + (f"; {steps}" if steps else ""))
            continue
        note = f" (expected to fail: {judged.xfail})" if judged.xfail else ""
        out.append(f"- **{v.check}** on {v.card}: {'PASS' if v.passed else 'FAIL'}{note}: {v.message}")
    return [*out, ""]


def machine_label(record: CellRecord) -> str:
    """`host` or `host GPU <id>`, and the shard the record came from, for a run that several machines made."""
    gpu = record.gpu_index
    shard = f" (shard {record.shard})" if record.shard else ""
    return f"{record.host or '?'}{f' GPU {gpu}' if gpu is not None else ''}{shard}"


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
