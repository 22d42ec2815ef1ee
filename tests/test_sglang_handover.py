"""The SGLang backend hands a host-bound DiT to 0.5.23's manager as its loader does: views of the checkpoint's
mapping, not an anonymous copy (docs/findings/sglang-pin-budget-handover.md)."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from harness.cell.checkpoint import CheckpointReader
from harness.cell.offload import loader


class _Clock:
    def __init__(self) -> None:
        self.laps: list[str] = []

    def lap(self, name: str) -> None:
        self.laps.append(name)


def _checkpoint(tmp_path: Path, module: torch.nn.Module) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def test_the_mapping_handover_leaves_every_weight_a_view_of_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).to(torch.bfloat16)
    reader = CheckpointReader(_checkpoint(tmp_path, src))
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).to(torch.bfloat16)

    class Load:
        pass

    load = Load()
    load.module, load.reader, load.clock = module, reader, _Clock()
    loader._map_to_host(load)  # type: ignore[arg-type]
    base = reader._mmap
    assert isinstance(base, mmap.mmap)
    lo = torch.frombuffer(base, dtype=torch.uint8, count=1).data_ptr()
    hi = lo + len(base)
    for name, t in module.state_dict().items():
        assert t.device.type == "cpu"
        assert lo <= t.data_ptr() < hi, f"{name} is not a view of the checkpoint mapping"
        assert torch.equal(t, src.state_dict()[name]), name
    assert load.clock.laps == ["read_s"]


def test_only_a_release_that_plans_its_host_memory_gets_the_mapping() -> None:
    from harness.engine.install import installed

    if "0.5.23" not in installed():
        pytest.skip("needs SGLang 0.5.23 installed (python -m harness.engine.install 0.5.23)")
    assert loader.maps_checkpoint("0.5.23") is True
    assert loader.maps_checkpoint("9.9.9") is False  # not installed: load_engine says how to install it
