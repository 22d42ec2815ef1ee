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
import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.common import locations
from harness.common.flags import MAP_FLAGS, NUMBER_FLAGS, FlagError, OffloadFlags
from harness.common.units import GIB
from harness.models import PLAN_DATA_PATH, UnknownModelError
from harness.plan.advise import ENGINES, PICKS
from harness.plan.paste import PCIE_GBPS, pcie_scaled, sglang_flags
from harness.plan.planner import PHASES, Machine, Plan, PlanError, Workload, load_data, machine_profile, plan
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
        p.add_argument("--machine", default=None, help="GPU SKU of the step-time profile (plan_data.json machines; "
                       "default nvidia-h100-80gb-hbm3)")
        p.add_argument("--pcie", choices=sorted(PCIE_GBPS), default=None,
                       help="the card's PCIe generation (x16): scales the profile's H2D rates by the two links' "
                       "bandwidths (gen4 31.5, gen5 63.0 GB/s; the profiles are gen5)")
        p.add_argument("--resident-layers", type=float, default=None,
                       help="DiT layers kept on the device per group, a count or a fraction (default: the flags' "
                       "dit_layerwise_resident_layers; advise sweeps 0, 1/4, 1/2, 3/4)")
        if name == "plan":
            p.add_argument("--flags", default=None,
                           help="requested flags, e.g. dit_cpu_offload=true,dit_layerwise_offload=true,"
                           "dit_offload_prefetch_size=4 (unnamed switches off); without: every combination")
            p.add_argument("--json", action="store_true", help="the plan as JSON (with --flags)")
        else:
            p.add_argument("--all", action="store_true", help="every combination (default: the pick and the next "
                           f"{PICKS - 1}, each with its flags)")
            p.add_argument("--engine", choices=ENGINES, default="sglang",
                           help="what the flags to paste are for: SGLang's CLI flags (default) or diffusers calls")
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
    name, eq, gib = text.partition("=")
    if not eq:
        raise PlanUsageError(f"--card: unknown card {text!r}; known: {', '.join(CARDS)}, or NAME=GIB")
    if not re.fullmatch(r"[\w.-]+", name):
        raise PlanUsageError(f"--card: {text!r}: NAME may hold letters, digits, '.', '_' and '-' only")
    try:
        value = float(gib)
    except ValueError:
        raise PlanUsageError(f"--card: {text!r}: expected NAME=GIB with GIB a number, got {gib!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise PlanUsageError(f"--card: {text!r}: GIB must be a finite number > 0, got {gib!r}")
    return name, round(value * GIB)


def machine_of(args: argparse.Namespace) -> Machine:
    """The step-time profile: `--machine` (refused unless plan_data.json has it), scaled to `--pcie`."""
    machines = sorted(load_data().get("machines", {}))
    if args.machine is not None and args.machine not in machines:
        raise PlanUsageError(f"--machine: no step-time profile {args.machine!r}; profiles: {', '.join(machines)}")
    machine = machine_profile(args.machine)
    pcie = getattr(args, "pcie", None)
    return pcie_scaled(machine, pcie) if pcie else machine


def workload_of(args: argparse.Namespace) -> Workload:
    from harness.models import get_model

    m = re.fullmatch(r"(\d+)x(\d+)", args.resolution)
    if not m:
        raise PlanUsageError(f"--resolution: expected WIDTHxHEIGHT, got {args.resolution!r}")
    spec = get_model(args.model, "--model")
    video = spec.family == "wan"
    width, height = int(m.group(1)), int(m.group(2))
    if width <= 0 or height <= 0:
        raise PlanUsageError(f"--resolution: width and height must be > 0, got {args.resolution!r}")
    if args.frames is not None:
        if args.frames < 1:
            raise PlanUsageError(f"--frames: expected a frame count >= 1, got {args.frames}")
        if not video and args.frames != 1:
            raise PlanUsageError(f"--frames: {args.model} is an image model (one frame), got {args.frames}")
        temporal = 2 ** sum(bool(d) for d in spec.components["vae"].config.get("temperal_downsample") or [])
        if video and (args.frames - 1) % temporal:
            raise PlanUsageError(f"--frames: {args.model} takes 1 + {temporal}k frames (its VAE compresses time "
                                 f"{temporal}x), got {args.frames}; nearest: {_nearest_frames(args.frames, temporal)}")
    frames = args.frames if args.frames is not None else (81 if video else 1)
    if args.cfg is not None and (not math.isfinite(args.cfg) or args.cfg < 1):
        raise PlanUsageError(f"--cfg: expected a finite number >= 1 (1 = no CFG), got {args.cfg}")
    cfg = args.cfg if args.cfg is not None else (1.0 if spec.family == "flux" else 4.0)
    multiple = spec.vae_scale * spec.patch
    if width % multiple or height % multiple:
        raise PlanUsageError(f"--resolution: width and height must be multiples of {multiple} for {args.model}")
    return Workload(height=height, width=width, frames=frames, true_cfg_scale=cfg, cfg_batch=args.cfg_batch,
                    empty_cache=args.empty_cache)


def _nearest_frames(frames: int, temporal: int) -> str:
    low = 1 + (frames - 1) // temporal * temporal
    return f"{low} or {low + temporal}" if low != frames else str(low)


def _split_items(text: str, where: str) -> list[str]:
    """NAME=VALUE items split on the commas outside brackets and braces ([a,b], {text_encoder=2,vae=1})."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise PlanUsageError(f"{where}: unbalanced {ch!r} in {text!r}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise PlanUsageError(f"{where}: unclosed bracket in {text!r}")
    return [i.strip() for i in [*items, current] if i.strip()]


def parse_flags(text: str, where: str = "--flags") -> OffloadFlags:
    """Requested flags from NAME=VALUE items, every flag the scenario format takes: switches true, false or unset;
    numbers (prefetch size, resident layers) as counts or fractions; the residency policy by name;
    `layerwise_offload_components` as [a,b], a+b or one group; the per-component maps as {component=value,...}
    or component=value+component=value."""
    values: dict[str, Any] = {}
    for item in _split_items(text, where):
        name, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or not name or not raw:
            raise PlanUsageError(f"{where}: expected NAME=VALUE, got {item!r}")
        if name in values:
            raise PlanUsageError(f"{where}: {name} given twice")
        value: Any = raw
        if name in NUMBER_FLAGS:
            try:
                value = float(raw)
            except ValueError:
                raise FlagError(f"{where}.{name}: expected a finite number >= 0, got {raw!r}") from None
        elif name == "layerwise_offload_components":
            value = raw.strip("[]").replace("+", ",")
            value = [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
        elif name in MAP_FLAGS:
            value = raw.removeprefix("{").removesuffix("}").replace("+", ",")
        elif name != "dit_layerwise_residency_policy":
            value = {"true": True, "false": False}.get(raw.lower(), raw)
        values[name] = value
    return OffloadFlags.from_mapping(values, where)  # checks each value as a scenario's


def check_prefetch(model: str, flags: OffloadFlags, where: str = "--flags") -> None:
    """A prefetch size of more layers than the DiT's largest layer group is refused, as a scenario refuses it."""
    from harness.models import get_model

    groups = get_model(model).components["dit"].layer_group_sizes()
    v = flags.dit_offload_prefetch_size
    if groups and v >= 1 and int(v) > max(groups.values()):
        sizes = ", ".join(f"{g}: {n}" for g, n in groups.items())
        raise PlanUsageError(f"{where}.dit_offload_prefetch_size: {v:g} layers is more than the largest layer group "
                             f"of {model} ({sizes}); use at most {max(groups.values())}")


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
    machine = machine_of(args)
    resident = _resident_layers(args)
    if args.flags is None:
        from harness.plan.advise import advise, describe

        # one row per switch combination and prefetch size; `advise` also sweeps resident layers
        a = advise(args.model, card, cap, workload, policy=args.policy, machine=machine,
                   resident_layers=resident or 0.0, records_glob=None)
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
    if resident is not None:
        # --resident-layers is the flag's value: it goes through the policy with the rest (and its residency policy)
        requested = replace(requested, dit_layerwise_resident_layers=resident)
    check_prefetch(args.model, requested)
    spec = get_model(args.model)
    context = EngineContext.for_model(spec.family, spec.edit, (cap or 80 * GIB) / GIB, spec.name)
    resolution = resolve(requested, args.policy, context)
    p = plan(args.model, resolution.effective, cap, workload, card=card, machine=machine)
    if args.json:
        print(json.dumps({**p.as_dict(), "sglang_flags": sglang_flags(p.flags)}, indent=1))
    else:
        for m in resolution.messages:
            print(f"policy: {m}")
        print(render_plan(p), end="")
        print(f"sglang flags: {sglang_flags(p.flags)}")
    return 0


def _resident_layers(args: argparse.Namespace) -> float | None:
    v = args.resident_layers
    if v is not None and (not math.isfinite(v) or v < 0):
        raise PlanUsageError(f"--resident-layers: expected a finite number >= 0 (a count, or a fraction below 1), "
                             f"got {v}")
    return v


def cmd_advise(args: argparse.Namespace) -> int:
    from harness.models import get_model
    from harness.plan.advise import DEFAULT_MARGIN, advise, render

    card, cap = card_cap(args.card)
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    if not 0 <= margin < 1:
        raise PlanUsageError(f"--margin: expected a fraction in [0, 1), got {margin}")
    workload = workload_of(args)
    a = advise(args.model, card, cap, workload, policy=args.policy, margin=margin,
               machine=machine_of(args), resident_layers=_resident_layers(args),
               records_glob=locations.records_glob() if args.records is None else (args.records or None))
    print(render(a, all_rows=args.all, engine=args.engine, family=get_model(args.model).family), end="")
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
