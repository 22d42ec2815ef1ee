"""Importing an SGLang release must not change the process's torch switches for the harness's own modules: SGLang
0.5.23's CUDA platform turns cuDNN attention off at import (docs/findings/sglang-import-disables-cudnn-attention.md).
`load_engine` puts every switch back and records what the import changed."""

from __future__ import annotations

import pytest
import torch

from harness.engine.layerwise import restore_torch_global_state, torch_global_state


def test_a_flipped_switch_is_put_back_and_reported() -> None:
    before = torch_global_state()
    torch.backends.cuda.enable_cudnn_sdp(not before["sdp.cudnn"])
    torch.backends.cudnn.benchmark = not before["cudnn.benchmark"]
    try:
        changed = restore_torch_global_state(before)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before["sdp.cudnn"])
        torch.backends.cudnn.benchmark = before["cudnn.benchmark"]
    assert set(changed) == {"sdp.cudnn", "cudnn.benchmark"}
    assert changed["sdp.cudnn"] == [before["sdp.cudnn"], not before["sdp.cudnn"]]
    assert torch_global_state() == before


def test_nothing_changed_reports_nothing() -> None:
    assert restore_torch_global_state(torch_global_state()) == {}


def test_load_engine_leaves_the_switches_as_they_were() -> None:
    from harness.engine.install import installed
    from harness.engine.layerwise import load_engine

    if "0.5.23" not in installed():
        pytest.skip("SGLang 0.5.23 not installed here; install it with `python -m harness.engine.install 0.5.23`")
    before = torch_global_state()
    info = load_engine("0.5.23")[2]
    assert torch_global_state() == before
    assert info["import_side_effects"]["restored"] is True
    assert isinstance(info["import_side_effects"]["changed"], dict)
    # A later caller (the backend after loader.maps_checkpoint) gets the first import's answer, not an empty change.
    assert load_engine("0.5.23")[2] is info
