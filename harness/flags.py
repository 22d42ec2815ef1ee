"""Offload flags and the policies that turn requested flags into the flags an engine really runs with.

SGLang resolves its offload flags in `ServerArgs` before anything is loaded, and one step of that resolution was
the #26925 bug: with DiT layerwise offload on, `dit_cpu_offload` was forced off, so the loader put the whole DiT on
the GPU. Each named policy here reproduces one era of that resolution, so a scenario can run "as SGLang would
have" and the record keeps requested flags, effective flags and the policy's messages side by side.

This module imports no torch: the parent process and the CPU tests use it freely.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


class FlagError(ValueError):
    """A flag, its value or a policy name is not valid. The message names the field."""


@dataclass(frozen=True)
class OffloadFlags:
    """The offload flags of a DiT serving engine, with SGLang's names and meanings.

    Args:
        dit_cpu_offload (bool, defaults to False): DiT weights start on the host; the whole module moves to the
            GPU before the denoise loop and back after it.
        dit_layerwise_offload (bool, defaults to False): the DiT's layers are streamed one at a time from pinned
            host buffers on a side CUDA stream, with a prefetch window.
        text_encoder_cpu_offload (bool, defaults to False): as dit_cpu_offload, for the text encoder.
        vae_cpu_offload (bool, defaults to False): as dit_cpu_offload, for the VAE.
        dit_offload_prefetch_size (float, defaults to 0.0): the layerwise prefetch window; see `prefetch_layers`.
        pin_cpu_memory (bool, defaults to True): host copies are page-locked, so copies to the GPU run async.
    """

    dit_cpu_offload: bool = False
    dit_layerwise_offload: bool = False
    text_encoder_cpu_offload: bool = False
    vae_cpu_offload: bool = False
    dit_offload_prefetch_size: float = 0.0
    pin_cpu_memory: bool = True

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
        return asdict(self)

    def label(self) -> str:
        """A short, readable id of these flags, used in cell ids and table rows."""

        def b(v: bool) -> str:
            return "1" if v else "0"

        pf = self.dit_offload_prefetch_size
        pf_text = str(int(pf)) if float(pf).is_integer() else repr(float(pf))  # repr: distinct values, distinct ids
        return (
            f"cpu{b(self.dit_cpu_offload)}-lw{b(self.dit_layerwise_offload)}-te{b(self.text_encoder_cpu_offload)}"
            f"-vae{b(self.vae_cpu_offload)}-pf{pf_text}-pin{b(self.pin_cpu_memory)}"
        )


def check_flag_value(name: str, value: Any, where: str = "flags") -> Any:
    """Returns `value` normalised for flag `name`, or raises FlagError naming the field."""
    if name not in OffloadFlags.names():
        raise FlagError(f"{where}: unknown flag {name!r}; known flags: {', '.join(OffloadFlags.names())}")
    if name == "dit_offload_prefetch_size":
        # bool is an int subclass; `true` as a prefetch size is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite_number(value):
            raise FlagError(f"{where}.{name}: expected a finite number >= 0, got {value!r}")
        if value < 0:
            raise FlagError(f"{where}.{name}: must be >= 0 (0 means one layer), got {value!r}")
        return float(value)
    if not isinstance(value, bool):
        raise FlagError(f"{where}.{name}: expected true or false, got {value!r}")
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


@dataclass(frozen=True)
class Resolution:
    """What a policy made of the requested flags."""

    policy: str
    requested: OffloadFlags
    effective: OffloadFlags
    messages: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "requested": self.requested.as_dict(),
            "effective": self.effective.as_dict(),
            "messages": list(self.messages),
        }


def _common_prefetch_rules(flags: OffloadFlags, messages: list[str]) -> OffloadFlags:
    """Prefetch-size handling shared by both SGLang eras (ServerArgs._validate_offload)."""
    v = flags.dit_offload_prefetch_size
    if not flags.dit_layerwise_offload:
        if v != 0:
            messages.append(
                f"dit_offload_prefetch_size={v:g} has no effect without dit_layerwise_offload; recorded as 0"
            )
        return replace(flags, dit_offload_prefetch_size=0.0)
    if v > 1 and not float(v).is_integer():
        messages.append(f"Invalid --dit-offload-prefetch-size value passed, truncated to: {int(v)}")
        return replace(flags, dit_offload_prefetch_size=float(int(v)))
    if 0.5 <= v < 1.0:
        messages.append("We do not recommend --dit-offload-prefetch-size to be between 0.5 and 1.0")
    return flags


def _resolve_sglang(flags: OffloadFlags) -> tuple[OffloadFlags, list[str]]:
    """After SGLang #26925 (2026-06-01): dit_cpu_offload is kept together with DiT layerwise offload.

    Only non-DiT component CPU offload is cleared for components that layerwise manages; our layerwise runtime
    manages the DiT alone, so no component flag changes here.
    """
    messages: list[str] = []
    flags = _common_prefetch_rules(flags, messages)
    return flags, messages


def _resolve_sglang_legacy(flags: OffloadFlags) -> tuple[OffloadFlags, list[str]]:
    """Between SGLang #24593 and #26925 (2026-05-07 .. 2026-06-01): DiT layerwise forces dit_cpu_offload off.

    This is the bug: the loader then materialises the whole DiT on the GPU before layerwise packs it to the host.
    """
    messages: list[str] = []
    flags = _common_prefetch_rules(flags, messages)
    if flags.dit_layerwise_offload and flags.dit_cpu_offload:
        messages.append(
            "layerwise offload is selected for DiT components, automatically disabling dit_cpu_offload."
        )
        flags = replace(flags, dit_cpu_offload=False)
    return flags, messages


POLICIES: dict[str, Callable[[OffloadFlags], tuple[OffloadFlags, list[str]]]] = {
    "sglang": _resolve_sglang,
    "sglang-legacy": _resolve_sglang_legacy,
}


def check_policy(name: Any, where: str = "policy") -> str:
    if not isinstance(name, str) or name not in POLICIES:
        raise FlagError(f"{where}: unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    return name


def resolve(flags: OffloadFlags, policy: str) -> Resolution:
    """Resolves requested flags under a named policy.

    Example:
        >>> r = resolve(OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True), "sglang-legacy")
        >>> r.effective.dit_cpu_offload
        False
    """
    effective, messages = POLICIES[check_policy(policy)](flags)
    return Resolution(policy=policy, requested=flags, effective=effective, messages=tuple(messages))
