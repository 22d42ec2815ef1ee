"""The planner's commands: `offload-bench plan`, `offload-bench advise` and `offload-bench plan-fit`.

- plan: the per-phase plan of one flag combination (`--flags`), or one row per combination without it.
- advise: the combinations ranked for a card (`harness.plan.advise`).
- plan-fit: refits the activation, allocator and compute figures (and the machine profiles) from GPU records and,
  with --write, stores them in harness/models/plan_data.json.

None of them imports torch: `plan` answers in well under two seconds (tests/test_plan.py times it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from harness.common import locations
from harness.common.flags import FlagError, OffloadFlags, check_flag_value
from harness.common.units import GIB
from harness.models import PLAN_DATA_PATH, UnknownModelError
from harness.plan.planner import PHASES, Plan, PlanError, Workload, load_data, machine_profile, plan
from harness.policy import EngineContext, resolve


class PlanUsageError(ValueError):
    """A bad argument of a planner command (exit 2, one line)."""


def add_commands(sub: Any) -> None:
    """Registers plan, advise and plan-fit on the main parser's subcommands."""
    for name, text in (("plan", "predict memory and step time of a flag combination on a card (no GPU)"),
                       ("advise", "rank the flag combinations that fit a card")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="a zoo model (`make list`)")
        p.add_argument("--card", default="native",
                       help="rtx5090-32g, rtx4090-24g, native, or NAME=GIB (e.g. l40s=44.4)")
        p.add_argument("--resolution", default="1024x1024", help="WIDTHxHEIGHT (default 1024x1024)")
        p.add_argument("--frames", type=int, default=None, help="video frames (video models; default 81, else 1)")
        p.add_argument("--cfg", type=float, default=None,
                       help="true CFG scale; > 1 runs two DiT forwards a step (default: 4.0, FLUX 1.0)")
        p.add_argument("--cfg-batch", action="store_true", help="the two CFG passes as one batched forward")
        p.add_argument("--empty-cache", action="store_true", help="torch.cuda.empty_cache() between phases")
        p.add_argument("--policy", default="sglang", help="the policy that resolves the flags (default sglang)")
        p.add_argument("--machine", default=None, help="GPU SKU of the step-time profile (plan_data.json machines)")
        p.add_argument("--resident-layers", type=float, default=None,
                       help="DiT layers kept on the device per group, a count or a fraction (default: the flags' "
                       "dit_layerwise_resident_layers; advise sweeps 0, 1/4, 1/2, 3/4)")
        if name == "plan":
            p.add_argument("--flags", default=None,
                           help="requested flags, e.g. dit_cpu_offload=true,dit_layerwise_offload=true,"
                           "dit_offload_prefetch_size=4 (unnamed switches off); without: every combination")
            p.add_argument("--json", action="store_true", help="the plan as JSON (with --flags)")
        else:
            p.add_argument("--margin", type=float, default=None, help="safety margin, a fraction of the card "
                           "(default 0.05)")
            p.add_argument("--records", default=None,
                           help="glob of records whose measurements replace the plan's (default: the committed "
                           "records, results/**/*.records.jsonl of the checkout or the copy a wheel ships; '' for "
                           "none)")
    fit = sub.add_parser("plan-fit", help="refit the planner's activation and compute figures from GPU records")
    fit.add_argument("records", nargs="+", help="records.jsonl files (GPU runs)")
    fit.add_argument("--write", action="store_true", help=f"store the fits in {PLAN_DATA_PATH.name}")


def card_cap(text: str) -> tuple[str, int | None]:
    from harness.plan.scenario import CARDS

    if text in CARDS:
        return text, CARDS[text]
    m = re.fullmatch(r"([\w.-]+)=([\d.]+)", text)
    if m:
        return m.group(1), round(float(m.group(2)) * GIB)
    raise PlanUsageError(f"--card: unknown card {text!r}; known: {', '.join(CARDS)}, or NAME=GIB")


def workload_of(args: argparse.Namespace) -> Workload:
    from harness.models import get_model

    m = re.fullmatch(r"(\d+)x(\d+)", args.resolution)
    if not m:
        raise PlanUsageError(f"--resolution: expected WIDTHxHEIGHT, got {args.resolution!r}")
    spec = get_model(args.model, "--model")
    video = spec.family == "wan"
    frames = args.frames if args.frames is not None else (81 if video else 1)
    cfg = args.cfg if args.cfg is not None else (1.0 if spec.family == "flux" else 4.0)
    multiple = spec.vae_scale * spec.patch
    width, height = int(m.group(1)), int(m.group(2))
    if width % multiple or height % multiple:
        raise PlanUsageError(f"--resolution: width and height must be multiples of {multiple} for {args.model}")
    return Workload(height=height, width=width, frames=frames, true_cfg_scale=cfg, cfg_batch=args.cfg_batch,
                    empty_cache=args.empty_cache)


def parse_flags(text: str) -> OffloadFlags:
    values: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, raw = item.partition("=")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        if name == "dit_offload_prefetch_size":
            value = float(raw)
        values[name] = check_flag_value(name, value, "--flags")
    return OffloadFlags.from_mapping(values, "--flags")


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / GIB:.2f}"


def render_plan(p: Plan) -> str:
    from tabulate import tabulate

    cap = "no cap" if p.cap_bytes is None else f"{p.cap_bytes / GIB:.2f} GiB"
    rows = [[ph.phase, _gib(ph.weight_bytes), _gib(ph.window_bytes), _gib(ph.activation_bytes),
             _gib(ph.allocated_bytes), _gib(ph.reserved_bytes), _gib(ph.device_bytes),
             "OOM" if p.oom_phase == ph.phase else ""] for ph in p.phases]
    step = "-" if p.step_s is None else f"{p.step_s:.3f} s ({p.bound}-bound)"
    out = [
        f"plan: {p.model} on {p.card} ({cap}); effective {p.flags.label()}; placements "
        + ", ".join(f"{k} {v}" for k, v in p.placements.items()),
        tabulate(rows, ["phase", "weights GiB", "window GiB", "activations GiB", "allocated GiB", "reserved GiB",
                        "device GiB (+context)", ""], tablefmt="simple"),
        f"fits: {'yes' if p.fits else 'no: ' + (p.oom_line() or '')}",
        f"host: pinned {_gib(p.host_pinned_bytes)} GiB, pageable {_gib(p.host_pageable_bytes)} GiB",
        f"step: {step}; compute {_s(p.compute_s_per_forward)}/forward, streamed "
        f"{p.streamed_bytes_per_forward / 1e9:.2f} GB/forward at {p.machine.pinned_h2d_gbps} GB/s = "
        f"{_s(p.transfer_s_per_forward)}; machine {p.machine.name}",
    ]
    out += [f"note: {n}" for n in p.notes]
    return "\n".join(out) + "\n"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.models import get_model

    card, cap = card_cap(args.card)
    workload = workload_of(args)
    machine = machine_profile(args.machine)
    if args.flags is None:
        from harness.plan.advise import advise, describe

        # one row per switch combination and prefetch size; `advise` also sweeps resident layers
        a = advise(args.model, card, cap, workload, policy=args.policy, machine=machine,
                   resident_layers=args.resident_layers or 0.0, records_glob=None)
        from tabulate import tabulate

        rows = [[describe(o.plan.flags), _gib(o.plan.load_peak_bytes), _gib(o.plan.runtime_peak_bytes),
                 _gib(o.plan.peak_device_bytes), _gib(o.plan.host_pinned_bytes),
                 "-" if o.plan.step_s is None else f"{o.plan.step_s:.3f}",
                 "yes" if o.plan.fits else f"no: {o.plan.oom_line()}"] for o in a.options]
        cap_text = "no cap" if cap is None else f"{cap / GIB:.2f} GiB"
        print(f"plan: {args.model} on {card} ({cap_text}), {workload.width}x{workload.height}"
              f"{f'x{workload.frames}' if workload.frames > 1 else ''}, machine {machine.name}; peaks are allocator "
              "reserved, device adds the CUDA context")
        print(tabulate(rows, ["flags (effective)", "load GiB", "runtime GiB", "device GiB", "pinned host GiB",
                              "step s", "fits"], tablefmt="simple"))
        return 0
    requested = parse_flags(args.flags)
    spec = get_model(args.model)
    context = EngineContext.for_model(spec.family, spec.edit, (cap or 80 * GIB) / GIB)
    resolution = resolve(requested, args.policy, context)
    p = plan(args.model, resolution.effective, cap, workload, card=card, machine=machine,
             resident_layers=args.resident_layers)
    if args.json:
        print(json.dumps(p.as_dict(), indent=1))
    else:
        for m in resolution.messages:
            print(f"policy: {m}")
        print(render_plan(p), end="")
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from harness.plan.advise import DEFAULT_MARGIN, advise, render

    card, cap = card_cap(args.card)
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    if not 0 <= margin < 1:
        raise PlanUsageError(f"--margin: expected a fraction in [0, 1), got {margin}")
    a = advise(args.model, card, cap, workload_of(args), policy=args.policy, margin=margin,
               machine=machine_profile(args.machine), resident_layers=args.resident_layers,
               records_glob=locations.records_glob() if args.records is None else (args.records or None))
    print(render(a), end="")
    return 0


def cmd_plan_fit(args: argparse.Namespace) -> int:
    from harness.common.records import read_cell_records
    from harness.plan.planner import fit

    records = [(path, r) for path in args.records for r in read_cell_records(Path(path)).records]
    fits = fit(records)
    if not args.write:
        print(json.dumps(fits, indent=1))
        return 0
    data = dict(load_data())
    data.update(fits)
    PLAN_DATA_PATH.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote fits of {len(fits['fits'])} models and {len(fits['machines'])} machines to {PLAN_DATA_PATH}",
          file=sys.stderr)
    return 0


COMMANDS = {"plan": cmd_plan, "advise": cmd_advise, "plan-fit": cmd_plan_fit}
ERRORS = (PlanUsageError, PlanError, FlagError, UnknownModelError)
__all__ = ["COMMANDS", "ERRORS", "PHASES", "add_commands"]
