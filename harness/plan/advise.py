"""Which offload flags for my card? Every flag combination planned (or looked up in committed records), ranked.

`offload-bench advise --model M --card C [--resolution WxH --frames N --cfg X]` resolves each combination of the
DiT, text-encoder and VAE switches and a few prefetch sizes under the policy (SGLang's, by default), plans it
(`harness.plan.planner`), and sorts the combinations into those that fit with a safety margin (ranked by step time),
those that fit only within the margin, and those that do not fit (with the phase that would run out of memory).
When a committed record ran the same model, card, workload and effective flags, its measured fate, peak and step
time replace the plan's, and the row says so.

pin_cpu_memory is left on: pageable copies never lower the device peak and stream 8x slower (H100: 6.7 against
54 GB/s). This module imports no torch.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.common.contract import Backend, CellRecord, Status
from harness.common.flags import FlagError, OffloadFlags
from harness.common.records import latest_by_cell, read_cell_records
from harness.common.units import GIB
from harness.models import get_model
from harness.plan.paste import SGLANG_VERSION, diffusers_calls, sglang_flags
from harness.plan.planner import Machine, Plan, Workload, machine_profile, measured, plan
from harness.policy import EngineContext, resolve

PREFETCH_SIZES = (1, 2, 4, 8)
RESIDENT_SHARES = (0.0, 0.25, 0.5, 0.75)  # dit_layerwise_resident_layers as a fraction of each group
DEFAULT_MARGIN = 0.05  # of the card's memory: allocator blocks the plan does not see (up to +8 % measured: FLUX)


def combinations(prefetch_sizes: Iterable[int] = PREFETCH_SIZES,
                 resident_shares: Iterable[float] = (0.0,)) -> list[OffloadFlags]:
    """The requested combinations advise considers: every on/off of the four component switches, and under DiT
    layerwise offload each prefetch size (whole layers) and each share of resident layers (both residency
    policies where the share is not 0)."""
    out = []
    for lw, cpu, te, vae in itertools.product((False, True), repeat=4):
        for pf in (prefetch_sizes if lw else (0,)):
            for share in (resident_shares if lw else (0.0,)):
                for policy in (("leading", "strided") if share else ("leading",)):
                    out.append(OffloadFlags(
                        dit_cpu_offload=cpu, dit_layerwise_offload=lw, text_encoder_cpu_offload=te,
                        vae_cpu_offload=vae, dit_offload_prefetch_size=float(pf), pin_cpu_memory=True,
                        dit_layerwise_resident_layers=float(share), dit_layerwise_residency_policy=policy))
    return out


@dataclass(frozen=True)
class Measurement:
    """What a committed record of the same cell measured."""

    source: str  # records file
    status: str
    failed_phase: str | None
    peak_device_bytes: int | None  # NVML per-process peak
    step_s: float | None


@dataclass(frozen=True)
class Option:
    requested: OffloadFlags
    plan: Plan
    messages: tuple[str, ...]
    measurement: Measurement | None = None

    @property
    def peak_device_bytes(self) -> int:
        if self.measurement is not None and self.measurement.peak_device_bytes and self.measurement.status == "ok":
            return self.measurement.peak_device_bytes
        return self.plan.peak_device_bytes

    @property
    def step_s(self) -> float | None:
        if self.measurement is not None and self.measurement.step_s is not None:
            return self.measurement.step_s
        return self.plan.step_s

    @property
    def runs(self) -> bool:
        if self.measurement is not None:
            return self.measurement.status == "ok"
        return self.plan.fits

    @property
    def oom_line(self) -> str | None:
        m = self.measurement
        if m is not None and m.status == "oom":
            planned = f"; plan: {self.plan.oom_line()}" if self.plan.oom_line() else "; the plan says it fits"
            return f"ran out of memory in {m.failed_phase} (measured, {m.source}{planned})"
        return None if self.runs else self.plan.oom_line()

    def within(self, cap_bytes: int | None, margin: float) -> bool:
        return self.runs and (cap_bytes is None or self.peak_device_bytes <= cap_bytes * (1 - margin))


@dataclass(frozen=True)
class Advice:
    model: str
    card: str
    cap_bytes: int | None
    workload: Workload
    margin: float
    machine: Machine
    policy: str
    options: tuple[Option, ...]
    refused: tuple[str, ...]  # combinations the policy refuses, with why
    records_source: str = ""  # where measured rows were looked for: the glob and how many files it matched

    @property
    def fitting(self) -> list[Option]:
        """Fit with the margin, fastest first (ties: lower peak)."""
        ok = [o for o in self.options if o.within(self.cap_bytes, self.margin)]
        return sorted(ok, key=lambda o: (o.step_s if o.step_s is not None else float("inf"), o.peak_device_bytes))

    @property
    def tight(self) -> list[Option]:
        """Fit the card, but not with the margin."""
        return [o for o in self.options if o.runs and not o.within(self.cap_bytes, self.margin)]

    @property
    def not_fitting(self) -> list[Option]:
        return [o for o in self.options if not o.runs]

    @property
    def fastest(self) -> Option | None:
        return self.fitting[0] if self.fitting else None

    @property
    def lowest_memory(self) -> Option | None:
        fits = self.fitting
        return min(fits, key=lambda o: (o.peak_device_bytes, o.step_s or 0)) if fits else None


def measurements(model: str, card: str, workload: Workload,
                 records_glob: str | None) -> dict[tuple[tuple[str, Any], ...], Measurement]:
    """Committed records of `model` on `card` with this workload, by effective flags: the newest record of the
    combination across all files (by `created`), except that a completed record without a steady step (a capacity
    probe's single step) gives way to the newest completed one with a step; harness backend only."""
    if not records_glob:
        return {}
    found: dict[tuple[tuple[str, Any], ...], list[tuple[str, str, CellRecord, float | None]]] = {}
    for path in sorted(glob.glob(records_glob, recursive=True)):
        for r in latest_by_cell(read_cell_records(Path(path)).records).values():
            if r.model != model or r.card_name != card or r.device != "cuda" or r.backend != Backend.HARNESS \
                    or r.status not in (Status.OK, Status.OOM):
                continue
            if r.settings is None or Workload.of(r.settings, r.run_options) != _same_steps(workload, r):
                continue
            found.setdefault(_key(r.effective), []).append((r.created or "", path, r, measured(r).step_s))
    out = {}
    for key, candidates in found.items():
        _, path, r, step = max(candidates, key=lambda c: c[0])
        stepped = [c for c in candidates if c[2].status is Status.OK and c[3] is not None]
        if r.status is Status.OK and step is None and stepped:
            _, path, r, step = max(stepped, key=lambda c: c[0])
        out[key] = Measurement(path, str(r.status), r.failed_phase, r.phase_max("nvml_proc_peak_bytes", r.phases),
                               step)
    return out


def _same_steps(workload: Workload, record: CellRecord) -> Workload:
    """The step count does not change a step's cost: match records whatever their steps."""
    steps = record.settings.steps if record.settings is not None else None
    return replace(workload, steps=int(steps) if steps else workload.steps)


def _key(flags: OffloadFlags) -> OffloadFlags:
    """A combination as a dict key, by what runs: the flags with the layerwise selection reduced to the streamed
    non-DiT roles, since the DiT's streaming is `dit_layerwise_offload` and the image encoder selects nothing in
    the zoo (so records from before the selection was recorded match too)."""
    chosen = set(flags.layerwise_offload_components or ())
    roles = {"text_encoder", "vae"} if "all" in chosen else chosen & {"text_encoder", "vae"}
    return replace(flags, layerwise_offload_components=tuple(sorted(roles)))


def advise(model: str, card: str, cap_bytes: int | None, workload: Workload, *, policy: str = "sglang",
           margin: float = DEFAULT_MARGIN, machine: Machine | None = None, resident_layers: int | None = None,
           records_glob: str | None = None) -> Advice:
    spec = get_model(model)
    machine = machine or machine_profile()
    context = EngineContext.for_model(spec.family, spec.edit, (cap_bytes or 80 * GIB) / GIB, spec.name)
    seen: set[OffloadFlags] = set()
    options, refused = [], []
    measured_cells = measurements(model, card, workload, records_glob)
    # the prefetch sizes and resident layers that committed records ran, too, so that their measurements have a
    # row to go to
    streamed = [k.as_dict() for k in measured_cells if k.dit_layerwise_offload]
    prefetch = sorted({*PREFETCH_SIZES, *(int(f["dit_offload_prefetch_size"]) for f in streamed
                                          if f["dit_offload_prefetch_size"] >= 1)})
    shares = sorted({*RESIDENT_SHARES, *(f["dit_layerwise_resident_layers"] for f in streamed)})
    if resident_layers is not None:
        shares = [0.0]  # an explicit count replaces the sweep
    for requested in combinations(prefetch, shares):
        try:
            resolution = resolve(requested, policy, context)
        except FlagError as e:
            refused.append(f"{requested.label()}: {e}")
            continue
        effective = resolution.effective
        if effective in seen:  # the policy turned it into a combination already listed
            continue
        seen.add(effective)
        p = plan(model, effective, cap_bytes, workload, card=card, machine=machine, resident_layers=resident_layers)
        options.append(Option(requested, p, resolution.messages,
                              measured_cells.get(_key(effective))))
    files = len(glob.glob(records_glob, recursive=True)) if records_glob else 0
    source = f"{records_glob} ({files} files)" if records_glob else "none (--records '')"
    return Advice(model, card, cap_bytes, workload, margin, machine, policy, tuple(options), tuple(refused), source)


# --------------------------------------------------------------------------------------------------- output


def describe(flags: OffloadFlags) -> str:
    """'dit_cpu_offload + layerwise (prefetch 4) + text_encoder_cpu_offload', or 'all resident'."""
    parts = []
    if flags.dit_layerwise_offload:
        parts.append(("dit_cpu_offload + " if flags.dit_cpu_offload else "")
                     + f"layerwise (prefetch {flags.dit_offload_prefetch_size:g})")
    elif flags.dit_cpu_offload:
        parts.append("dit_cpu_offload")
    if flags.text_encoder_cpu_offload:
        parts.append("text_encoder_cpu_offload")
    if flags.vae_cpu_offload:
        parts.append("vae_cpu_offload")
    text = " + ".join(parts) or "all resident"
    if flags.dit_layerwise_offload and flags.dit_layerwise_resident_layers:
        text += f", {flags.dit_layerwise_resident_layers:g} of the layers kept ({flags.dit_layerwise_residency_policy})"
    if flags.dit_layerwise_offload and not flags.dit_cpu_offload:
        text += " (without dit_cpu_offload)"
    return text


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def _source(o: Option) -> str:
    m = o.measurement
    if m is None:
        return "plan"
    planned_step = "; step planned" if m.status == "ok" and m.step_s is None else ""
    return f"measured ({Path(m.source).name}{planned_step})"


def _row(o: Option) -> list[Any]:
    source = _source(o)
    p = o.plan
    return [describe(o.plan.flags), _gib(p.load_peak_bytes), _gib(p.runtime_peak_bytes), _gib(o.peak_device_bytes),
            "-" if o.step_s is None else f"{o.step_s:.3f}", p.bound or "-", _gib(p.host_pinned_bytes), source]


MAX_ROWS = 20  # rows of the table of combinations that fit, with --all
PICKS = 5  # the pick and the next few: what advise shows by default
HEADERS = ["flags (effective)", "load GiB", "runtime GiB", "peak device GiB", "step s", "bound",
           "pinned host GiB", "numbers"]
ENGINES = ("sglang", "diffusers")


def paste(o: Option | OffloadFlags, engine: str = "sglang", family: str = "") -> list[str]:
    """The lines a person pastes for a combination: SGLang's CLI flags, or the diffusers calls."""
    flags = o.plan.flags if isinstance(o, Option) else o
    if engine == "diffusers":
        return diffusers_calls(flags, family)
    return [sglang_flags(flags)]


def _paste_block(options: list[Option], engine: str, family: str, first: int = 1) -> list[str]:
    where = (f"SGLang {SGLANG_VERSION} CLI (sglang serve --model-path ... <flags>)" if engine == "sglang"
             else "diffusers calls on a loaded pipeline `pipe`")
    out = [f"flags to paste ({where}):"]
    for i, o in enumerate(options, first):
        lines = paste(o, engine, family)
        out.append(f"  {i:>2}  {lines[0]}")
        out += [f"      {line}" for line in lines[1:]]
    return out


def _ranked(options: list[Option], first: int = 1) -> str:
    from tabulate import tabulate

    return tabulate([[i, *_row(o)] for i, o in enumerate(options, first)], ["#", *HEADERS], tablefmt="simple")


def header(advice: Advice) -> list[str]:
    """The lines that say what was asked and where the step times come from."""
    a = advice
    cap = "no cap" if a.cap_bytes is None else f"{a.cap_bytes / GIB:.2f} GiB"
    w = a.workload
    lines = [
        f"advise: {a.model} on {a.card} ({cap}), {w.width}x{w.height}"
        + (f"x{w.frames} frames" if w.frames > 1 else "")
        + f", {w.dit_calls_per_step} DiT call(s)/step, policy {a.policy}, safety margin {a.margin:.0%}",
        f"machine for step times: {a.machine.name} (pinned H2D {a.machine.pinned_h2d_gbps} GB/s; {a.machine.source})",
    ]
    if a.card != a.machine.name:
        lines.append(f"no step profile for {a.card}: step times are for the profile's GPU ({a.machine.name}) "
                     f"with {a.card}'s memory; --machine picks another profile, --pcie gen4|gen5 the card's link")
    lines += ["peaks: allocator reserved (load, runtime) and device = reserved + CUDA context (NVML per process)",
              f"measured rows from: {a.records_source}", ""]
    measured_rows = sum(o.measurement is not None for o in a.options)
    if measured_rows:
        lines.append(f"{measured_rows} combination(s) use measured numbers from committed records of this model, "
                     "card and workload (column 'numbers').")
    else:
        lines.append("no committed record of this model, card and workload: every number is the plan's.")
    return lines


def render(advice: Advice, all_rows: bool = False, engine: str = "sglang", family: str = "") -> str:
    """The answer: by default the pick and the next few with the flags to paste, and one line each on what else
    there is; `all_rows`: every combination (fits, fits within the margin, does not fit)."""
    from tabulate import tabulate

    a = advice
    lines = header(a)
    if a.fastest is not None:
        lines.append(f"fastest that fits:  {describe(a.fastest.plan.flags)}  "
                     f"({a.fastest.step_s:.3f} s/step, peak {_gib(a.fastest.peak_device_bytes)} GiB, "
                     f"{_source(a.fastest)})"
                     if a.fastest.step_s is not None else f"fits: {describe(a.fastest.plan.flags)}")
    if a.lowest_memory is not None:
        lines.append(f"lowest memory:      {describe(a.lowest_memory.plan.flags)}  "
                     f"(peak {_gib(a.lowest_memory.peak_device_bytes)} GiB, {_source(a.lowest_memory)})")
    if a.fastest is None:
        lines.append("nothing fits with the margin")
    fitting = a.fitting
    shown = fitting if all_rows else fitting[:PICKS]
    if shown:
        title = ("fits (fastest first):" if all_rows else
                 f"the pick and the next {len(shown) - 1} (of {len(fitting)} that fit; --all for every row):")
        lines += ["", title, _ranked(shown), "", *_paste_block(shown, engine, family)]
        if not all_rows and a.lowest_memory is not None and a.lowest_memory not in shown:
            lines += ["", f"lowest memory: {describe(a.lowest_memory.plan.flags)}",
                      *_paste_block([a.lowest_memory], engine, family, fitting.index(a.lowest_memory) + 1)]
    else:
        lines += ["", "fits: none"]
    if all_rows:
        if a.tight:
            lines += ["", f"fits, but within the {a.margin:.0%} margin (risky):",
                      tabulate([_row(o) for o in a.tight], HEADERS, tablefmt="simple")]
        lines += ["", "does not fit:"]
        lines += [f"  {describe(o.plan.flags)}: {o.oom_line}" for o in a.not_fitting] or ["  none"]
    else:
        lines += ["", f"{len(fitting)} fit, {len(a.tight)} fit only within the {a.margin:.0%} margin, "
                  f"{len(a.not_fitting)} do not fit (--all for every row)"]
    notes = sorted({n for o in a.options for n in o.plan.notes})
    if notes:
        lines += ["", *[f"note: {n}" for n in notes]]
    if a.refused:
        lines += ["", f"{len(a.refused)} combination(s) refused by the policy (first: {a.refused[0]})"]
    return "\n".join(lines) + "\n"
