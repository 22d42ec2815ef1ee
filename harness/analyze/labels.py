"""Flag combinations in words, for people: `cpu1-lw1-te1-vae0-pf1-pin1` reads "DiT CPU offload + layerwise
(prefetch 1) · text encoder offload · pinned". The compact label stays the id (cell ids, baselines, hover text);
these words are what the HTML report, `list` and the history page show first.

Only what is switched on is named (a combination with every switch off reads "all on the device"); a switch left
to the engine's defaults (None) reads "<flag>: engine default".
"""

from __future__ import annotations

from harness.common.contract import CellRecord
from harness.common.flags import OffloadFlags

_COMPONENT_WORDS = {"dit": "DiT", "text_encoder": "text encoder", "image_encoder": "image encoder", "vae": "VAE",
                    "all": "every component", "transformer": "DiT"}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _dit_words(f: OffloadFlags) -> list[str]:
    out = []
    if f.dit_cpu_offload is None or f.dit_layerwise_offload is None:
        out += [f"{name.replace('_', ' ')}: engine default" for name in ("dit_cpu_offload", "dit_layerwise_offload")
                if getattr(f, name) is None]
    dit = [w for w, on in (("CPU offload", f.dit_cpu_offload), ("layerwise", f.dit_layerwise_offload)) if on]
    if dit:
        text = "DiT " + " + ".join(dit)
        if f.dit_layerwise_offload:
            text += f" (prefetch {_num(f.dit_offload_prefetch_size)})"
            if f.dit_layerwise_resident_layers:
                text += f", {_num(f.dit_layerwise_resident_layers)} resident ({f.dit_layerwise_residency_policy})"
        out.append(text)
    return out


def flag_words(f: OffloadFlags) -> str:
    """The flags in words, only what is on (see the module docstring)."""
    parts = _dit_words(f)
    for name, words in (("text_encoder_cpu_offload", "text encoder offload"), ("vae_cpu_offload", "VAE offload")):
        value = getattr(f, name)
        if value is None:
            parts.append(f"{words}: engine default")
        elif value:
            parts.append(words)
    if f.layerwise_offload_components is not None:
        chosen = [_COMPONENT_WORDS.get(c, c) for c in f.layerwise_offload_components]
        parts.append("layerwise components: " + (", ".join(chosen) or "none"))
    for name, what in (("layerwise_prefetch_size", "prefetch"), ("layerwise_resident_layers", "resident"),
                       ("layerwise_residency_policy", "policy")):
        for component, value in getattr(f, name):
            shown = value if isinstance(value, str) else _num(value)
            parts.append(f"{_COMPONENT_WORDS.get(component, component)} {what} {shown}")
    if not any((f.dit_cpu_offload, f.dit_layerwise_offload, f.text_encoder_cpu_offload, f.vae_cpu_offload,
                f.layerwise_offload_components)):
        parts.insert(0, "all on the device")
    if f.pin_cpu_memory is None:
        parts.append("pinning: engine default")
    elif f.pin_cpu_memory and any((f.dit_cpu_offload, f.dit_layerwise_offload, f.text_encoder_cpu_offload,
                                   f.vae_cpu_offload, f.layerwise_offload_components)):
        parts.append("pinned")
    elif not f.pin_cpu_memory:
        parts.append("pageable (not pinned)")
    return " · ".join(parts)


def cell_words(record: CellRecord) -> str:
    """A cell in words: its requested flags, then the CFG batching and the backend where they are not the
    default (the words of `CellRecord.label`)."""
    text = flag_words(record.requested)
    if record.cfg_batch:
        text += " · CFG batched"
    if record.backend and record.backend != "harness":
        text += f" · on {record.backend}"
    return text
