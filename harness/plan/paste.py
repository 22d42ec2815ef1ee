"""What a person pastes: the engine flags of a combination, and the link speeds that scale a transfer-bound step.

- `sglang_flags`: SGLang's command-line flags (`sglang serve ... <these>`), spelled as SGLang 0.5.23's
  `ServerArgs.add_cli_args` spells them (multimodal_gen/runtime/server_args/server_args.py): every switch is a
  `StoreBoolean` taking `true`/`false`, the numbers are floats, `--layerwise-offload-components` takes its groups
  space-separated and the per-component maps `component=value,...`.
- `diffusers_calls`: the diffusers calls that come closest, for the diffusers backend (what the harness's
  `diffusers-group` backend runs: `apply_group_offloading`, block level, a side stream), with what has no
  diffusers counterpart said as a comment.
- `PCIE_GBPS` and `pcie_scaled`: a machine profile's H2D rates moved to another PCIe generation.

This module imports no torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from harness.common.flags import MAP_FLAGS, OffloadFlags

PCIE_GBPS: dict[str, float] = {"gen3": 15.75, "gen4": 31.5, "gen5": 63.0}
"""Theoretical x16 bandwidth per direction, GB/s: 8, 16 and 32 GT/s per lane x 16 lanes x 128b/130b encoding
(PCI-SIG's PCIe 3.0/4.0/5.0 base specifications). The measured pinned H2D of the profiled machines (H100 SXM and
H200, both PCIe gen5 x16 to the host) is 54-55 GB/s, 87 % of gen5's 63; a gen4 card is planned at the same share of
its link: the profile's rate x (31.5 / 63.0)."""
PCIE_SOURCE = ("x16 per direction: gen3 15.75, gen4 31.5, gen5 63.0 GB/s (8/16/32 GT/s x 16 lanes x 128b/130b, "
               "PCI-SIG base specs)")
MACHINE_PCIE: dict[str, str] = {"nvidia-h100-80gb-hbm3": "gen5", "nvidia-h200": "gen5"}
"""The host link of each profiled machine (both SXM boards: PCIe gen5 x16)."""

SGLANG_VERSION = "0.5.23"


def pcie_scaled(machine: Any, generation: str) -> Any:
    """`machine` (a planner Machine) with its H2D rates scaled from its own link to `generation`'s; the name stays
    (it picks the profile's timed compute)."""
    own = MACHINE_PCIE.get(machine.name, "gen5")
    ratio = PCIE_GBPS[generation] / PCIE_GBPS[own]
    source = (f"{machine.source}; PCIe {generation}: H2D scaled x{ratio:g} from the profile's {own} "
              f"({machine.pinned_h2d_gbps:g} -> {machine.pinned_h2d_gbps * ratio:.2f} GB/s pinned; {PCIE_SOURCE})")
    return replace(machine, pinned_h2d_gbps=round(machine.pinned_h2d_gbps * ratio, 3),
                   pageable_h2d_gbps=round(machine.pageable_h2d_gbps * ratio, 3), source=source)


def _b(v: bool | None) -> str:
    return "true" if v else "false"


def _num(v: float) -> str:
    return f"{float(v):g}"


def sglang_flags(flags: OffloadFlags) -> str:
    """The effective flags as SGLang 0.5.23 CLI flags. Example:
    `--dit-cpu-offload true --dit-layerwise-offload true --dit-offload-prefetch-size 1 ...`."""
    out = [f"--dit-cpu-offload {_b(flags.dit_cpu_offload)}",
           f"--dit-layerwise-offload {_b(flags.dit_layerwise_offload)}"]
    if flags.dit_layerwise_offload:
        out.append(f"--dit-offload-prefetch-size {_num(flags.dit_offload_prefetch_size)}")
        if flags.dit_layerwise_resident_layers:
            out.append(f"--dit-layerwise-resident-layers {_num(flags.dit_layerwise_resident_layers)}")
            out.append(f"--dit-layerwise-residency-policy {flags.dit_layerwise_residency_policy}")
    out += [f"--text-encoder-cpu-offload {_b(flags.text_encoder_cpu_offload)}",
            f"--vae-cpu-offload {_b(flags.vae_cpu_offload)}",
            f"--pin-cpu-memory {_b(flags.pin_cpu_memory)}"]
    if flags.layerwise_offload_components:
        out.append("--layerwise-offload-components " + " ".join(flags.layerwise_offload_components))
    for name in MAP_FLAGS:
        entries = getattr(flags, name)
        if entries:
            text = ",".join(f"{c}={v if isinstance(v, str) else _num(v)}" for c, v in entries)
            out.append(f"--{name.replace('_', '-')} {text}")
    return " ".join(out)


TEXT_ENCODERS = {"flux": ("text_encoder", "text_encoder_2")}


def diffusers_calls(flags: OffloadFlags, family: str = "") -> list[str]:
    """The diffusers calls closest to `flags` on a loaded pipeline `pipe` (diffusers 0.42). A DiT streamed layer by
    layer is group offload at block level (`prefetch` blocks a group, the next group copied on a side stream);
    a component CPU-offloaded whole is `enable_model_cpu_offload` when all are, else a group of the whole model."""
    calls: list[str] = []
    encoders = TEXT_ENCODERS.get(family, ("text_encoder",))
    whole = {"transformer": bool(flags.dit_cpu_offload and not flags.dit_layerwise_offload),
             **{e: bool(flags.text_encoder_cpu_offload) for e in encoders}, "vae": bool(flags.vae_cpu_offload)}
    if flags.dit_layerwise_offload:
        whole.pop("transformer")
        blocks = max(1, int(flags.dit_offload_prefetch_size))
        calls.append('pipe.transformer.enable_group_offload(onload_device=torch.device("cuda"), '
                     'offload_device=torch.device("cpu"), offload_type="block_level", '
                     f"num_blocks_per_group={blocks}, use_stream=True)")
        if flags.dit_layerwise_resident_layers:
            calls.append(f"# no diffusers counterpart of --dit-layerwise-resident-layers "
                         f"{_num(flags.dit_layerwise_resident_layers)}: every block streams")
        if not flags.pin_cpu_memory:
            calls.append("# diffusers always pins the offloaded copies (pin_cpu_memory false has no counterpart)")
    if "transformer" in whole and all(whole.values()):
        # not with group offload on the transformer: diffusers refuses to mix the two
        calls.append("pipe.enable_model_cpu_offload()")
    else:
        for name, on in whole.items():
            if on:
                calls.append(f'pipe.{name}.enable_group_offload(onload_device=torch.device("cuda"), '
                             'offload_device=torch.device("cpu"), offload_type="block_level", '
                             "num_blocks_per_group=1_000_000)  # the whole model as one group")
            else:
                calls.append(f'pipe.{name}.to("cuda")')
    return calls
