"""The differential grid: SGLang's real ServerArgs of each release against our hand-written model of its era.

`python -m harness.policy.differential --out results/sglang-policy-grid.md [--versions 0.5.8 0.5.13 0.5.23]` asks each
installed release (one child per release for the whole grid) and our model (`MODEL_FOR_VERSION`) about every
input, and writes a markdown report: per release, inputs compared, agreements, disagreements (each with inputs,
SGLang's answer and ours), and inputs our model refuses as inexpressible. Exit status 1 on any disagreement.
Each release is asked twice, with no checkpoint on disk and with each family's zoo sized stand-in
(`with_standins`, `harness.models.standin`), and the report counts the inputs the stand-ins change
(`changed_by_checkpoint`).

What is compared, per input our model answers: the six flags (the prefetch size only where the DiT is layerwise:
elsewhere no manager reads it, and our model records it as 0), SGLang's `layerwise_offload_components` (from
0.5.13) and the DiT's residency mode (from 0.5.23). A release that refuses an input (ServerArgs raising) agrees
with our model only if our model refuses it too.

This module imports no torch.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.common.flags import FlagError, OffloadFlags
from harness.engine.policy import EngineRequest, EngineResolution, resolve_engine, version_key
from harness.policy import FAMILY_TASKS, MODEL_FOR_VERSION, EngineContext, Resolution, engine_flags, resolve

BOOL_VALUES: tuple[bool | None, ...] = (False, True, None)
PREFETCH_SIZES: tuple[float, ...] = (0.0, 1.0, 4.0, 0.1, 0.5, 2.5)
CARD_GIB: tuple[float, ...] = (16.0, 24.0, 31.36, 80.0, 141.0)
FAMILIES: tuple[str, ...] = tuple(FAMILY_TASKS)
MODERN_VERSION = "0.5.23"  # the release modern_inputs() is asked of
FAMILY_MODELS: dict[str, str] = {"qwen-image": "qwen-image", "qwen-image-edit": "qwen-image-edit",
                                 "flux": "flux-dev", "wan": "wan2.1-t2v-14b"}
"""The zoo model (at its published size) whose sized stand-in each family is asked with (`with_standins`)."""
STANDIN_SUFFIX = " + stand-ins"  # a run's key in the report: the release asked with the zoo's sized stand-ins
BOOL_FLAGS = ("dit_cpu_offload", "dit_layerwise_offload", "text_encoder_cpu_offload", "vae_cpu_offload",
              "pin_cpu_memory")


@dataclass(frozen=True)
class GridInput:
    flags: OffloadFlags
    context: EngineContext
    part: str = "grid"  # "grid" (grid_inputs) or "modes" (modern_inputs): the report counts them apart

    def describe(self) -> str:
        mode = f" {self.context.performance_mode}" if self.context.performance_mode else ""
        return f"{self.context.family} {self.context.task} {self.context.memory_gib:g} GiB{mode} {self.flags.label()}"


def grid_inputs(cards: tuple[float, ...] = CARD_GIB, families: tuple[str, ...] = FAMILIES,
                prefetch: tuple[float, ...] = PREFETCH_SIZES) -> list[GridInput]:
    """Every combination of set/unset booleans x prefetch sizes x cards x families (each with its task type)."""
    out = []
    for family, gib in itertools.product(families, cards):
        ctx = EngineContext(memory_gib=gib, task=FAMILY_TASKS[family], family=family)
        for bools in itertools.product(BOOL_VALUES, repeat=len(BOOL_FLAGS)):
            for pf in prefetch:
                flags = OffloadFlags(**dict(zip(BOOL_FLAGS, bools, strict=True)), dit_offload_prefetch_size=pf)
                out.append(GridInput(flags, ctx))
    return out


MODES: tuple[str | None, ...] = (None, "manual", "speed", "memory")
MODERN_CARD_GIB: tuple[float, ...] = (16.0, 24.0, 31.36, 48.0, 80.0, 141.0)
MODERN_SWITCHES: tuple[tuple[bool | None, ...], ...] = (
    # dit_cpu_offload, dit_layerwise_offload, text_encoder_cpu_offload, vae_cpu_offload
    (None, None, None, None), (True, True, None, None), (True, None, True, None), (False, False, False, False),
    (None, False, None, True), (True, True, True, False),
)
COMPONENT_SELECTIONS: tuple[tuple[str, ...] | None, ...] = (
    None, (), ("text_encoder",), ("vae",), ("all",), ("dit", "text_encoder"),
)
RESIDENT_VALUES: tuple[float, ...] = (0.25, 1.0, 30.0, 30.7, 99.0)


def modern_inputs() -> list[GridInput]:
    """The flags of 0.5.23 that older releases lack, asked of 0.5.23 only: performance modes x component
    selections x cards (the < 30 GiB row, 45 / 60 / 120 GiB keep-resident thresholds) x families, then resident
    layers x policy x prefetch, then the per-component maps."""
    out = []
    for family, gib, mode in itertools.product(FAMILIES, MODERN_CARD_GIB, MODES):
        ctx = EngineContext(memory_gib=gib, task=FAMILY_TASKS[family], family=family, performance_mode=mode)
        for switches, comps in itertools.product(MODERN_SWITCHES, COMPONENT_SELECTIONS):
            out.append(GridInput(OffloadFlags(*switches, dit_offload_prefetch_size=1.0,  # type: ignore[misc]
                                              layerwise_offload_components=comps), ctx, "modes"))
    for family, gib in itertools.product(("qwen-image", "wan"), (24.0, 80.0)):
        ctx = EngineContext(memory_gib=gib, task=FAMILY_TASKS[family], family=family)
        for switches, resident, policy, pf in itertools.product(
                ((True, True, None, None), (None, True, True, False), (True, False, True, False)),
                RESIDENT_VALUES, ("leading", "strided"), (0.0, 4.0)):
            out.append(GridInput(OffloadFlags(*switches, dit_offload_prefetch_size=pf,  # type: ignore[misc]
                                              dit_layerwise_resident_layers=resident,
                                              dit_layerwise_residency_policy=policy), ctx, "modes"))
    for gib, comps, maps in itertools.product((24.0, 80.0), (("text_encoder", "vae"), ("all",)), (
            {"layerwise_prefetch_size": (("text_encoder", 2.0),)}, {"layerwise_resident_layers": (("vae", 1.0),)},
            {"layerwise_residency_policy": (("text_encoder", "strided"),)})):
        ctx = EngineContext(memory_gib=gib, task="T2I", family="flux")
        out.append(GridInput(OffloadFlags(True, True, None, None, layerwise_offload_components=comps,
                                          **maps), ctx, "modes"))  # type: ignore[arg-type]
    return out


def with_standins(items: list[GridInput]) -> list[GridInput]:
    """The same inputs asked with a checkpoint on disk: each family's zoo model's sized stand-in
    (`harness.models.standin`), whose sizes SGLang 0.5.23's auto policy reads."""
    from harness.models.standin import checkpoint_source

    sources = {family: checkpoint_source(model) for family, model in FAMILY_MODELS.items()}
    return [replace(i, context=replace(i.context, checkpoint=sources[i.context.family])) for i in items]


@dataclass
class Outcome:
    kind: str  # agree | agree-refused (both refuse) | disagree | refused (ours refuses, SGLang answers)
    item: GridInput
    engine: EngineResolution
    ours: Resolution | None
    ours_error: str | None
    diffs: list[str] = field(default_factory=list)


def compare(item: GridInput, engine: EngineResolution, policy: str) -> Outcome:
    """One input: SGLang's answer against our model's."""
    try:
        ours = resolve(item.flags, policy, item.context)
        ours_error = None
    except FlagError as e:
        ours, ours_error = None, str(e)
    if engine.error:
        kind = "agree-refused" if ours is None else "disagree"
        diffs = [] if ours is None else [f"SGLang refuses ({engine.error}), ours answers"]
        return Outcome(kind, item, engine, ours, ours_error, diffs)
    if ours is None:
        return Outcome("refused", item, engine, None, ours_error)
    diffs = differences(engine, ours)
    return Outcome("disagree" if diffs else "agree", item, engine, ours, None, diffs)


def differences(engine: EngineResolution, ours: Resolution) -> list[str]:
    theirs = engine_flags(engine.effective, engine.layerwise_components, engine.dit_residency)
    mine = ours.effective
    diffs = []
    for name in BOOL_FLAGS:
        if getattr(theirs, name) != getattr(mine, name):
            diffs.append(f"{name}: SGLang {getattr(theirs, name)}, ours {getattr(mine, name)}")
    if theirs.dit_layerwise_offload and theirs.dit_offload_prefetch_size != mine.dit_offload_prefetch_size:
        diffs.append(f"dit_offload_prefetch_size: SGLang {theirs.dit_offload_prefetch_size:g}, "
                     f"ours {mine.dit_offload_prefetch_size:g}")
    our_components = tuple(ours.engine.layerwise_components) if ours.engine else ()
    if engine.extra.get("has_layerwise_offload_components") and tuple(engine.layerwise_components) != our_components:
        diffs.append(f"layerwise_components: SGLang {list(engine.layerwise_components)}, ours {list(our_components)}")
    our_residency = ours.engine.dit_residency if ours.engine else None
    if engine.dit_residency is not None and engine.dit_residency != our_residency:
        diffs.append(f"dit_residency: SGLang {engine.dit_residency}, ours {our_residency}")
    theirs_all = engine.extra.get("residency") or {}
    mine_all = (ours.engine.residency if ours.engine else None) or {}
    for role in ("text_encoder", "vae"):
        if role in theirs_all and mine_all.get(role) != theirs_all[role]:
            diffs.append(f"{role} residency: SGLang {theirs_all[role]}, ours {mine_all.get(role)}")
    if theirs.dit_layerwise_offload:  # resident layers act only on a layerwise DiT (elsewhere ours records 0)
        for name in ("dit_layerwise_resident_layers", "dit_layerwise_residency_policy"):
            if getattr(theirs, name) != getattr(mine, name) and not (
                    name == "dit_layerwise_residency_policy" and not theirs.dit_layerwise_resident_layers):
                diffs.append(f"{name}: SGLang {getattr(theirs, name)}, ours {getattr(mine, name)}")
    return diffs


def run_version(version: str, items: list[GridInput], timeout_s: float = 1800.0) -> list[Outcome]:
    """All inputs through one child of `version` and through our model of its era."""
    answers = ask_release(version, items, timeout_s)
    policy, _ = model_for(version)
    return [compare(item, answer, policy) for item, answer in zip(items, answers, strict=True)]


def ask_release(version: str, items: list[GridInput], timeout_s: float = 1800.0) -> list[EngineResolution]:
    """The release's answers to the inputs (with their contexts' checkpoints), one child for all, none kept."""
    requests = [EngineRequest(flags=i.flags.as_dict(), memory_gib=i.context.memory_gib, family=i.context.family,
                              task=i.context.task, performance_mode=i.context.performance_mode,  # type: ignore[arg-type]
                              checkpoint=i.context.checkpoint)
                for i in items]
    return resolve_engine(version, requests, timeout_s=timeout_s, cache=False)


def decision(answer: EngineResolution) -> tuple[Any, ...]:
    """What a release decided for one input, as compared: its refusal, or the resolved flags, SGLang's component
    list and each role's residency."""
    if answer.error:
        return ("error", answer.error)
    return (engine_flags(answer.effective, answer.layerwise_components, answer.dit_residency),
            tuple(answer.layerwise_components), answer.dit_residency,
            tuple(sorted((answer.extra.get("residency") or {}).items())))


def changed_by_checkpoint(without: list[Outcome], with_: list[Outcome]) -> list[tuple[Outcome, Outcome]]:
    """The inputs whose release answer the checkpoint changes (the same inputs in the same order, asked without
    and with the stand-ins)."""
    return [(a, b) for a, b in zip(without, with_, strict=True) if decision(a.engine) != decision(b.engine)]


def model_for(version: str) -> tuple[str, bool]:
    """Our model of `version`'s era and whether the release is mapped to it. A release no model was written for (a
    newer one, or one between two modelled releases) is compared with the newest model, and the report says so.
    A run's key (`0.5.23 + stand-ins`) names its release first."""
    version = version.removesuffix(STANDIN_SUFFIX)
    if version in MODEL_FOR_VERSION:
        return MODEL_FOR_VERSION[version], True
    return MODEL_FOR_VERSION[max(MODEL_FOR_VERSION, key=version_key)], False


def summary(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o.kind for o in outcomes)


def _engine_text(e: EngineResolution) -> str:
    if e.error:
        return f"error: {e.error}"
    f = engine_flags(e.effective, e.layerwise_components, e.dit_residency)
    bits = [f"cpu={int(bool(f.dit_cpu_offload))} lw={int(bool(f.dit_layerwise_offload))} "
            f"te={int(bool(f.text_encoder_cpu_offload))} vae={int(bool(f.vae_cpu_offload))} "
            f"pf={f.dit_offload_prefetch_size:g} pin={int(bool(f.pin_cpu_memory))}"]
    if e.extra.get("has_layerwise_offload_components"):
        bits.append(f"layerwise={list(e.layerwise_components)}")
    if e.dit_residency:
        bits.append(f"dit={e.dit_residency}")
    return "; ".join(bits)


def _ours_text(o: Outcome) -> str:
    if o.ours is None:
        return f"refused: {o.ours_error}"
    f = o.ours.effective
    text = (f"cpu={int(bool(f.dit_cpu_offload))} lw={int(bool(f.dit_layerwise_offload))} "
            f"te={int(bool(f.text_encoder_cpu_offload))} vae={int(bool(f.vae_cpu_offload))} "
            f"pf={f.dit_offload_prefetch_size:g} pin={int(bool(f.pin_cpu_memory))}")
    if o.ours.engine:
        text += f"; layerwise={list(o.ours.engine.layerwise_components)}; dit={o.ours.engine.dit_residency}"
    return text


def report(results: dict[str, list[Outcome]], elapsed: dict[str, float], examples: int = 6) -> str:
    """The markdown report of a grid run."""
    lines = [
        "# SGLang offload policy: real ServerArgs against our model",
        "",
        "Written by `python -m harness.policy.differential --out results/sglang-policy-grid.md` (CPU only). "
        "Each release's",
        "`ServerArgs` is built as SGLang's unit tests build it: platform mocked as one CUDA GPU of the card's memory,",
        "all of it free; the release's own pipeline config for the family's checkpoint; performance mode left at the",
        "release's default; only set flags passed. Each release is asked twice: with no checkpoint on disk, and",
        "(`+ stand-ins`) with each family's zoo model's sized stand-in in its Hugging Face cache (the published",
        f"layout, headers only: {', '.join(f'{f}: {m}' for f, m in FAMILY_MODELS.items())}), whose sizes",
        "0.5.23's auto policy reads. See `harness/engine/serverargs.py` and `harness/models/standin.py`.",
        "",
        f"Grid: booleans {', '.join(BOOL_FLAGS)} each false/true/unset; prefetch {list(PREFETCH_SIZES)}; cards "
        f"{list(CARD_GIB)} GiB; families {', '.join(f'{f} ({t})' for f, t in FAMILY_TASKS.items())}.",
        "",
        "Compared: the six flags (prefetch only where the DiT is layerwise), `layerwise_offload_components` (0.5.13+),",
        "the DiT residency mode (0.5.23). *refused*: our model refuses the input as inexpressible (text encoder or",
        "VAE layerwise, a prefetch flag 0.5.8 lacks) and SGLang answers; *both refuse*: SGLang raises and so do we.",
        "",
        "*inputs* = *compared* (both answer: agree + disagree) + *refused* + *both refuse*. A release without a model",
        "of its own is compared with the newest model and marked *(unmapped)*.",
        "",
        "| release | our model | inputs | compared | agree | disagree | refused (inexpressible) | both refuse | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for version, outcomes in results.items():
        c = summary(outcomes)
        model, mapped = model_for(version)
        lines.append(f"| {version} | `{model}`{'' if mapped else ' (unmapped)'} | {len(outcomes)} | "
                     f"{c['agree'] + c['disagree']} | {c['agree']} | {c['disagree']} | {c['refused']} | "
                     f"{c['agree-refused']} | {elapsed[version]:.0f} s |")
    lines += _checkpoint_section(results)
    for version, outcomes in results.items():
        lines += _release_section(version, outcomes, examples)
    return "\n".join(lines).rstrip() + "\n"


def _checkpoint_section(results: dict[str, list[Outcome]]) -> list[str]:
    """How many inputs each release answers otherwise with the stand-ins: in the grid and in the modern inputs, and
    by family and card."""
    pairs = [(v, results[v], results[v + STANDIN_SUFFIX]) for v in results if v + STANDIN_SUFFIX in results]
    if not pairs:
        return []
    lines = ["", "## What a checkpoint on disk changes", "",
             "Inputs whose release answer (flags, component list, residency of each role, or refusal) differs "
             "between no checkpoint and the sized stand-ins, of the grid's inputs (`grid`) and of the modes, "
             "component selections and resident layers asked of 0.5.23 (`modes`):", "",
             "| release | part | inputs | changed | changed, by family and card (GiB) |", "|---|---|---:|---:|---|"]
    for version, without, with_ in pairs:
        for part in sorted({o.item.part for o in without}):
            old = [o for o in without if o.item.part == part]
            changed = changed_by_checkpoint(old, [o for o in with_ if o.item.part == part])
            where = Counter(f"{a.item.context.family} {a.item.context.memory_gib:g}" for a, _ in changed)
            lines.append(f"| {version} | {part} | {len(old)} | {len(changed)} | "
                         f"{', '.join(f'{k}: {n}' for k, n in sorted(where.items())) or '-'} |")
    return lines


def _release_section(version: str, outcomes: list[Outcome], examples: int) -> list[str]:
    """One release's part of the report: its pipeline configs, refusals by reason, then examples of each kind."""
    lines = ["", f"## SGLang {version}", ""]
    configs = sorted({o.engine.pipeline_config for o in outcomes})
    lines += ["Pipeline configs: " + "; ".join(f"`{c}`" for c in configs), ""]
    reasons = Counter(_reason(o.ours_error) for o in outcomes if o.kind == "refused")
    if reasons:
        lines += ["Refused as inexpressible, by reason:", ""]
        lines += [f"- {n}: {r}" for r, n in reasons.most_common()]
        lines.append("")
    for kind in ("disagree", "refused", "agree"):
        picked = [o for o in outcomes if o.kind == kind]
        if not picked:
            continue
        shown = picked if kind == "disagree" else _spread(picked, examples)
        lines += [f"### {kind} ({len(picked)}{', examples' if len(shown) < len(picked) else ''})", "",
                  "| input | SGLang | ours | differences |", "|---|---|---|---|"]
        for o in shown:
            lines.append(f"| {o.item.describe()} | {_engine_text(o.engine)} | {_ours_text(o)} | "
                         f"{'; '.join(o.diffs) or '-'} |")
        lines.append("")
    return lines


def _reason(error: str | None) -> str:
    text = error or ""
    return text.split(": needs ", 1)[1] if ": needs " in text else text


def _spread(items: list[Outcome], n: int) -> list[Outcome]:
    """n examples spread over the list (so families and cards vary)."""
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    from harness.engine.policy import available_versions

    parser = argparse.ArgumentParser(prog="python -m harness.policy.differential", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--versions", nargs="*", help="releases to ask (default: those MODEL_FOR_VERSION covers)")
    args = parser.parse_args(argv)
    versions = args.versions or sorted(MODEL_FOR_VERSION, key=version_key)
    missing = [v for v in versions if v not in available_versions()]
    if missing:
        print(f"not installed: {', '.join(missing)}; install with `python -m harness.engine.install "
              f"{' '.join(missing)}`", file=sys.stderr)
        return 2
    results: dict[str, list[Outcome]] = {}
    elapsed: dict[str, float] = {}
    for version in versions:
        items = grid_inputs() + (modern_inputs() if version == MODERN_VERSION else [])
        for key, asked in ((version, items), (version + STANDIN_SUFFIX, with_standins(items))):
            t0 = time.monotonic()
            results[key] = run_version(version, asked)
            elapsed[key] = time.monotonic() - t0
            c = summary(results[key])
            model, mapped = model_for(version)
            note = "" if mapped else f" (no model of its own: compared with {model}, the newest)"
            print(f"sglang {key}: {len(results[key])} inputs, {dict(c)} in {elapsed[key]:.0f} s{note}",
                  file=sys.stderr)
    text = report(results, elapsed)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    return 1 if any(o.kind == "disagree" for outs in results.values() for o in outs) else 0


def as_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Disagreements as plain dicts (for test messages)."""
    return [{"input": o.item.describe(), "sglang": _engine_text(o.engine), "ours": _ours_text(o), "diffs": o.diffs}
            for o in outcomes if o.kind == "disagree"]


if __name__ == "__main__":
    sys.exit(main())
