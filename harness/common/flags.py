"""Offload flags and the policies that turn requested flags into the flags an engine really runs with.

SGLang resolves its offload flags in `ServerArgs` before anything is loaded, and one step of that resolution was
the #26925 bug: with DiT layerwise offload on, `dit_cpu_offload` was forced off, so the loader put the whole DiT on
the GPU. Each named policy here reproduces one era of that resolution, so a scenario can run "as SGLang would
have" and the record keeps requested flags, effective flags and the policy's messages side by side.

This module imports no torch: the parent process and the CPU tests use it freely.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal


class FlagError(ValueError):
    """A flag, its value or a policy name is not valid. The message names the field."""


@dataclass(frozen=True)
class OffloadFlags:
    """The offload flags of a DiT serving engine, with SGLang's names and meanings.

    A boolean may be None: unset, as when a user does not pass the flag, so the engine's defaults for the card and
    task decide (`resolve` needs an `EngineContext` then). The defaults below are the values of a fully set request.

    Args:
        dit_cpu_offload (bool, defaults to False): DiT weights start on the host; the whole module moves to the
            GPU before the denoise loop and back after it.
        dit_layerwise_offload (bool, defaults to False): the DiT's layers are streamed one at a time from pinned
            host buffers on a side CUDA stream, with a prefetch window.
        text_encoder_cpu_offload (bool, defaults to False): as dit_cpu_offload, for the text encoder.
        vae_cpu_offload (bool, defaults to False): as dit_cpu_offload, for the VAE.
        dit_offload_prefetch_size (float, defaults to 0.0): the layerwise prefetch window; see `prefetch_layers`.
        pin_cpu_memory (bool, defaults to True): host copies are page-locked, so copies to the GPU run async.
        dit_layerwise_resident_layers (float, defaults to 0.0): with DiT layerwise, this many layers stay on the
            device from the first forward of a request to its end and the rest stream; a fraction of the group
            below 1, a count from 1 (SGLang #31538; see `resident_layer_count`).
        dit_layerwise_residency_policy (str, defaults to "leading"): which layers stay: "leading" (the first r)
            or "strided" (spread evenly); see `streamed_layer_indices` (SGLang #34534).
        layerwise_offload_components (tuple[str, ...] | None, defaults to None): SGLang's
            `--layerwise-offload-components`, normalised as SGLang does (`normalize_components`): groups "dit",
            "text_encoder", "image_encoder", "vae", "default" (= text_encoder, image_encoder, vae) or "all". None
            is not passed (SGLang's default: the memory defaults may fill it); () is passed empty (explicitly
            none). A selected component streams layer by layer and its CPU-offload flag is cleared.
        layerwise_prefetch_size, layerwise_resident_layers, layerwise_residency_policy (tuple of (component,
            value) pairs, default empty): SGLang's per-component maps (`--layerwise-prefetch-size
            text_encoder=2,...`), keyed by "transformer", "text_encoder" or "vae". A component without an entry
            takes the `dit_*` value if it is the DiT, else 0 / 0 / leading (ServerArgs.layerwise_tuning_for).
    """

    dit_cpu_offload: bool | None = False
    dit_layerwise_offload: bool | None = False
    text_encoder_cpu_offload: bool | None = False
    vae_cpu_offload: bool | None = False
    dit_offload_prefetch_size: float = 0.0
    pin_cpu_memory: bool | None = True
    dit_layerwise_resident_layers: float = 0.0
    dit_layerwise_residency_policy: str = "leading"
    layerwise_offload_components: tuple[str, ...] | None = None
    layerwise_prefetch_size: tuple[tuple[str, float], ...] = ()
    layerwise_resident_layers: tuple[tuple[str, float], ...] = ()
    layerwise_residency_policy: tuple[tuple[str, str], ...] = ()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "flags") -> OffloadFlags:
        """Builds flags from a mapping (a TOML table, a JSON record), checking names and types.

        Raises:
            FlagError: an unknown flag, a non-boolean switch, or a prefetch size that is not a number >= 0.
        """
        known = cls.names()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise FlagError(f"{where}: unknown flag {unknown[0]!r}; known flags: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            values[name] = check_flag_value(name, value, where)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: components as a list (or None), the per-component maps as tables."""
        out = asdict(self)
        if self.layerwise_offload_components is not None:
            out["layerwise_offload_components"] = list(self.layerwise_offload_components)
        for name in MAP_FLAGS:
            out[name] = dict(getattr(self, name))
        return out

    def spec_dict(self) -> dict[str, Any]:
        """`as_dict` without the flags added after the first records (resident layers, components, maps) while
        they are at their defaults: what a cell's spec hash covers, so hashes of cells that existed before those
        flags stay as they were (resume, baselines)."""
        out = self.as_dict()
        for name, default in LATER_FLAGS_AT_DEFAULT.items():
            if out[name] == default:
                del out[name]
        return out

    def unset(self) -> tuple[str, ...]:
        """Names of the switches left to the engine's defaults (`layerwise_offload_components` None is SGLang's
        default and needs no card to resolve unless a switch is unset too)."""
        return tuple(f.name for f in fields(self)
                     if getattr(self, f.name) is None and f.name != "layerwise_offload_components")

    def component_value(self, name: str, component: str) -> Any:
        """A per-component map's value for `component` (None without an entry)."""
        return dict(getattr(self, name)).get(component)

    def layerwise_tuning(self, role: str, dit_prefetch_size: float | None = None) -> tuple[float, float, str]:
        """Prefetch size, resident layers and residency policy of zoo component `role` ("dit", "text_encoder",
        "vae") under layerwise offload (SGLang's `layerwise_tuning_for`): its per-component map entry, else the
        `dit_*` values for the DiT (`dit_prefetch_size` in place of `dit_offload_prefetch_size` when given) and
        0 / 0 / leading for the others."""
        name = "transformer" if role == "dit" else role
        prefetch = self.dit_offload_prefetch_size if dit_prefetch_size is None else dit_prefetch_size
        defaults = ((prefetch, self.dit_layerwise_resident_layers, self.dit_layerwise_residency_policy)
                    if role == "dit" else (0.0, 0.0, "leading"))
        picked = [self.component_value(m, name) for m in MAP_FLAGS]
        return tuple(d if v is None else v for v, d in zip(picked, defaults, strict=True))  # type: ignore[return-value]

    def label(self) -> str:
        """A short, readable id of these flags, used in cell ids and table rows."""

        def b(v: bool | None) -> str:
            # U for unset: a new letter, so labels of fully set flags (in records and baselines) stay as they were
            return "U" if v is None else "1" if v else "0"

        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else repr(float(v))  # repr: distinct values, distinct ids

        label = (
            f"cpu{b(self.dit_cpu_offload)}-lw{b(self.dit_layerwise_offload)}-te{b(self.text_encoder_cpu_offload)}"
            f"-vae{b(self.vae_cpu_offload)}-pf{num(self.dit_offload_prefetch_size)}-pin{b(self.pin_cpu_memory)}"
        )
        # Appended only when not at SGLang's defaults, so the ids of earlier records and baselines stay as they were
        if self.dit_layerwise_resident_layers:
            label += f"-res{num(self.dit_layerwise_resident_layers)}"
        if self.dit_layerwise_residency_policy != "leading":
            label += f"-{self.dit_layerwise_residency_policy}"
        if self.layerwise_offload_components is not None:
            short = {"dit": "dit", "text_encoder": "te", "image_encoder": "ie", "vae": "vae", "all": "all"}
            label += "-lwc-" + ("+".join(short[c] for c in self.layerwise_offload_components) or "none")
        for name, tag in (("layerwise_prefetch_size", "pf"), ("layerwise_resident_layers", "res"),
                          ("layerwise_residency_policy", "pol")):
            for component, value in getattr(self, name):
                label += f"-{COMPONENT_TAGS[component]}{tag}{num(value) if tag != 'pol' else value}"
        return label


UNSET = "unset"
RESIDENCY_POLICIES: tuple[str, ...] = ("leading", "strided")
"""SGLang's `--dit-layerwise-residency-policy` choices (0.5.23 `RESIDENCY_POLICIES`)."""
NUMBER_FLAGS = ("dit_offload_prefetch_size", "dit_layerwise_resident_layers")
LAYERWISE_GROUPS: tuple[str, ...] = ("dit", "text_encoder", "image_encoder", "vae")
DEFAULT_GROUP: tuple[str, ...] = ("text_encoder", "image_encoder", "vae")
"""SGLang's "default" layerwise group (LAYERWISE_OFFLOAD_DEFAULT_COMPONENTS)."""
MAP_FLAGS = ("layerwise_prefetch_size", "layerwise_resident_layers", "layerwise_residency_policy")
LATER_FLAGS_AT_DEFAULT: dict[str, Any] = {
    "dit_layerwise_resident_layers": 0.0, "dit_layerwise_residency_policy": "leading",
    "layerwise_offload_components": None, "layerwise_prefetch_size": {}, "layerwise_resident_layers": {},
    "layerwise_residency_policy": {},
}
"""The flags added after the first records, at their defaults, in `as_dict` form (see `OffloadFlags.spec_dict`)."""
COMPONENT_TAGS: dict[str, str] = {"transformer": "dit", "text_encoder": "te", "vae": "vae"}
"""Keys of the per-component maps: SGLang's component names (the DiT is "transformer"), and their label tags."""


def flag_json(name: str, value: Any) -> Any:
    """A normalised flag value in the form records hold (`OffloadFlags.as_dict`): components as a list, maps as
    tables; other values as they are. Accepts either form, so a record's value and a scenario's compare equal."""
    if name == "layerwise_offload_components" and value is not None:
        return list(value)
    if name in MAP_FLAGS:
        return dict(value)
    return value


def normalize_components(value: Any, where: str = "flags") -> tuple[str, ...] | None:
    """SGLang's `normalize_layerwise_offload_components` for the groups the zoo has: a string or a list of strings,
    each split on commas, stripped, lowercased, '-' as '_'; "default" expands to text_encoder, image_encoder, vae;
    "all" is the whole answer; duplicates dropped, order kept. None stays None; an empty list stays empty
    (passed explicitly, so SGLang's memory defaults add nothing).

    Raises:
        FlagError: not a string or list of strings, or a name that is not a group (SGLang also takes exact
            component names of a pipeline's model_index.json; the harness does not).
    """
    name = "layerwise_offload_components"
    if value is None or value == UNSET:
        return None
    raw = [value] if isinstance(value, str) else value
    if not isinstance(raw, list | tuple) or not all(isinstance(v, str) for v in raw):
        raise FlagError(f"{where}.{name}: expected a list of component groups or a comma-separated string, "
                        f"got {value!r}")
    out: list[str] = []
    for item in raw:
        for part in item.split(","):
            c = part.strip().replace("-", "_").lower()
            if not c:
                continue
            if c == "all":
                return ("all",)
            if c not in (*LAYERWISE_GROUPS, "default"):
                raise FlagError(f"{where}.{name}: unknown component group {c!r}; expected dit, text_encoder, "
                                "image_encoder, vae, default or all")
            for g in DEFAULT_GROUP if c == "default" else (c,):
                if g not in out:
                    out.append(g)
    return tuple(out)


def streamed_roles(components: Any) -> tuple[str, ...] | None:
    """The effective form of a final layerwise list: the zoo roles beyond the DiT that stream ("text_encoder",
    "vae"), None for none. The DiT's streaming is `dit_layerwise_offload` (a "dit" or "all" selection sets it) and
    "image_encoder" selects nothing in the zoo, so cells that run alike have equal effective flags (one run) and
    labels as before; SGLang's own list stays in the resolution's `engine.layerwise_components`."""
    chosen = set(components or ())
    roles = ("text_encoder", "vae") if "all" in chosen else tuple(r for r in ("text_encoder", "vae") if r in chosen)
    return roles or None


def _component_map(name: str, value: Any, where: str) -> tuple[tuple[str, Any], ...]:
    """A per-component map from a table or SGLang's "component=value,..." string, each value checked as its
    dit_* counterpart's."""
    if isinstance(value, str):
        table: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, v = part.partition("=")
            if not sep:
                raise FlagError(f"{where}.{name}: expected component=value entries, got {part!r}")
            table[key.strip()] = v.strip()
        value = table
    if not isinstance(value, Mapping):
        raise FlagError(f"{where}.{name}: expected a table of component -> value, got {value!r}")
    counterpart = {"layerwise_prefetch_size": "dit_offload_prefetch_size",
                   "layerwise_resident_layers": "dit_layerwise_resident_layers",
                   "layerwise_residency_policy": "dit_layerwise_residency_policy"}[name]
    out = []
    for key, v in value.items():
        if key not in COMPONENT_TAGS:
            raise FlagError(f"{where}.{name}: unknown component {key!r}; expected one of {', '.join(COMPONENT_TAGS)}")
        if isinstance(v, str) and counterpart in NUMBER_FLAGS:
            try:
                v = float(v)
            except ValueError:
                raise FlagError(f"{where}.{name}.{key}: expected a number, got {v!r}") from None
        out.append((key, check_flag_value(counterpart, v, f"{where}.{name}[{key}]")))
    return tuple(sorted(out))


def check_flag_value(name: str, value: Any, where: str = "flags") -> Any:
    """Returns `value` normalised for flag `name`, or raises FlagError naming the field."""
    if name not in OffloadFlags.names():
        raise FlagError(f"{where}: unknown flag {name!r}; known flags: {', '.join(OffloadFlags.names())}")
    if name in NUMBER_FLAGS:
        # bool is an int subclass; `true` as a prefetch size is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite_number(value):
            raise FlagError(f"{where}.{name}: expected a finite number >= 0, got {value!r}")
        if value < 0:
            # SGLang: prefetch < 0 with a layerwise component, and any resident count < 0, raise ValueError
            meaning = "0 means one layer" if name == "dit_offload_prefetch_size" else "0 means none resident"
            raise FlagError(f"{where}.{name}: must be >= 0 ({meaning}), got {value!r}")
        return float(value)
    if name == "layerwise_offload_components":
        return normalize_components(value, where)
    if name in MAP_FLAGS:
        return _component_map(name, value, where)
    if name == "dit_layerwise_residency_policy":
        if value not in RESIDENCY_POLICIES:
            raise FlagError(f"{where}.{name}: expected one of {', '.join(RESIDENCY_POLICIES)}, got {value!r}")
        return value
    if value == UNSET:  # TOML has no null: a scenario spells SGLang's None (not passed) "unset"
        return None
    if value is not None and not isinstance(value, bool):
        raise FlagError(f"{where}.{name}: expected true or false (or None: unset), got {value!r}")
    return value


def is_finite_number(value: float) -> bool:
    """True for a number that is finite as a float (an int too large for a float is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def prefetch_layers(value: float, num_layers: int) -> int:
    """How many layers SGLang's layerwise manager prefetches for a group of `num_layers` layers.

    0 -> 1 layer; 0 < v < 1 -> a fraction of the group, 1 + round(v * (n - 1)); v >= 1 -> int(v). The result is
    clamped to [1, n]. Python's round() (banker's rounding) is what SGLang uses, so 0.5 of 60 layers gives 31.

    Example:
        >>> prefetch_layers(0.1, 60), prefetch_layers(4, 60), prefetch_layers(0, 60), prefetch_layers(99, 60)
        (7, 4, 1, 60)
    """
    if num_layers < 1:
        raise FlagError(f"num_layers: a layer group needs at least one layer, got {num_layers}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite_number(value) or value < 0:
        raise FlagError(f"dit_offload_prefetch_size: must be a finite number >= 0, got {value!r}")
    if value == 0:
        p = 1
    elif value < 1:
        p = 1 + round(value * (num_layers - 1))
    else:
        p = int(value)
    return max(1, min(num_layers, p))


def resident_layer_count(value: float, num_layers: int) -> int:
    """How many layers of a group of `num_layers` SGLang's layerwise manager keeps resident for
    `dit_layerwise_resident_layers` = value (0.5.23 `configure_layerwise_offload`).

    0 -> none; 0 < v < 1 -> a fraction of the group, max(1, round(v * n)) (Python's round, as SGLang); v >= 1 ->
    int(v) (so 1.0 is one layer, and ServerArgs has already floored 30.7 to 30), at most n.

    Example:
        >>> resident_layer_count(0.5, 60), resident_layer_count(0.001, 60), resident_layer_count(30.7, 60)
        (30, 1, 30)
    """
    if num_layers < 1:
        raise FlagError(f"num_layers: a layer group needs at least one layer, got {num_layers}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite_number(value) or value < 0:
        raise FlagError(f"dit_layerwise_resident_layers: must be a finite number >= 0, got {value!r}")
    if value == 0:
        return 0
    if value < 1:
        return max(1, round(value * num_layers))
    return min(num_layers, int(value))


def streamed_layer_indices(num_layers: int, resident: int, policy: str) -> tuple[int, ...]:
    """The layers of a group that stream (sorted); the other `resident` stay on the device.

    leading: layers 0..r-1 stay, r..n-1 stream. strided: the n - r streamed layers are spread evenly over the
    group, layer round(k * n / (n - r)) for k = 0..n-r-1 (SGLang 0.5.23 `compute_streamed_layers`): the step
    n / (n - r) is >= 1, so the indices are distinct. Both stream the same count, so the same bytes.

    Example:
        >>> streamed_layer_indices(6, 2, "leading"), streamed_layer_indices(6, 2, "strided")
        ((2, 3, 4, 5), (0, 2, 3, 4))
    """
    if policy not in RESIDENCY_POLICIES:
        raise FlagError(f"dit_layerwise_residency_policy: expected one of {', '.join(RESIDENCY_POLICIES)}, "
                        f"got {policy!r}")
    r = min(max(0, resident), num_layers)
    m = num_layers - r
    if m == 0:
        return ()
    if r == 0 or policy == "leading":
        return tuple(range(r, num_layers))
    return tuple(round(k * num_layers / m) for k in range(m))


Task = Literal["T2I", "I2I", "T2V", "I2V"]
TASKS: tuple[str, ...] = ("T2I", "I2I", "T2V", "I2V")
FAMILY_TASKS: dict[str, str] = {"qwen-image": "T2I", "qwen-image-edit": "I2I", "flux": "T2I", "wan": "T2V"}
"""The zoo families SGLang's policy is asked about, and the task type SGLang's pipeline config gives each."""


@dataclass(frozen=True)
class EngineContext:
    """What SGLang's defaults for unset flags depend on: the card, the task type and the model family.

    Args:
        memory_gib (float): the card's total memory in GiB (SGLang reads total and available memory; a fresh card).
        task (str): SGLang's task type: T2I, I2I (image generation) or T2V, I2V (video).
        family (str): the zoo family (`FAMILY_TASKS`), which selects SGLang's pipeline config.
        performance_mode (str | None): SGLang's `--performance-mode`; None is the release's default (auto).
    """

    memory_gib: float
    task: str
    family: str
    performance_mode: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.memory_gib, bool) or not isinstance(self.memory_gib, int | float) or self.memory_gib <= 0:
            raise FlagError(f"context.memory_gib: expected a number of GiB > 0, got {self.memory_gib!r}")
        if self.task not in TASKS:
            raise FlagError(f"context.task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if not isinstance(self.family, str) or not self.family:
            raise FlagError(f"context.family: expected a zoo family name, got {self.family!r}")

    @property
    def is_image(self) -> bool:
        return self.task in ("T2I", "I2I")

    @classmethod
    def for_model(cls, family: str, edit: bool, memory_gib: float) -> EngineContext:
        """The context of a zoo model (`ModelSpec.family`, `.edit`) on a card of `memory_gib` GiB."""
        name = "qwen-image-edit" if family == "qwen-image" and edit else family
        return cls(memory_gib=memory_gib, task=FAMILY_TASKS.get(name, "T2I"), family=name)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineDetails:
    """What a policy decided beyond the six flags, in SGLang's terms.

    Args:
        source (str): "model" (our hand-written policy's prediction) or "sglang" (the release's ServerArgs).
        version (str | None): the SGLang release asked, or the release era the model follows.
        layerwise_components (tuple[str, ...]): SGLang's `layerwise_offload_components` (empty before 0.5.13 had
            it); "image_encoder" is listed as SGLang lists it, though none of the zoo families has one.
        dit_residency (str | None): the DiT's residency mode (resident, component-offload, layerwise-offload),
            None where the release has no such notion (before 0.5.23).
        residency (dict[str, str] | None): the residency mode of each zoo role ("dit", "text_encoder", "vae"),
            where known (0.5.23's `residency_mode`).
        pipeline_config (str | None): the SGLang pipeline config class used, and why.
        context (EngineContext | None): the card and task the defaults were taken for.
    """

    source: str
    version: str | None
    layerwise_components: tuple[str, ...] = ()
    dit_residency: str | None = None
    pipeline_config: str | None = None
    context: EngineContext | None = None
    residency: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "version": self.version,
            "layerwise_components": list(self.layerwise_components),
            "dit_residency": self.dit_residency,
            "pipeline_config": self.pipeline_config,
            "context": self.context.as_dict() if self.context else None,
        }
        if self.residency is not None:  # absent in records from before it
            out["residency"] = dict(self.residency)
        return out


@dataclass(frozen=True)
class Resolution:
    """What a policy made of the requested flags (`engine`: the details, when a context or the engine was used)."""

    policy: str
    requested: OffloadFlags
    effective: OffloadFlags
    messages: tuple[str, ...]
    engine: EngineDetails | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "requested": self.requested.as_dict(),
            "effective": self.effective.as_dict(),
            "messages": list(self.messages),
        }
        if self.engine is not None:  # absent, not null, so records of context-free cells stay as they were
            out["engine"] = self.engine.as_dict()
        return out

    @property
    def engine_asked(self) -> bool:
        """The answer came from a release's own ServerArgs (an engine policy), not from our model."""
        return self.engine is not None and self.engine.source == "sglang"


def _common_prefetch_rules(flags: OffloadFlags, messages: list[str]) -> OffloadFlags:
    """Prefetch-size and resident-layer handling shared by the SGLang eras that have the flags
    (ServerArgs._validate_offload).

    SGLang keeps (and truncates) the values without layerwise too, with a warning for the resident ones; here they
    are recorded as 0 / leading there, since no manager reads them and cells that differ only in them are the same
    run. Likewise `strided` with no resident layer is the same run as `leading` (SGLang warns: no resident set to
    place) and is recorded as leading. The differential grid compares them where they act, for that reason.
    """
    v = flags.dit_offload_prefetch_size
    r = flags.dit_layerwise_resident_layers
    policy = flags.dit_layerwise_residency_policy
    if not flags.dit_layerwise_offload:
        if v != 0:
            messages.append(
                f"dit_offload_prefetch_size={v:g} has no effect without dit_layerwise_offload; recorded as 0"
            )
        if r != 0:
            messages.append("--dit-layerwise-resident-layers has no effect because the DiT is not layerwise-offloaded;"
                            " recorded as 0")
        if policy != "leading":
            messages.append("--dit-layerwise-residency-policy has no effect because the DiT is not "
                            "layerwise-offloaded; recorded as leading")
        return replace(flags, dit_offload_prefetch_size=0.0, dit_layerwise_resident_layers=0.0,
                       dit_layerwise_residency_policy="leading")
    if v > 1 and not float(v).is_integer():
        messages.append(f"Invalid --dit-offload-prefetch-size value passed, truncated to: {int(v)}")
        flags = replace(flags, dit_offload_prefetch_size=float(int(v)))
    if 0.5 <= v < 1.0:
        messages.append("We do not recommend --dit-offload-prefetch-size to be between 0.5 and 1.0")
    if r > 1 and not float(r).is_integer():
        messages.append(f"Invalid --dit-layerwise-resident-layers value passed, truncated to: {int(r)}")
        flags = replace(flags, dit_layerwise_resident_layers=float(int(r)))
    if policy != "leading" and r <= 0:
        messages.append("--dit-layerwise-residency-policy has no effect because --dit-layerwise-resident-layers is 0;"
                        " recorded as leading")
        flags = replace(flags, dit_layerwise_residency_policy="leading")
    return flags


def _refuse_resident_layers(policy: str, flags: OffloadFlags, era: str) -> None:
    """Resident layers arrived with SGLang #31538 (2026-07-17) and the policy with #34534, the per-component maps
    later still: earlier eras refuse them. (Layerwise components exist from 0.5.13 on; a model that cannot
    express them refuses them itself.)"""
    if flags.dit_layerwise_resident_layers != 0 or flags.dit_layerwise_residency_policy != "leading":
        raise _refuse(policy, flags, "dit_layerwise_resident_layers / dit_layerwise_residency_policy",
                      f"{era} has no resident layers (SGLang #31538, #34534)")
    if any(getattr(flags, n) for n in MAP_FLAGS):
        raise _refuse(policy, flags, ", ".join(MAP_FLAGS), f"{era} has no per-component layerwise maps")


def _refuse(policy: str, flags: OffloadFlags, needs: str, why: str) -> FlagError:
    return FlagError(f"policy {policy!r}: cannot express {flags.label()}: needs {needs} ({why})")


def _need_context(policy: str, flags: OffloadFlags, context: EngineContext | None) -> EngineContext | None:
    """Unset flags take SGLang's defaults for a card and task, which only a context gives."""
    if context is not None and context.performance_mode not in (None, "auto"):
        raise _refuse(policy, flags, f"performance_mode={context.performance_mode}",
                      "the model follows SGLang's default mode, auto; manual/speed/memory place components otherwise")
    if flags.unset() and context is None:
        raise FlagError(f"policy {policy!r}: {', '.join(flags.unset())} unset: SGLang's defaults depend on the card "
                        f"and task; pass an EngineContext")
    return context


def _dit_residency(flags: OffloadFlags) -> str:
    """SGLang 0.5.23's residency_mode("transformer") for resolved flags: layerwise wins over component offload."""
    if flags.dit_layerwise_offload:
        return "layerwise-offload"
    return "component-offload" if flags.dit_cpu_offload else "resident"



@dataclass(frozen=True)
class DeploymentHints:
    """What SGLang 0.5.23's pipeline config declares for the auto policy (`ModelDeploymentConfig`), per family.

    Args:
        keep_resident_min_available_gb (float | None): free GiB from which `keep_resident_components` stay
            resident; None takes the task's default (45 for image generation, 120 otherwise).
        keep_resident_components (tuple[str, ...]): those components ("dit" is added for image generation).
        dit_layerwise_offload_modes (tuple[str, ...]): performance modes that stream the DiT by default.
    """

    keep_resident_min_available_gb: float | None = None
    keep_resident_components: tuple[str, ...] = ("vae",)
    dit_layerwise_offload_modes: tuple[str, ...] = ()


DEPLOYMENT_HINTS: dict[str, DeploymentHints] = {
    # Read from 0.5.23's registered configs (QwenImagePipelineConfig, QwenImageEditPlusPipelineConfig,
    # FluxPipelineConfig: the defaults; WanT2V720PConfig: 60 GiB, ("dit",), ("memory",)).
    "qwen-image": DeploymentHints(),
    "qwen-image-edit": DeploymentHints(),
    "flux": DeploymentHints(),
    "wan": DeploymentHints(60.0, ("dit",), ("memory",)),
}
PERFORMANCE_MODES: tuple[str, ...] = ("auto", "manual", "speed", "memory")
LOW_MEMORY_GIB = 30.0  # ServerArgs._adjust_offload: total device memory below this offloads the large components
IMAGE_KEEP_RESIDENT_GIB = 45.0  # auto_tune.IMAGE_GEN_KEEP_RESIDENT_MIN_AVAILABLE_GB
DEFAULT_KEEP_RESIDENT_GIB = 120.0  # auto_tune.DEFAULT_KEEP_RESIDENT_MIN_AVAILABLE_GB
_CPU_FLAG = {"dit": "dit_cpu_offload", "text_encoder": "text_encoder_cpu_offload",
             "image_encoder": "image_encoder_cpu_offload", "vae": "vae_cpu_offload"}


class _ServerArgs0523:
    """SGLang 0.5.23's `ServerArgs._adjust_parameters` and `_validate_offload`, for the offload fields, on one
    CUDA GPU with all of `memory_gib` free, no FSDP, no cache-dit, no canonical residency, and no local checkpoint
    (so the memory-rich "every weight twice over" tier and the DiT-overflow sizing never fire: as the engine child
    runs it). Written from the release's rules, each step named after the method it follows."""

    def __init__(self, flags: OffloadFlags, ctx: EngineContext | None, messages: list[str]) -> None:
        self.flags = flags
        self.msgs = messages
        self.explicit = {n for n in ("dit_cpu_offload", "dit_layerwise_offload", "text_encoder_cpu_offload",
                                     "vae_cpu_offload", "pin_cpu_memory") if getattr(flags, n) is not None}
        self.components_explicit = flags.layerwise_offload_components is not None
        mode = (ctx.performance_mode if ctx else None) or "auto"
        if mode.lower() not in PERFORMANCE_MODES:  # _normalize_performance_mode: ValueError
            raise FlagError(f"performance_mode: expected one of {', '.join(PERFORMANCE_MODES)}, got {mode!r}")
        self.mode = mode.lower()
        self.ctx = ctx
        self.v: dict[str, Any] = {
            "dit_cpu_offload": flags.dit_cpu_offload,
            "dit_layerwise_offload": flags.dit_layerwise_offload,
            "text_encoder_cpu_offload": flags.text_encoder_cpu_offload,
            "image_encoder_cpu_offload": None,  # no zoo family has an image encoder; the flag is never passed
            "vae_cpu_offload": False if flags.vae_cpu_offload is None else flags.vae_cpu_offload,  # field default
        }
        # an explicit empty list stays [] (not None) until _adjust_layerwise_offload_components normalises it, so
        # the auto steps that only fill a None list leave it alone
        self.components: list[str] | None = (None if flags.layerwise_offload_components is None
                                              else list(flags.layerwise_offload_components))

    # -------------------------------------------------------------------------------------------- helpers
    @property
    def hints(self) -> DeploymentHints:
        return DEPLOYMENT_HINTS.get(self.ctx.family, DeploymentHints()) if self.ctx else DeploymentHints()

    @property
    def keep_resident_gib(self) -> float:
        explicit = self.hints.keep_resident_min_available_gb
        if explicit is not None:
            return explicit
        return IMAGE_KEEP_RESIDENT_GIB if self.ctx is None or self.ctx.is_image else DEFAULT_KEEP_RESIDENT_GIB

    def rich(self) -> bool:
        """At least the keep-resident threshold free (a fresh card: free = total)."""
        return self.ctx is not None and self.ctx.memory_gib >= self.keep_resident_gib

    def explicit_layerwise(self, component: str) -> bool:
        """is_explicit_layerwise_offload_component: an explicit selection naming it (or "all"), or an explicit
        `--dit-layerwise-offload true` for the DiT."""
        if self.components_explicit and self.components and ("all" in self.components
                                                             or component in self.components):
            return True
        return component == "dit" and "dit_layerwise_offload" in self.explicit and bool(self.v["dit_layerwise_offload"])

    def explicit_mode(self, component: str) -> str | None:
        """explicit_residency_mode: explicit layerwise, then an explicit legacy flag, then an explicit
        `--dit-layerwise-offload false` (the DiT resident)."""
        if self.explicit_layerwise(component):
            return "layerwise-offload"
        flag = _CPU_FLAG[component]
        if flag in self.explicit:
            return "component-offload" if self.v[flag] else "resident"
        if component == "dit" and "dit_layerwise_offload" in self.explicit:
            return "resident"
        return None

    def residency(self, component: str) -> str:
        """residency_mode: explicit first, then the (implicit) layerwise list, then the legacy flag."""
        mode = self.explicit_mode(component)
        if mode is not None:
            return mode
        if self.components and ("all" in self.components or component in self.components):
            return "layerwise-offload"
        return "component-offload" if self.v[_CPU_FLAG[component]] else "resident"

    def fill(self, **values: bool) -> None:
        for name, value in values.items():
            if self.v[name] is None:
                self.v[name] = value

    def default_components(self) -> list[str]:
        """_default_layerwise_components_for_unset_placement (+ _filter_high_memory_resident_components)."""
        if self.components_explicit or self.v["dit_layerwise_offload"] is True:
            return []
        comps = [c for c in DEFAULT_GROUP if self.explicit_mode(c) is None]
        if self.mode == "auto" and self.rich():
            kept = [c for c in comps if c in self.hints.keep_resident_components]
            comps = [c for c in comps if c not in self.hints.keep_resident_components]
            if kept:
                self.msgs.append(f"Keeping default layerwise components resident because minimum available memory "
                                 f"on selected GPUs is {self.ctx.memory_gib:.2f} GiB: {', '.join(kept)}")
        # _should_auto_enable_dit_layerwise_offload: the model lists the mode (the DiT-overflow sizing needs a
        # local checkpoint, which the engine child never has)
        if self.explicit_mode("dit") is None and self.mode in self.hints.dit_layerwise_offload_modes:
            comps.insert(0, "dit")
        return comps

    # -------------------------------------------------------------------------------------------- steps
    def adjust(self) -> None:
        mode = self.mode
        if mode == "speed":  # _set_gpu_resident_defaults(use_fsdp=False)
            self.fill(dit_cpu_offload=False, dit_layerwise_offload=False, text_encoder_cpu_offload=False,
                      image_encoder_cpu_offload=False)
        elif mode == "memory":  # _set_layerwise_offload_defaults (CUDA)
            if self.components is None:
                self.components = self.default_components() or None
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=False, image_encoder_cpu_offload=False)
        if mode != "manual":
            self.adjust_offload()
            if mode == "auto":
                self.auto_default_layerwise()
                self.auto_residency_after_offload()
            self.replace_cpu_offload_with_layerwise()
        self.adjust_layerwise_components()
        if mode != "manual":  # finalize_auto_flags
            self.fill(dit_cpu_offload=False, dit_layerwise_offload=False, text_encoder_cpu_offload=False,
                      image_encoder_cpu_offload=False)

    def adjust_offload(self) -> None:
        """_adjust_offload: the < 30 GiB row, then image vs video; the VAE is not touched."""
        if self.ctx is None:  # every switch is set (checked by the caller): nothing to fill
            return
        if self.ctx.memory_gib < LOW_MEMORY_GIB:
            self.msgs.append("Enabling large component offloading for GPU with low device memory")
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=True, image_encoder_cpu_offload=True)
        elif self.ctx.is_image:
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=True, image_encoder_cpu_offload=False)
        else:
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=True, image_encoder_cpu_offload=True)

    def auto_default_layerwise(self) -> None:
        """maybe_adjust_auto_default_layerwise_offload."""
        if self.components is not None or self.v["dit_layerwise_offload"] is True:
            return
        comps = self.default_components()
        if comps:
            self.msgs.append(f"Auto memory policy selects layerwise offload for {', '.join(comps)}")
            self.components = comps

    def auto_residency_after_offload(self) -> None:
        """maybe_adjust_auto_component_residency_after_offload: from the keep-resident threshold, the model's
        keep-resident components (+ the DiT for image generation) leave the implicit layerwise list and lose an
        implicit CPU offload."""
        if not self.rich():
            return
        keep = set(self.hints.keep_resident_components)
        if self.ctx is not None and self.ctx.is_image:
            keep.add("dit")
        changed = []
        if self.components is not None and not self.components_explicit:
            left = [c for c in self.components if c not in keep]
            if left != self.components:
                self.components = left or None
                changed.append(f"layerwise_offload_components={self.components}")
        explicit_dit_layerwise = self.explicit_layerwise("dit") or (
            self.components_explicit and bool(self.components) and "all" in (self.components or []))
        if (self.v["dit_cpu_offload"] and "dit" in keep and self.explicit_mode("dit") is None
                and "dit_layerwise_offload" not in self.explicit and not explicit_dit_layerwise):
            self.v["dit_cpu_offload"] = False
            changed.append("dit_cpu_offload=False")
        for component in ("text_encoder", "image_encoder", "vae"):
            flag = _CPU_FLAG[component]
            if self.v[flag] and component in keep and self.explicit_mode(component) is None:
                self.v[flag] = False
                changed.append(f"{flag}=False")
        if changed:
            self.msgs.append(f"Disabling component offload because minimum available memory on selected GPUs is "
                             f"{self.ctx.memory_gib:.2f} GiB: {', '.join(changed)}")  # type: ignore[union-attr]

    def replace_cpu_offload_with_layerwise(self) -> None:
        """maybe_replace_cpu_offloaded_components_with_layerwise: implicit te/ie/vae CPU offload goes layerwise."""
        if self.components is not None or self.v["dit_layerwise_offload"] is True:
            return
        comps = ["dit"] if self.v["dit_layerwise_offload"] else []
        changed = [c for c in DEFAULT_GROUP if self.v[_CPU_FLAG[c]] and self.explicit_mode(c) is None]
        if changed:
            self.components = comps + changed
            self.msgs.append("Automatically replacing CPU offload with layerwise offload for components: "
                             + ", ".join(changed))

    def adjust_layerwise_components(self) -> None:
        """_adjust_layerwise_offload_components: `dit_layerwise_offload` adds "dit" first; selected groups clear
        their component's CPU offload (not the DiT's, since #26925); an explicit `--dit-layerwise-offload false`
        with no explicit DiT offload keeps the DiT resident."""
        sel = list(self.components) if self.components else None
        if self.v["dit_layerwise_offload"]:
            if sel is None:
                sel = ["dit"]
            elif "dit" not in sel:
                sel = ["dit", *sel]
        self.components = sel
        chosen = set(sel or ())
        cleared = []
        for component in ("text_encoder", "image_encoder", "vae"):
            flag = _CPU_FLAG[component]
            if ("all" in chosen or component in chosen) and self.v[flag] is not False:
                self.v[flag] = False
                if flag in self.explicit:
                    cleared.append(flag)
        if cleared:
            self.msgs.append("Ignoring component-offload flags because layerwise offload controls the same "
                             f"component groups: {', '.join(cleared)}")
        has_explicit_dit_offload = self.explicit_layerwise("dit") or (
            "dit_cpu_offload" in self.explicit and bool(self.v["dit_cpu_offload"]))
        if ("dit_layerwise_offload" in self.explicit and not self.v["dit_layerwise_offload"]
                and not has_explicit_dit_offload):
            self.v["dit_cpu_offload"] = False


def _resolve_sglang(flags: OffloadFlags, context: EngineContext | None = None,
                    policy: str = "sglang") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """SGLang 0.5.23 (the newest release modelled): after #26925 dit_cpu_offload is kept with DiT layerwise, and
    layerwise offload covers the text encoder and the VAE too (`layerwise_offload_components`, per-component
    maps), with resident DiT layers and the memory/task defaults of `performance_mode` (`_ServerArgs0523`).

    Unset switches need a context (the card's memory, the task, the family). The effective flags say what runs:
    `dit_layerwise_offload` is whether the DiT resolves to layerwise offload (SGLang's residency_mode, so a
    selection of "dit" or "all" counts), `layerwise_offload_components` the text encoder / VAE that stream
    (`streamed_roles`; SGLang's final list is `engine.layerwise_components`), the CPU-offload flags after
    layerwise cleared them; in manual mode a switch left unset is off, as the runtime
    reads it.
    """
    if context is None and flags.unset():
        raise FlagError(f"policy {policy!r}: {', '.join(flags.unset())} unset: SGLang's defaults depend on the card "
                        f"and task; pass an EngineContext")
    messages: list[str] = []
    state = _ServerArgs0523(flags, context, messages)
    state.adjust()
    residency = {c: state.residency(c) for c in ("dit", "text_encoder", "vae")}
    v = state.v
    effective = replace(
        flags,
        dit_cpu_offload=bool(v["dit_cpu_offload"]),
        dit_layerwise_offload=residency["dit"] == "layerwise-offload",
        text_encoder_cpu_offload=bool(v["text_encoder_cpu_offload"]),
        vae_cpu_offload=bool(v["vae_cpu_offload"]),
        pin_cpu_memory=True if flags.pin_cpu_memory is None else flags.pin_cpu_memory,
        layerwise_offload_components=streamed_roles(state.components),
    )
    effective = _common_prefetch_rules(effective, messages)
    for name in flags.unset():
        messages.append(f"{name} unset: SGLang 0.5.23's default ({state.mode} mode) is {getattr(effective, name)}")
    details = EngineDetails(source="model", version="0.5.23", layerwise_components=tuple(state.components or ()),
                            dit_residency=residency["dit"], context=context, residency=residency) \
        if context is not None or flags.layerwise_offload_components is not None else None
    return effective, messages, details


def _resolve_sglang_0513(flags: OffloadFlags, context: EngineContext | None = None,
                         policy: str = "sglang-0.5.13") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """SGLang 0.5.13 (after #26925, 2026-06-01; before resident layers): dit_cpu_offload is kept with DiT layerwise.

    The model of the June era, kept for the differential grid against 0.5.13 (`MODEL_FOR_VERSION`); policy
    "sglang" models the newest release. It refuses the flags 0.5.13 does not have and whatever it cannot express.

    Only non-DiT component CPU offload is cleared for components that layerwise manages; our layerwise runtime
    manages the DiT alone. Unset flags (with a context) take the defaults of SGLang's auto mode on one CUDA GPU
    with no local checkpoint to size (`ServerArgs._adjust_offload`, `ServerArgsAutoTuner`):

    - DiT CPU offload defaults on; from 45 GiB free on an image task it stays off when neither DiT flag is given
      (0.5.23's keep-resident rule); DiT layerwise defaults off for the zoo's families;
    - a text encoder or VAE whose flag is unset goes layerwise (the default layerwise group), which our runtime
      cannot do: refused. The VAE stays resident instead from the keep-resident threshold up (0.5.23). With
      `dit_layerwise_offload` on, the default group is not added and the text encoder defaults to CPU offload.
    """
    _refuse_resident_layers(policy, flags, "0.5.13")
    if flags.layerwise_offload_components is not None:
        raise _refuse(policy, flags, "layerwise_offload_components", "this model of 0.5.13 streams the DiT alone")
    messages: list[str] = []
    details: EngineDetails | None = None
    context = _need_context(policy, flags, context)
    if context is not None:
        flags, details = _sglang_defaults(flags, context, policy, messages)
    flags = _common_prefetch_rules(flags, messages)
    if details is not None:
        details = replace(details, dit_residency=_dit_residency(flags))
    return flags, messages, details


def _sglang_defaults(flags: OffloadFlags, ctx: EngineContext, policy: str,
                     messages: list[str]) -> tuple[OffloadFlags, EngineDetails]:
    requested = flags
    if flags.dit_layerwise_offload:
        components: list[str] = ["dit"]
        te = True if flags.text_encoder_cpu_offload is None else flags.text_encoder_cpu_offload
        vae = False if flags.vae_cpu_offload is None else flags.vae_cpu_offload
        cpu = True if flags.dit_cpu_offload is None else flags.dit_cpu_offload
    else:
        components = []
        if flags.text_encoder_cpu_offload is None:
            raise _refuse(policy, requested, "text encoder layerwise offload",
                          "SGLang's auto mode streams an unset text encoder layer by layer")
        if flags.vae_cpu_offload is None:
            raise _refuse(policy, requested, "VAE layerwise offload",
                          "SGLang's auto mode streams an unset VAE layer by layer (0.5.23 keeps it resident on some "
                          "memory-rich cards, per model)")
        components.append("image_encoder")  # SGLang's default group; none of the zoo families has one
        te = flags.text_encoder_cpu_offload
        vae = False if flags.vae_cpu_offload is None else flags.vae_cpu_offload
        if flags.dit_cpu_offload is None:
            # 0.5.13 defaults it on; 0.5.23 clears it under an explicit `--dit-layerwise-offload false`
            # (server_args.py `_adjust_layerwise_offload_components`) and on memory-rich cards (auto_tune.py
            # `maybe_adjust_auto_component_residency_after_offload`): the releases differ, so no single answer
            raise _refuse(policy, requested, "dit_cpu_offload set when DiT layerwise is not on",
                          "its default differs between SGLang 0.5.13 and 0.5.23")
        cpu = flags.dit_cpu_offload
    effective = replace(flags, dit_cpu_offload=cpu, dit_layerwise_offload=bool(flags.dit_layerwise_offload),
                        text_encoder_cpu_offload=te, vae_cpu_offload=vae,
                        pin_cpu_memory=True if flags.pin_cpu_memory is None else flags.pin_cpu_memory)
    for name in requested.unset():
        messages.append(f"{name} unset: SGLang's default for {ctx.task} on {ctx.memory_gib:g} GiB is "
                        f"{getattr(effective, name)}")
    return effective, EngineDetails(source="model", version=None, layerwise_components=tuple(components),
                                    context=ctx)


def _resolve_sglang_legacy(flags: OffloadFlags, context: EngineContext | None = None,
                           policy: str = "sglang-legacy") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """Between SGLang #24593 and #26925 (2026-05-07 .. 2026-06-01): DiT layerwise forces dit_cpu_offload off.

    This is the bug: the loader then materialises the whole DiT on the GPU before layerwise packs it to the host.
    No release shipped this era's code (0.5.13 already has #26925), so there is no engine to check it against and
    it models fully set flags only.
    """
    if flags.unset():
        raise _refuse(policy, flags, "set flags", "this era's defaults were never released; use sglang@<version>")
    _refuse_resident_layers(policy, flags, "this era (May 2026)")
    if flags.layerwise_offload_components is not None:
        raise _refuse(policy, flags, "layerwise_offload_components", "this model streams the DiT alone")
    messages: list[str] = []
    flags = _common_prefetch_rules(flags, messages)
    if flags.dit_layerwise_offload and flags.dit_cpu_offload:
        messages.append(
            "layerwise offload is selected for DiT components, automatically disabling dit_cpu_offload."
        )
        flags = replace(flags, dit_cpu_offload=False)
    return flags, messages, None


def _resolve_sglang_pre18997(flags: OffloadFlags, context: EngineContext | None = None,
                             policy: str = "sglang-pre18997") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """Before SGLang #18997 (2026-02-19; release 0.5.8): DiT layerwise forces dit_cpu_offload off, unconditionally.

    0.5.8's `ServerArgs` (`runtime/server_args.py`, `adjust_offload` and `check_server_args`): unset component flags
    default by task type (image: DiT and text encoder offloaded, VAE resident; video: all three offloaded), with no
    memory rule; a Wan pipeline gets DiT layerwise when the flag is unset; then layerwise on clears
    dit_cpu_offload, whether the user set it or the default did. 0.5.8 has no `dit_offload_prefetch_size` (its
    manager prefetches the next layer, which is 0 here): any other value is refused.
    """
    if flags.dit_offload_prefetch_size != 0:
        raise _refuse(policy, flags, "dit_offload_prefetch_size",
                      "0.5.8 has no such flag; its layerwise manager always prefetches the next layer")
    _refuse_resident_layers(policy, flags, "0.5.8")
    if flags.layerwise_offload_components is not None:
        raise _refuse(policy, flags, "layerwise_offload_components", "0.5.8 has no such flag")
    context = _need_context(policy, flags, context)
    messages: list[str] = []
    details: EngineDetails | None = None
    if context is not None:
        image = context.is_image
        lw = flags.dit_layerwise_offload
        if lw is None and context.family == "wan":
            messages.append("Automatically enable dit_layerwise_offload for Wan for best performance")
            lw = True
        flags = replace(
            flags,
            dit_cpu_offload=True if flags.dit_cpu_offload is None else flags.dit_cpu_offload,
            dit_layerwise_offload=bool(lw),
            text_encoder_cpu_offload=True if flags.text_encoder_cpu_offload is None else flags.text_encoder_cpu_offload,
            vae_cpu_offload=(not image) if flags.vae_cpu_offload is None else flags.vae_cpu_offload,
            pin_cpu_memory=True if flags.pin_cpu_memory is None else flags.pin_cpu_memory,
        )
        details = EngineDetails(source="model", version="0.5.8", context=context)
    if flags.dit_layerwise_offload and flags.dit_cpu_offload:
        messages.append("dit_layerwise_offload is enabled, automatically disabling dit_cpu_offload.")
        flags = replace(flags, dit_cpu_offload=False)
    return flags, messages, details


PolicyFn = Callable[..., tuple[OffloadFlags, list[str], EngineDetails | None]]

POLICIES: dict[str, PolicyFn] = {
    "sglang": _resolve_sglang,
    "sglang-0.5.13": _resolve_sglang_0513,
    "sglang-legacy": _resolve_sglang_legacy,
    "sglang-pre18997": _resolve_sglang_pre18997,
}
"""Our hand-written models. `sglang@<version>` and `sglang@installed` ask the real engine instead."""

ENGINE_PREFIX = "sglang@"
MODEL_FOR_VERSION: dict[str, str] = {"0.5.8": "sglang-pre18997", "0.5.13": "sglang-0.5.13", "0.5.23": "sglang"}
"""Which hand-written model follows which release (checked by tests/test_engine_differential.py)."""


def check_policy(name: Any, where: str = "policy") -> str:
    """Returns a valid policy name: one of POLICIES, `sglang@<version>` or `sglang@installed`.

    The engine policies are checked by form only: whether the version is installed is asked when resolving.
    """
    if isinstance(name, str) and name.startswith(ENGINE_PREFIX):
        version = name[len(ENGINE_PREFIX):]
        if version == "installed" or re.fullmatch(r"\d+(\.\d+){1,3}([a-z0-9.+-]*)", version):
            return name
        raise FlagError(f"{where}: {name!r}: expected sglang@<version> (e.g. sglang@0.5.23) or sglang@installed")
    if not isinstance(name, str) or name not in POLICIES:
        known = [*POLICIES, "sglang@<version>", "sglang@installed"]
        raise FlagError(f"{where}: unknown policy {name!r}; known policies: {', '.join(known)}")
    return name


def engine_version(policy: str) -> str | None:
    """The SGLang release an engine policy names (`installed`: the newest installed), or None for our models.

    Raises:
        FlagError: `sglang@installed` with no release installed.
    """
    if not policy.startswith(ENGINE_PREFIX):
        return None
    version = policy[len(ENGINE_PREFIX):]
    if version == "installed":
        from harness.engine.policy import available_versions

        versions = available_versions()
        if not versions:
            raise FlagError("policy 'sglang@installed': no SGLang release is installed; install one with "
                            "`python -m harness.engine.install 0.5.23`")
        version = versions[-1]
    return version


def resolve(flags: OffloadFlags, policy: str, context: EngineContext | None = None) -> Resolution:
    """Resolves requested flags under a named policy (`context`: the card and task, for unset flags).

    Example:
        >>> r = resolve(OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True), "sglang-legacy")
        >>> r.effective.dit_cpu_offload
        False
    """
    return resolve_many([flags], policy, context)[0]


def resolve_many(flags_list: list[OffloadFlags], policy: str,
                 context: EngineContext | None = None) -> list[Resolution]:
    """`resolve` for many flag sets under one policy and context: an engine policy asks one child for all.

    Raises:
        FlagError: an unknown policy, unset flags without a context, or flags our model cannot express.
        harness.engine.policy.EngineError: the engine policy's release is not installed or its child failed.
    """
    check_policy(policy)
    version = engine_version(policy)
    if version is None:
        out = []
        for flags in flags_list:
            effective, messages, details = POLICIES[policy](flags, context, policy)
            out.append(Resolution(policy, flags, effective, tuple(messages), details))
        return out
    return _resolve_with_engine(flags_list, policy, version, context)


def _resolve_with_engine(flags_list: list[OffloadFlags], policy: str, version: str,
                         context: EngineContext | None) -> list[Resolution]:
    from harness.engine.policy import EngineRequest, resolve_engine

    if context is None:
        raise FlagError(f"policy {policy!r}: SGLang's ServerArgs needs the card and task; pass an EngineContext")
    requests = [EngineRequest(flags=flags.as_dict(), memory_gib=float(context.memory_gib), family=context.family,
                              task=context.task, performance_mode=context.performance_mode)  # type: ignore[arg-type]
                for flags in flags_list]
    out = []
    for flags, answer in zip(flags_list, resolve_engine(version, requests), strict=True):
        if answer.error:
            raise FlagError(f"policy {policy!r}: SGLang {version} refuses {flags.label()}: {answer.error}")
        streamed = [c for c in answer.layerwise_components if c not in RUNNABLE_LAYERWISE_COMPONENTS]
        if streamed:
            raise FlagError(
                f"policy {policy!r}: SGLang {version} streams {', '.join(streamed)} layer by layer for "
                f"{flags.label()}; the harness streams the zoo's roles only (DiT, text encoder, VAE)"
            )
        effective = engine_flags(answer.effective, answer.layerwise_components, answer.dit_residency)
        details = EngineDetails(source="sglang", version=answer.version,
                                layerwise_components=answer.layerwise_components,
                                dit_residency=answer.dit_residency, pipeline_config=answer.pipeline_config,
                                context=context, residency=answer.extra.get("residency"))
        out.append(Resolution(policy, flags, effective, answer.messages, details))
    return out


RUNNABLE_LAYERWISE_COMPONENTS = ("dit", "text_encoder", "image_encoder", "vae", "all")
"""Layerwise selections the harness can run: the DiT, the text encoder and the VAE (harness.cell.offload.layerwise), and
SGLang's image_encoder group, which selects nothing in the zoo's families (none has a separate image encoder)."""


def engine_flags(effective: Mapping[str, Any], components: tuple[str, ...] | list[str] | None = None,
                 dit_residency: str | None = None) -> OffloadFlags:
    """SGLang's resolved values as OffloadFlags: a None left by a release without finalisation (0.5.8) is off, as
    SGLang's runtime reads it; a release without the prefetch flag (0.5.8) prefetches the next layer, 0 here; one
    without resident layers (before 0.5.23) streams every layer (0, leading). With the release's final component
    list and DiT residency (0.5.23), `dit_layerwise_offload` is whether the DiT resolves to layerwise offload and
    `layerwise_offload_components` the roles beyond the DiT it streams (`streamed_roles`), as our model reports."""
    values: dict[str, Any] = {}
    defaults = OffloadFlags()
    for name in OffloadFlags.names():
        value = effective.get(name)
        if name in NUMBER_FLAGS:
            values[name] = float(value) if value is not None else 0.0
        elif name == "dit_layerwise_residency_policy":  # absent before 0.5.23: every layer streamed
            values[name] = str(value) if value is not None else defaults.dit_layerwise_residency_policy
        elif name == "layerwise_offload_components":
            values[name] = streamed_roles(components)
        elif name in MAP_FLAGS:
            values[name] = _component_map(name, value, "engine") if value else ()
        else:
            values[name] = bool(value) if name != "pin_cpu_memory" or value is not None else True
    if dit_residency is not None:
        values["dit_layerwise_offload"] = dit_residency == "layerwise-offload"
    return OffloadFlags(**values)
