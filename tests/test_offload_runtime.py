"""harness/cell/offload on the CPU: layouts, the layerwise runtime, component offload, the ledger and placements.

The CPU profile's "device" is the host, so every check here is about bookkeeping and bit-exact outputs: a runtime
that streams the wrong bytes, or none, must change the output, and the ledger must count what is resident.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cell.checkpoint import ensure_checkpoint
from harness.cell.offload.component import ComponentOffload
from harness.cell.offload.layerwise import LayerwiseRuntime
from harness.cell.offload.loader import load_component
from harness.cell.offload.memory import SLICE_ALIGN, Device, HostRegion, Layout, SimulatedOutOfMemoryError
from harness.common.contract import Placement
from harness.common.flags import OffloadFlags
from harness.models import get_model

NUM_LAYERS = 6

# ------------------------------------------------------------------------------------------------ toy model


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim + 3)  # odd sizes, so slots need alignment padding
        self.down = nn.Linear(2 * dim + 3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, dim: int = 13, layers: int = NUM_LAYERS) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def toy(request: pytest.FixtureRequest) -> tuple[Toy, dict[str, torch.Tensor], list[torch.Tensor]]:
    """A seeded toy model, a copy of its weights, and two inputs."""
    torch.manual_seed(0)
    model = Toy().to(request.param).eval().requires_grad_(False)
    for p in model.parameters():  # non-trivial norm weights too
        p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [torch.randn(2, 7, 5).to(request.param) for _ in range(2)]
    return model, state, inputs


def reader(state: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], object]:
    """A fill source in the runtimes' `read(name, destination)` form, copying from live tensors."""
    return lambda name, dst: dst.copy_(state[name])


def forward_all(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(x) for x in inputs]


def streamed(model: Toy, state: dict[str, torch.Tensor], p: float, resident: float = 0.0,
             policy: str = "leading") -> tuple[Toy, LayerwiseRuntime, Device]:
    m = copy.deepcopy(model)
    device = Device("cpu")
    rt = LayerwiseRuntime(m, ("blocks",), device, prefetch_size=p, pin=True, resident_layers=resident,
                          residency_policy=policy)
    rt.fill(reader(state))
    rt.attach()
    return m, rt, device


# ------------------------------------------------------------------------------------------------ Layout


@pytest.mark.parametrize(
    "shapes",
    [
        [(torch.float32, (13,)), (torch.bfloat16, (7, 3)), (torch.float32, (1,)), (torch.int64, (5, 5))],
        [(torch.bfloat16, (257,))],
        [(torch.uint8, (1,)), (torch.uint8, (1,)), (torch.uint8, (300,))],
        [(torch.float32, (64, 64)), (torch.float32, (0,)), (torch.float16, (3, 3, 3))],
    ],
)
def test_layout_packs_aligned_non_overlapping_slots_without_rounding_up(shapes: list) -> None:
    layout = Layout.plan((f"t{i}", dt, shape) for i, (dt, shape) in enumerate(shapes))
    slots = layout.slots
    assert [s.name for s in slots] == [f"t{i}" for i in range(len(shapes))]
    for s, (dt, shape) in zip(slots, shapes, strict=True):
        assert s.offset % SLICE_ALIGN == 0
        assert s.nbytes == torch.empty(shape, dtype=dt).nbytes
    for a, b in itertools.pairwise(slots):
        assert a.offset + a.nbytes <= b.offset < a.offset + a.nbytes + SLICE_ALIGN
    assert layout.nbytes == slots[-1].offset + slots[-1].nbytes
    if layout.nbytes & (layout.nbytes - 1):  # not a power of two: no rounding up to the next one
        assert layout.nbytes < 1 << layout.nbytes.bit_length()


def test_layout_views_round_trip_values_through_a_flat_region() -> None:
    tensors = {"a": torch.randn(7, 3), "b": torch.arange(11, dtype=torch.int64), "c": torch.randn(5).bfloat16()}
    layout = Layout.plan((n, t.dtype, tuple(t.shape)) for n, t in tensors.items())
    region = HostRegion(layout.nbytes, pin=True)
    assert region.tensor.numel() == layout.nbytes
    region.pin()
    assert not region.pinned  # no CUDA: nothing to pin
    views = layout.views(region.tensor)
    for n, t in tensors.items():
        views[n].copy_(t)
    for n, t in layout.views(region.tensor).items():
        assert torch.equal(t, tensors[n])


def test_empty_layout_has_no_bytes() -> None:
    layout = Layout.plan([])
    assert layout.nbytes == 0 and layout.slots == ()
    assert HostRegion(0, pin=False).tensor.numel() == 0


# ------------------------------------------------------------------------------------------------ LayerwiseRuntime


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_layerwise_output_equals_resident_over_two_forwards(toy, p: int) -> None:
    model, state, inputs = toy
    expected = forward_all(model, inputs)
    m, rt, device = streamed(model, state, p)
    window = rt.groups[0].prefetch
    assert window == p
    seen: list[tuple[int, int]] = []
    layer_bytes = rt.layer_bytes()
    assert len(set(layer_bytes)) == 1  # identical blocks: the ledger is a multiple of one layer

    def watch(module: nn.Module, args: object) -> None:  # runs after the runtime's pre-hook
        seen.append((rt.resident_layers(), device.ledger_bytes))

    for block in m.blocks:
        block.register_forward_pre_hook(watch)
    got = forward_all(m, inputs)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert len(seen) == 2 * NUM_LAYERS
    assert max(r for r, _ in seen) == min(2 * window, NUM_LAYERS)
    assert all(ledger == resident * layer_bytes[0] for resident, ledger in seen)
    assert rt.copied_bytes >= 2 * sum(layer_bytes)
    rt.release_all()
    assert rt.resident_layers() == 0
    assert device.ledger_bytes == 0
    assert device.ledger_peak_bytes == min(2 * window, NUM_LAYERS) * layer_bytes[0]


def test_layerwise_keeps_first_window_prefetched_between_forwards(toy) -> None:
    model, state, inputs = toy
    m, rt, device = streamed(model, state, 2)
    assert rt.resident_layers() == 0 and device.ledger_bytes == 0
    forward_all(m, inputs[:1])
    assert sorted(rt.groups[0].resident) == [0, 1]  # the wrap-around prefetch for the next forward
    rt.detach()
    assert rt.resident_layers() == 0 and device.ledger_bytes == 0


def test_layerwise_parameters_are_empty_placeholders_outside_their_window(toy) -> None:
    model, state, _ = toy
    m, rt, _ = streamed(model, state, 1)
    assert all(p.numel() == 0 for p in m.blocks.parameters())
    assert all(p.numel() > 0 for p in m.head.parameters())  # non-layer weights are not streamed
    assert rt.param_bytes() <= rt.host_bytes
    assert rt.layer_param_names == {f"blocks.{n}" for n, _ in model.blocks.named_parameters()}


def _wrong_layer(orig: Callable) -> Callable:
    def prefetch(self: LayerwiseRuntime, g, i):  # type: ignore[no-untyped-def]
        res = orig(self, g, i)
        res.buffer.copy_(g.regions[(i + 1) % len(g.layers)].tensor)  # the neighbour's bytes
        return res

    return prefetch


def _skipped_copy(orig: Callable) -> Callable:
    def prefetch(self: LayerwiseRuntime, g, i):  # type: ignore[no-untyped-def]
        res = orig(self, g, i)
        res.buffer.zero_()  # as if the copy never ran
        return res

    return prefetch


@pytest.mark.parametrize("breakage", [_wrong_layer, _skipped_copy], ids=["wrong-layer", "skipped-copy"])
@pytest.mark.parametrize("p", [1, 3])
def test_equivalence_check_catches_a_broken_runtime(toy, monkeypatch, breakage: Callable, p: int) -> None:
    model, state, inputs = toy
    expected = forward_all(model, inputs)
    monkeypatch.setattr(LayerwiseRuntime, "_prefetch", breakage(LayerwiseRuntime._prefetch))
    m, _, _ = streamed(model, state, p)
    got = forward_all(m, inputs)
    assert not any(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_layerwise_raises_if_module_declares_no_groups(toy) -> None:
    model, _, _ = toy
    with pytest.raises(ValueError, match="no layer groups"):
        LayerwiseRuntime(model, (), Device("cpu"), 1, pin=False)


def test_layerwise_load_raises_simulated_oom_if_window_exceeds_cap(toy) -> None:
    model, state, inputs = toy
    m = copy.deepcopy(model)
    rt = LayerwiseRuntime(m, ("blocks",), Device("cpu"), prefetch_size=2, pin=False)
    layer = rt.layer_bytes()[0]
    rt.device.cap_bytes = 3 * layer  # a window of 2 plus the next window of 2 does not fit
    rt.fill(reader(state))
    rt.attach()
    with pytest.raises(SimulatedOutOfMemoryError):
        forward_all(m, inputs[:1])
    assert rt.device.ledger_bytes <= 3 * layer


@pytest.mark.parametrize("policy", ["leading", "strided"])
@pytest.mark.parametrize(("resident", "kept"), [(0, 0), (2, 2), (0.5, 3), (5.0, 5), (6, 6), (99, 6)])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_resident_layers_stay_and_the_rest_stream_with_the_window_rule(
    toy, policy: str, resident: float, kept: int, p: int
) -> None:
    model, state, inputs = toy
    expected = forward_all(model, inputs)
    m, rt, device = streamed(model, state, p, resident, policy)
    g = rt.groups[0]
    layer = rt.layer_bytes()[0]
    assert len(g.kept) == kept and len(g.streamed) == NUM_LAYERS - kept
    assert g.kept | set(g.streamed) == set(range(NUM_LAYERS))
    if policy == "leading":
        assert g.kept == set(range(kept))
    window = min(p, NUM_LAYERS - kept) if kept < NUM_LAYERS else 1
    assert g.prefetch == window
    assert rt.kept_bytes() == kept * layer and rt.streamed_bytes() == (NUM_LAYERS - kept) * layer
    assert device.ledger_bytes == 0  # nothing is placed before the first forward (SGLang's "forward" lifetime)

    got = forward_all(m, inputs)  # two forwards of one "request"
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert g.kept <= set(g.resident)  # kept layers stay between forwards
    streamed_now = len(set(g.resident) - g.kept)
    assert device.ledger_bytes == (kept + streamed_now) * layer
    bound = kept + (2 * window if g.streamed else 0)
    assert device.ledger_peak_bytes <= bound * layer
    # kept layers move once per request, streamed ones once per forward (+ the wrap-around prefetch of window 0)
    wrap = len(g.window(0)) if g.streamed and g.num_windows > 1 else 0
    assert rt.copied_bytes == (kept + 2 * (NUM_LAYERS - kept) + wrap) * layer
    rt.release_all()
    assert device.ledger_bytes == 0 and rt.resident_layers() == 0
    got = forward_all(m, inputs)  # the next request re-arms the kept set from the host regions
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_strided_residency_spreads_the_kept_layers() -> None:
    torch.manual_seed(0)
    m = Toy(layers=10)
    rt = LayerwiseRuntime(m, ("blocks",), Device("cpu"), prefetch_size=1, pin=False, resident_layers=5,
                          residency_policy="strided")
    assert rt.groups[0].streamed == (0, 2, 4, 6, 8)
    assert rt.groups[0].kept == {1, 3, 5, 7, 9}


def test_resident_layers_over_the_cap_fail_at_the_first_forward_not_at_load(toy) -> None:
    model, state, inputs = toy
    m = copy.deepcopy(model)
    rt = LayerwiseRuntime(m, ("blocks",), Device("cpu"), prefetch_size=1, pin=False, resident_layers=4)
    layer = rt.layer_bytes()[0]
    rt.device.cap_bytes = 5 * layer  # 4 kept + a window of 1 fit; the next window's prefetch does not
    rt.fill(reader(state))
    rt.attach()
    assert rt.device.ledger_bytes == 0
    with pytest.raises(SimulatedOutOfMemoryError):
        forward_all(m, inputs[:1])


# ------------------------------------------------------------------------------------------------ ComponentOffload


def test_component_offload_moves_whole_module_and_charges_the_ledger(toy) -> None:
    model, state, inputs = toy
    expected = forward_all(model, inputs)
    m = copy.deepcopy(model)
    device = Device("cpu")
    co = ComponentOffload(m, device, pin=False, name="toy")
    co.fill(reader(state))
    host = co.region.tensor.untyped_storage().data_ptr()
    assert all(p.device.type == "cpu" and p.untyped_storage().data_ptr() == host for p in m.parameters())
    assert device.ledger_bytes == 0 and not co.on_device
    assert co.host_bytes == co.layout.nbytes >= sum(p.nbytes for p in model.parameters())

    co.onload()
    co.onload()  # idempotent
    assert co.on_device and device.ledger_bytes == co.layout.nbytes
    buf = co._buffer.untyped_storage().data_ptr()  # type: ignore[union-attr]
    assert all(p.untyped_storage().data_ptr() == buf for p in m.parameters())
    for a, b in zip(forward_all(m, inputs), expected, strict=True):
        assert torch.equal(a, b)

    co.offload()
    co.offload()  # idempotent
    assert not co.on_device and device.ledger_bytes == 0
    assert device.ledger_peak_bytes == co.layout.nbytes
    assert all(p.untyped_storage().data_ptr() == host for p in m.parameters())
    for a, b in zip(forward_all(m, inputs), expected, strict=True):
        assert torch.equal(a, b)


def test_component_onload_raises_simulated_oom_if_over_cap(toy) -> None:
    model, state, _ = toy
    co = ComponentOffload(copy.deepcopy(model), Device("cpu", cap_bytes=100), pin=False, name="toy")
    co.fill(reader(state))
    with pytest.raises(SimulatedOutOfMemoryError, match="toy"):
        co.onload()
    assert not co.on_device and co.device.ledger_bytes == 0


# ------------------------------------------------------------------------------------------------ Device ledger


def test_device_charge_raises_torch_oom_if_over_cap() -> None:
    device = Device("cpu", cap_bytes=100)
    device.charge(60, "a")
    device.charge(40, "b")  # exactly at the cap is fine
    with pytest.raises(SimulatedOutOfMemoryError, match=r"placing c \(1 bytes\) would hold 101 bytes") as info:
        device.charge(1, "c")
    assert isinstance(info.value, torch.OutOfMemoryError)
    assert device.ledger_bytes == 100 and device.ledger_peak_bytes == 100


def test_device_empty_leaves_ledger_unchanged_if_it_fails() -> None:
    device = Device("cpu", cap_bytes=10)
    assert device.empty(10, "fits").numel() == 10
    with pytest.raises(torch.OutOfMemoryError):
        device.empty(1, "does not")
    assert device.ledger_bytes == 10


def test_device_ledger_peak_resets_to_current() -> None:
    device = Device("cpu")
    device.charge(50, "a")
    device.discharge(30)
    assert (device.ledger_bytes, device.ledger_peak_bytes) == (20, 50)
    device.reset_ledger_peak()
    assert device.ledger_peak_bytes == 20


def test_device_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        Device("tpu")


# ------------------------------------------------------------------------------------------------ placements


@pytest.mark.parametrize(("cpu", "lw", "te", "vae"), list(itertools.product([False, True], repeat=4)))
def test_placement_follows_effective_flags(cpu: bool, lw: bool, te: bool, vae: bool) -> None:
    flags = OffloadFlags(
        dit_cpu_offload=cpu, dit_layerwise_offload=lw, text_encoder_cpu_offload=te, vae_cpu_offload=vae
    )
    dit = {
        (True, True): "layerwise-from-host",
        (False, True): "layerwise-from-device",
        (True, False): "cpu-offload",
        (False, False): "resident",
    }[(cpu, lw)]
    assert Placement.for_role("dit", flags) == dit
    assert Placement.for_role("text_encoder", flags) == ("cpu-offload" if te else "resident")
    assert Placement.for_role("vae", flags) == ("cpu-offload" if vae else "resident")
    assert all(isinstance(Placement.for_role(r, flags), Placement) for r in ("dit", "text_encoder", "vae"))


def test_placement_raises_if_role_unknown() -> None:
    with pytest.raises(ValueError, match="unknown component role"):
        Placement.for_role("unet", OffloadFlags())


# ------------------------------------------------------------------------------------------------ tiny real DiT


@pytest.fixture(scope="module")
def tiny_dit() -> tuple[object, Path, Callable[[nn.Module], torch.Tensor], torch.Tensor, int]:
    spec = get_model("qwen-image-edit-tiny").components["dit"]
    ckpt = ensure_checkpoint(spec, seed=0, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 64, generator=gen).bfloat16()
    text = torch.randn(1, 8, 64, generator=gen).bfloat16()

    def forward(module: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return module(
                hidden_states=x,
                timestep=torch.tensor([0.5]).bfloat16(),
                encoder_hidden_states=text,
                encoder_hidden_states_mask=None,
                img_shapes=[[(1, 4, 4), (1, 4, 4)]],
                return_dict=False,
            )[0]

    device = Device("cpu")
    resident = load_component(spec, ckpt, "resident", device, pin=False)
    return spec, ckpt, forward, forward(resident.module), device.ledger_bytes


@pytest.mark.parametrize("placement", ["layerwise-from-host", "layerwise-from-device", "cpu-offload"])
@pytest.mark.parametrize("p", [1, 3])
def test_tiny_dit_output_equals_resident_if_offloaded(tiny_dit, placement: str, p: int) -> None:
    spec, ckpt, forward, expected, resident_bytes = tiny_dit
    device = Device("cpu")
    comp = load_component(spec, ckpt, placement, device, pin=True, prefetch_size=p)
    load_peak = device.ledger_peak_bytes
    comp.before_use()
    outs = [forward(comp.module), forward(comp.module)]
    comp.after_use()
    assert all(torch.equal(o, expected) for o in outs)
    if placement == "layerwise-from-device":
        assert load_peak >= resident_bytes  # the engine materialises the whole DiT first (the #26925 load peak)
    else:
        assert load_peak < resident_bytes / 4
    if isinstance(comp.runtime, LayerwiseRuntime):
        assert comp.runtime.resident_layers() == 0
        assert device.ledger_bytes == resident_bytes - comp.runtime.param_bytes()
        assert comp.describe()["layerwise"]["groups"]["transformer_blocks"] == {
            "layers": 6, "prefetch": p, "resident_layers": 0, "residency_policy": "leading", "resident_bytes": 0,
            "streamed_layers": 6,
        }
    else:
        assert device.ledger_bytes == 0


@pytest.mark.parametrize("policy", ["leading", "strided"])
@pytest.mark.parametrize("resident", [2, 0.5])
def test_tiny_dit_with_resident_layers_equals_resident_and_records_them(tiny_dit, resident: float,
                                                                        policy: str) -> None:
    spec, ckpt, forward, expected, resident_bytes = tiny_dit
    device = Device("cpu")
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_offload_prefetch_size=1,
                         dit_layerwise_resident_layers=resident, dit_layerwise_residency_policy=policy)
    comp = load_component(spec, ckpt, "layerwise-from-host", device, pin=True, prefetch_size=1, flags=flags)
    comp.before_use()
    outs = [forward(comp.module), forward(comp.module)]
    comp.after_use()
    assert all(torch.equal(o, expected) for o in outs)
    lw = comp.describe()["layerwise"]
    kept = 2 if resident == 2 else 3
    group = lw["groups"]["transformer_blocks"]
    assert (group["resident_layers"], group["streamed_layers"], group["residency_policy"]) == (kept, 6 - kept, policy)
    assert lw["resident_bytes"] + lw["streamed_bytes"] == lw["host_bytes"]
    assert device.ledger_bytes == resident_bytes - comp.runtime.param_bytes()  # after_use dropped the kept set
