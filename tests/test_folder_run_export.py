"""experiments/folder_run/export_zoo.py: a zoo model written as a diffusers folder of links to its synthetic
checkpoints reads back, tensor for tensor, as the zoo's (the GPU folder run compares the two loading paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.folder_run.export_zoo import export
from harness.models import get_model
from harness.models.folder import folder_spec, read_header


def test_a_tiny_wan_folder_links_the_zoo_checkpoints_and_reads_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path / "cache"))
    dest = export("wan-tiny", tmp_path / "wan", device="cpu")
    spec, zoo = folder_spec(str(dest)), get_model("wan-tiny")
    assert spec.extra["folder"] == str(dest.resolve())
    for role, sub, name in (("dit", "transformer", "diffusion_pytorch_model.safetensors"),
                            ("text_encoder", "text_encoder", "model.safetensors"),
                            ("vae", "vae", "diffusion_pytorch_model.safetensors")):
        link = dest / sub / name
        assert link.is_symlink() and read_header(link)  # a link, not a copy
        assert spec.components[role].dtype == zoo.components[role].dtype
    assert dict(spec.components["dit"].layer_counts) == zoo.components["dit"].layer_group_sizes()


def test_a_family_whose_names_differ_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="family qwen-image cannot be written as links"):
        export("qwen-image-tiny", tmp_path / "q", device="cpu")
