"""The offload flags: SGLang's names and meanings (`OffloadFlags`), their checks, and the arithmetic the layerwise
runtime and the planner share (`prefetch_layers`, `resident_layer_count`, `streamed_layer_indices`).

The vocabulary only: which SGLang release turns requested flags into which effective ones is `harness.policy`.
This module imports no torch and no stage: every stage, the child included, speaks it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


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

    def hashed_dict(self) -> dict[str, Any]:
        """`as_dict` without `FLAGS_OMITTED_AT_DEFAULT` (resident layers, components, maps) while they are at
        their defaults: what a cell's spec hash covers, so a cell that leaves them at their defaults keeps the
        hash it had before they existed (resume, baselines)."""
        out = self.as_dict()
        for name, default in FLAGS_OMITTED_AT_DEFAULT.items():
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
FLAGS_OMITTED_AT_DEFAULT: dict[str, Any] = {
    "dit_layerwise_resident_layers": 0.0, "dit_layerwise_residency_policy": "leading",
    "layerwise_offload_components": None, "layerwise_prefetch_size": {}, "layerwise_resident_layers": {},
    "layerwise_residency_policy": {},
}
"""Flags a cell's spec hash, an engine request and ServerArgs carry only off these defaults (in `as_dict` form; see
`OffloadFlags.hashed_dict`): the resident layers, the component list and the per-component maps, which not every
release has and the hashes of cells without them do not cover."""
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


def component_map(name: str, value: Any, where: str) -> tuple[tuple[str, Any], ...]:
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
        return component_map(name, value, where)
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
