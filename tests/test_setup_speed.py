"""Setup speed (issue 18 item 6): host regions filled by several reader threads, each region pinned by the thread
that read its last slot (overlapping other regions' reads), and the fill measured (CUDA pinning faked: no GPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from harness.cell.offload.memory import HostRegion, Layout, SetupOptions, fill_regions
from harness.plan.scenario import ScenarioError, expand, load_scenario


class _Recorded(HostRegion):
    """A region whose pin() records what it saw instead of calling CUDA."""

    def __init__(self, nbytes: int, log: list[tuple[int, bool, str]]) -> None:
        super().__init__(nbytes, pin=True)
        self.log = log

    def pin(self) -> None:
        full = bool((self.tensor != 0).all())  # every slot read before the pin
        self.log.append((id(self), full, threading.current_thread().name))
        self.pin_method = "cudaHostRegister"


def _jobs(log: list[tuple[int, bool, str]], regions: int = 6, slots: int = 5) -> list[tuple[Layout, HostRegion]]:
    jobs = []
    for r in range(regions):
        layout = Layout.plan((f"r{r}.s{s}", torch.float32, (64,)) for s in range(slots))  # 256 B, aligned
        jobs.append((layout, _Recorded(layout.nbytes, log)))
    return jobs


def _read(name: str, dst: torch.Tensor) -> None:
    dst.view(torch.uint8).fill_(7)  # no zero byte: a region with a zero byte has an unread slot


@pytest.mark.parametrize("threads", [1, 3])
def test_overlap_pins_each_region_once_after_its_last_slot(threads: int) -> None:
    log: list[tuple[int, bool, str]] = []
    jobs = _jobs(log)
    stats = fill_regions(jobs, _read, SetupOptions(threads=threads, overlap_pin=True))
    assert sorted(i for i, _, _ in log) == sorted(id(r) for _, r in jobs)  # each once
    assert all(full for _, full, _ in log)  # 256-byte slots, no padding: every byte is a slot read before the pin
    assert all(r.pinned for _, r in jobs)
    assert all(name != threading.current_thread().name for _, _, name in log)  # on the reader threads
    assert stats.threads == threads and stats.regions == 6 and stats.overlap_pin
    assert stats.nbytes == sum(r.nbytes for _, r in jobs) and stats.read_thread_s > 0 and stats.wall_s > 0
    d = stats.as_dict()
    assert d["gbps"] is not None and set(d) >= {"read_thread_s", "pin_thread_s", "wall_s"}


def test_read_then_pin_leaves_pinning_to_the_caller() -> None:
    log: list[tuple[int, bool, str]] = []
    jobs = _jobs(log)
    stats = fill_regions(jobs, _read, SetupOptions(threads=2, overlap_pin=False))
    assert log == [] and not any(r.pinned for _, r in jobs) and stats.pin_thread_s == 0


def test_setup_run_options(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parent.parent / "scenarios" / "cpu" / "wan_tiny.toml"
    path = tmp_path / "s.toml"
    path.write_text(source.read_text().replace("[flags]", "[run]\nsetup_threads = 8\nsetup_overlap_pin = false\n\n"
                                                          "[flags]"))
    assert expand(load_scenario(path))[0].spec("cpu").run.changed() == {"setup_threads": 8, "setup_overlap_pin": False}
    path.write_text(source.read_text().replace("[flags]", "[run]\nsetup_threads = 0\n\n[flags]"))
    with pytest.raises(ScenarioError, match=r"run\.setup_threads"):
        load_scenario(path)
