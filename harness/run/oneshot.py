"""`offload-bench run`: your model, your card, one command (issue 29).

    offload-bench run --model <zoo name | pipeline folder> --card <name | NAME=GiB> [--resolution WxH --frames N
                      --steps N --cfg X --dry-run --results DIR]

Plans every combination (`harness.plan.advise`), picks the ones worth measuring (the plan's fastest that fits, the
lowest-memory one, and the engine's default for the card: every switch left unset, resolved by the policy), runs
each as an isolated cell through the runner (one child per cell, as `bench` does), and prints a summary first:
what fits, the measured peak and step of each, the pick and the exact flags to paste. `--dry-run` prints the plan
and the cells it would run. The run folder (RESULTS/runs/<run id>/: records.jsonl, the scenario file, cells/) is a
normal one: `report`, `baseline` and `compare` read it.

On a machine without CUDA the cells run on the CPU with the card's memory simulated, and the plan is made without a
CUDA context (a CPU process has none).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.common.contract import CellRecord
from harness.common.flags import OffloadFlags
from harness.common.units import GIB, MIB
from harness.models.folder import unrunnable
from harness.plan import plan_cli
from harness.plan.advise import Advice, Option, advise, describe, render
from harness.plan.paste import sglang_flags
from harness.plan.scenario import Cell, load_scenario
from harness.policy import EngineContext, resolve

PEAK = {True: "nvml_proc_peak_bytes", False: "ledger_peak_bytes"}  # by "on CUDA"
COUNTER_TEXT = {True: "NVML per process", False: "the weight ledger: a CPU run has no allocator counter"}
UNSET = OffloadFlags(dit_cpu_offload=None, dit_layerwise_offload=None, text_encoder_cpu_offload=None,
                     vae_cpu_offload=None, pin_cpu_memory=None)


def add_command(sub: Any) -> None:
    p = sub.add_parser("run", help="plan every combination for a model (zoo name or pipeline folder) and card, run "
                       "the ones worth measuring, and print the pick with the flags to paste")
    p.add_argument("--model", required=True, help="a zoo model, or a diffusers pipeline folder (model_index.json)")
    p.add_argument("--card", default="native", help="rtx5090-32g, rtx4090-24g, native, or NAME=GIB")
    p.add_argument("--resolution", default=None, help="WIDTHxHEIGHT (default 1024x1024; on CPU 64x64)")
    p.add_argument("--frames", type=int, default=None, help="video frames (video models; default 81, on CPU 5)")
    p.add_argument("--steps", type=int, default=4, help="denoise steps per call (default 4)")
    p.add_argument("--cfg", type=float, default=None, help="true CFG scale (default 4.0, FLUX 1.0)")
    p.add_argument("--policy", default="sglang", help="the policy that resolves the flags (default sglang)")
    p.add_argument("--machine", default=None, help="GPU SKU of the step-time profile")
    p.add_argument("--pcie", choices=("gen3", "gen4", "gen5"), default=None, help="the card's PCIe generation")
    p.add_argument("--results", default="results", help="results folder (default ./results)")
    p.add_argument("--run-id", default=None, help="run id (a folder under RESULTS/runs)")
    p.add_argument("--rounds", type=int, default=1, help="measured rounds per cell (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the cells it would run; run nothing")


def _workload_args(args: argparse.Namespace, device: str) -> argparse.Namespace:
    cpu = device == "cpu"
    return argparse.Namespace(
        model=args.model, resolution=args.resolution or ("64x64" if cpu else "1024x1024"),
        frames=args.frames, cfg=args.cfg, cfg_batch=False, empty_cache=False, machine=args.machine, pcie=args.pcie)


def picks(a: Advice, default: Option | None) -> list[tuple[str, Option]]:
    """The cells worth measuring, each with why: the fastest that fits, the lowest memory, the engine default."""
    out: list[tuple[str, Option]] = []
    for why, o in (("fastest that fits (plan)", a.fastest), ("lowest memory (plan)", a.lowest_memory),
                   ("engine default for the card", default)):
        if o is None:
            continue
        for i, (w, seen) in enumerate(out):
            if seen.plan.flags == o.plan.flags:
                out[i] = (f"{w}; {why}", seen)
                break
        else:
            out.append((why, o))
    return out


def _default_option(a: Advice, requested: OffloadFlags, context: EngineContext, policy: str) -> Option:
    """The engine's default for the card: every switch unset, resolved by the policy, planned."""
    from harness.plan.planner import plan

    resolution = resolve(requested, policy, context)
    found = next((o for o in a.options if o.plan.flags == resolution.effective), None)
    return found or Option(requested, plan(a.model, resolution.effective, a.cap_bytes, a.workload, card=a.card,
                                           machine=a.machine), resolution.messages)


def cmd_run(args: argparse.Namespace) -> int:
    from harness.models import get_model
    from harness.run.cell import run_cell
    from harness.run.folder import Run
    from harness.run.gpus import detect_device

    device = detect_device()
    wargs = _workload_args(args, device)
    if args.steps < 1 or args.rounds < 1:
        raise plan_cli.PlanUsageError("--steps and --rounds: expected counts >= 1")
    card, cap = plan_cli.card_cap(args.card)
    workload = replace(plan_cli.workload_of(wargs), steps=args.steps)
    machine = plan_cli.machine_of(wargs)
    if device == "cpu":
        machine = replace(machine, context_bytes=0, source=f"{machine.source}; no CUDA context (cells run on CPU)")
    spec = get_model(args.model, "--model")
    problem = unrunnable(spec)
    if problem is not None and not args.dry_run:
        raise plan_cli.PlanUsageError(problem)
    context = EngineContext.for_model(spec.family, spec.edit, (cap or 80 * GIB) / GIB, spec.name)
    a = advise(args.model, card, cap, workload, policy=args.policy, machine=machine, records_glob=None)
    chosen = picks(a, _default_option(a, UNSET, context, args.policy))
    print(render(a, family=spec.family), end="")
    print(f"\ncells to run on {device} ({len(chosen)}):")
    for why, o in chosen:
        print(f"  {describe(o.plan.flags)}  [{why}]")
    if args.dry_run:
        if problem:
            print(f"cannot run: {problem}")
        return 0
    run = Run.create(Path(args.results), device, args.run_id)
    scenario = load_scenario(_write_scenario(run.run_dir, args, spec.name, card, cap, workload, device))
    # the engine default runs as a user runs it: every switch unset, the policy deciding for the card
    cells = [Cell(scenario, scenario.cards[0],
                  resolve(UNSET if why == "engine default for the card" else o.requested, args.policy, context))
             for why, o in chosen]
    records = [(why, o, run_cell(run, cell, label=f"[{i}/{len(cells)}]"))
               for i, ((why, o), cell) in enumerate(zip(chosen, cells, strict=True), 1)]
    print(summary(records, run.run_dir, card, cap, device), end="")
    return 0


def _write_scenario(run_dir: Path, args: argparse.Namespace, model: str, card: str, cap: int | None,
                    workload: Any, device: str) -> Path:
    cards = '"native"' if cap is None else f'{{ name = "{card}", mib = {cap / MIB:.6g} }}'
    text = "\n".join([
        f'name = "run-{Path(model).name if "/" in model else model}"'.replace(".", "-"),
        f"model = {json.dumps(model)}",
        f'profile = "{"cpu" if device == "cpu" else "gpu"}"',
        f"cards = [{cards}]",
        f"height = {workload.height}", f"width = {workload.width}", f"frames = {workload.frames}",
        f"steps = {workload.steps}", f"true_cfg_scale = {workload.true_cfg_scale}",
        "warmup = 1", f"rounds = {args.rounds}", f'policy = "{args.policy}"',
        'description = "offload-bench run: the plan\'s picks for this model and card"', "",
    ])
    path = run_dir / "scenario.toml"
    path.write_text(text)
    return path


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MIB:,.0f}"


def summary(records: list[tuple[str, Option, CellRecord]], run_dir: Path, card: str, cap: int | None,
            device: str) -> str:
    """The answer first: what fits (measured), peak and step of each, the pick and the flags to paste."""
    from tabulate import tabulate

    rows = []
    counter = PEAK[device != "cpu"]
    for why, o, r in records:
        peak = r.phase_max(PEAK[device != "cpu"], r.phases) if r.phases else None
        step = r.median_step_s()
        rows.append([describe(o.plan.flags), str(r.status) + (f" in {r.failed_phase}" if r.failed_phase else ""),
                     _mib(peak), "-" if step is None else f"{step:.3f}", _mib(o.plan.peak_device_bytes),
                     "-" if o.plan.step_s is None else f"{o.plan.step_s:.3f}", why])
    ok = [(o, r) for _, o, r in records if str(r.status) == "ok"]
    timed = [(o, r) for o, r in ok if r.median_step_s() is not None]
    pick = min(timed, key=lambda x: x[1].median_step_s())[0] if timed else (ok[0][0] if ok else None)
    cap_text = "no cap" if cap is None else f"{cap / GIB:.2f} GiB"
    lines = ["", f"summary: {len(ok)} of {len(records)} measured cells ran on {card} ({cap_text}, {device})",
             f"measured peak: {counter} ({COUNTER_TEXT[device != 'cpu']})",
             tabulate(rows, ["flags (effective)", "fate", "measured peak MiB", "measured step s",
                             "planned peak MiB", "planned step s", "why"], tablefmt="simple"),
             ""]
    if pick is None:
        lines.append("pick: none of the measured cells ran")
    else:
        lines += [f"pick: {describe(pick.plan.flags)} (fastest measured that ran)",
                  f"flags to paste (SGLang 0.5.23 CLI): {sglang_flags(pick.plan.flags)}"]
    lines += [f"run folder: {run_dir} (offload-bench report {run_dir})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(2)
