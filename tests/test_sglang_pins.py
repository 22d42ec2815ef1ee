"""What the SGLang backend's managers pinned, counted by the harness (`harness.engine.layerwise`): the tally of its own
cudaHostRegister calls (wrapped `_pin_in_place` / `_unpin_in_place`), the `is_pinned()` walk of its host tensors,
and the phase counters they become (`Meter.host_probe`).

Pinning needs CUDA, so here the pin functions are fakes with SGLang's shape (a finalizer that unpins when the
storage dies, looked up in the module when it pins) and the walk's `is_pinned` is a predicate. What only the GPU
shows: that torch's `is_pinned()` answers True for a range SGLang registered in place (cudaPointerGetAttributes
reports registered memory as host memory), and the byte figures of a real Qwen-Image run. The slow test drives the
real 0.5.23 `_pinned_empty` with torch.cuda patched to accept the registration.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.cell import measure
from harness.cell.offload.loader import LoadedComponent
from harness.cell.offload.memory import Device
from harness.common.contract import PhaseStats, Placement
from harness.engine.layerwise import SGLangPinTally, count_sglang_pins, host_memory, sglang_host_counters

REPO = Path(__file__).resolve().parent.parent

# SGLang 0.5.23's pin functions in miniature: `_pin_in_place` registers a finalizer that calls the module's
# `_unpin_in_place` (looked up when it pins) once the storage dies; `_pinned_empty` pins through it.
FAKE_RELEASE = '''
import weakref
import torch
REGISTERED = {}
REFUSE = False

def _pin_in_place(tensor):
    if REFUSE:
        return False
    storage = tensor.untyped_storage()
    REGISTERED[storage.data_ptr()] = storage.nbytes()
    weakref.finalize(storage, _unpin_in_place, storage.data_ptr())
    return True

def _unpin_in_place(data_ptr):
    REGISTERED.pop(data_ptr, None)

def _pinned_empty(n, dtype):
    tensor = torch.empty(n, dtype=dtype)
    return tensor if _pin_in_place(tensor) else torch.empty(n, dtype=dtype)
'''


def _release() -> types.ModuleType:
    module = types.ModuleType("fake_sglang_layerwise")
    exec(FAKE_RELEASE, module.__dict__)  # the fake release's source, above
    return module


def test_the_tally_counts_what_the_release_registers_and_its_finalizer_unregisters() -> None:
    release, tally = _release(), SGLangPinTally()
    assert count_sglang_pins(release, tally)
    a = release._pinned_empty(1000, torch.uint8)
    b = release._pinned_empty(500, torch.float32)  # 2,000 bytes
    assert tally.snapshot() == {"pinned_sglang_registered_bytes": 3000, "pinned_sglang_registered_peak_bytes": 3000,
                                "pinned_sglang_registered_ranges": 2}
    del a
    gc.collect()  # the storage dies: SGLang's finalizer unpins through the wrapped _unpin_in_place
    assert tally.snapshot()["pinned_sglang_registered_bytes"] == 2000
    assert tally.snapshot()["pinned_sglang_registered_peak_bytes"] == 3000
    assert list(release.REGISTERED.values()) == [2000]  # the release's own unpin still ran
    release.REFUSE = True  # a registration that fails (the pageable fallback) is not counted
    c = release._pinned_empty(4096, torch.uint8)
    assert tally.snapshot()["pinned_sglang_registered_ranges"] == 1 and c.numel() == 4096
    del b
    gc.collect()
    assert tally.snapshot() == {"pinned_sglang_registered_bytes": 0, "pinned_sglang_registered_peak_bytes": 3000,
                                "pinned_sglang_registered_ranges": 0}


def test_the_wrap_is_installed_once_per_release_and_not_at_all_without_pin_functions() -> None:
    release, tally = _release(), SGLangPinTally()
    assert count_sglang_pins(release, tally) and count_sglang_pins(release, SGLangPinTally())
    keep = release._pinned_empty(64, torch.uint8)
    assert tally.bytes == 64  # one wrap: a second engine in the process does not count twice (or elsewhere)
    old = SimpleNamespace(LayerwiseOffloadManager=object)  # 0.5.8 / 0.5.13: pin_memory=True, no _pin_in_place
    assert not count_sglang_pins(old, tally) and not hasattr(old, "_pin_in_place")
    del keep


def test_the_walk_sums_each_groups_host_bytes_by_where_each_layer_lives() -> None:
    bf16, f32 = torch.bfloat16, torch.float32

    def t(n: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype)

    consolidated = {0: {bf16: t(100), f32: t(10, f32)}, 1: {bf16: t(100)}, 2: {bf16: t(100)}, 3: {bf16: t(100)}}
    strided = {0: {}, 1: {"w": t(8)}, 2: {}, 3: {"w": t(8)}}
    mapped = {0: {}, 1: {}, 2: {}, 3: {"m": t(50)}}
    slots = [torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8)]
    pinned_ids = {id(consolidated[0][bf16]), id(consolidated[0][f32]), id(consolidated[1][bf16]), id(slots[0])}
    manager = SimpleNamespace(layers_attr_str="transformer_blocks", _consolidated_cpu_weights=consolidated,
                              _strided_cpu_weights=strided, _mapped_cpu_weights=mapped,
                              _mapped_courier=SimpleNamespace(_slots=slots))
    old = SimpleNamespace(layers_attr_str="blocks", _consolidated_cpu_weights={0: {bf16: t(64)}, 1: {bf16: t(64)}})
    walked = host_memory([manager, old], is_pinned=lambda x: id(x) in pinned_ids)
    assert walked["transformer_blocks"] == {
        # layer 0: all pinned; 1: pinned store + pageable strided copy; 2: pageable; 3: a weight left mapped
        "pinned_bytes": 200 + 40 + 200, "pageable_bytes": 16 + 200 + 200 + 16, "mapped_bytes": 100,
        "layers": {"pinned": 1, "partly pinned": 1, "pageable": 1, "mapped": 1},
        "courier_pinned_bytes": 300, "courier_pageable_bytes": 300}
    # a release with consolidated stores only (0.5.8), pinned by torch: counted the same way
    assert walked["blocks"] == {"pinned_bytes": 0, "pageable_bytes": 256, "mapped_bytes": 0,
                                "layers": {"pageable": 2}}
    assert host_memory([old])["blocks"]["pageable_bytes"] == 256  # torch's own is_pinned: nothing is, on this box
    counters = sglang_host_counters(walked, None)
    assert counters == {"pinned_sglang_manager_bytes": 440 + 300, "pageable_sglang_manager_bytes": 432 + 300 + 256,
                        "mapped_sglang_manager_bytes": 100}
    tally = SGLangPinTally()
    tally.pinned(1, 4096)
    assert sglang_host_counters(walked, tally)["pinned_sglang_registered_bytes"] == 4096


def test_each_phase_end_reads_the_runtimes_host_counters() -> None:
    """`Meter.host_probe` puts a runtime's own host counters beside the harness's pinned ones; a probe that fails
    costs the phase its counters, never the phase."""
    meter = measure.Meter(Device("cpu"), measure.Sampler(None, interval_s=0))
    with meter.phase("load"):
        pass
    assert "pinned_sglang_manager_bytes" not in meter.phases["load"]  # no engine, no new field
    meter.host_probe = lambda: {"pinned_sglang_manager_bytes": 123, "pinned_sglang_registered_bytes": 100}
    with meter.phase("denoise"):
        pass
    stats = PhaseStats.from_dict(meter.phases["denoise"])
    assert stats.pinned_sglang_manager_bytes == 123 and stats.pinned_sglang_registered_bytes == 100
    assert stats.as_dict()["pinned_sglang_registered_bytes"] == 100 and not stats.extra

    def broken() -> dict[str, int]:
        raise RuntimeError("no manager")

    meter.host_probe = broken
    with meter.phase("decode"):
        pass
    assert "pinned_requested_bytes" in meter.phases["decode"] and "pinned_sglang_manager_bytes" not in \
        meter.phases["decode"]


def test_only_a_runtime_with_host_counters_reports_them() -> None:
    def component(runtime: object) -> LoadedComponent:
        return LoadedComponent("dit", torch.nn.Linear(1, 1), Placement.SGLANG_LAYERWISE, 4, runtime)  # type: ignore[arg-type]

    assert component(SimpleNamespace()).host_counters() == {}
    engine = SimpleNamespace(host_counters=lambda: {"pinned_sglang_manager_bytes": 7})
    assert component(SimpleNamespace(host_counters=engine.host_counters)).host_counters() == {
        "pinned_sglang_manager_bytes": 7}


REAL_RELEASE = r'''
import gc, json, types
import torch
from harness.engine.layerwise import SGLANG_PINS, count_sglang_pins, load_engine

calls = []
cudart = types.SimpleNamespace(cudaHostRegister=lambda ptr, n, flags: calls.append(("register", n)) or 0,
                               cudaHostUnregister=lambda ptr: calls.append(("unregister", ptr)) or 0)
layerwise = load_engine("0.5.23")[0]  # imported as on this box (no CUDA); then CUDA "accepts" registrations
torch.cuda.is_available = lambda: True
torch.cuda.cudart = lambda: cudart
out = {"counting": count_sglang_pins(layerwise)}
store = layerwise._pinned_empty(64 << 20, dtype=torch.uint8)  # _REGISTER_MIN_BYTES: registered in place
out["after_pin"] = SGLANG_PINS.snapshot()
del store
gc.collect()
out["after_free"] = SGLANG_PINS.snapshot()
out["calls"] = [c[0] for c in calls]
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow  # imports SGLang 0.5.23 in a child: about 12 s on an idle 2-core box
def test_the_real_release_pins_through_the_counted_functions() -> None:
    from harness.engine.install import installed

    if "0.5.23" not in installed():
        pytest.skip("sglang 0.5.23 is not installed (python -m harness.engine.install 0.5.23)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", REAL_RELEASE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["counting"] is True
    assert out["after_pin"] == {"pinned_sglang_registered_bytes": 64 << 20,
                                "pinned_sglang_registered_peak_bytes": 64 << 20, "pinned_sglang_registered_ranges": 1}
    assert out["after_free"]["pinned_sglang_registered_bytes"] == 0 and out["calls"] == ["register", "unregister"]


@pytest.mark.parametrize("version, names", [
    ("0.5.23", ("_consolidated_cpu_weights", "_strided_cpu_weights", "_mapped_cpu_weights", "_mapped_courier",
                "self._slots", "def _pin_in_place(tensor", "def _unpin_in_place(data_ptr",
                "weakref.finalize(storage, _unpin_in_place")),
    ("0.5.13", ("_consolidated_cpu_weights", "_strided_cpu_weights", "pin_memory=self.pin_cpu_memory")),
    ("0.5.8", ("_consolidated_cpu_weights", "pin_memory=self.pin_cpu_memory")),
])
def test_the_walk_and_the_wrap_read_names_the_releases_have(version: str, names: tuple[str, ...]) -> None:
    """The walk reads the managers' attributes by name and finds nothing (zero bytes) where a release renamed one:
    each name it reads is in that release's manager source, and 0.5.23's finalizer looks `_unpin_in_place` up in
    the module, so the wrapped one runs."""
    from harness.engine.install import installed

    if version not in installed():
        pytest.skip(f"sglang {version} is not installed")
    engine = installed()[version]
    source = (engine.site / (engine.manifest["layerwise_module"].replace(".", "/") + ".py")).read_text()
    assert [n for n in names if n not in source] == []
