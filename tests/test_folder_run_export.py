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


def test_the_folder_run_comparison_reads_the_device_records_and_fails_on_what_it_cannot_compare(
        tmp_path: Path, capsys) -> None:
    """compare.py on the committed H100 folder run: every phase's three peaks and the step are printed and within
    2 %; a record lacking a peak key is exit 2 (it once looked up keys no record has, and compared the step only)."""
    import json

    from experiments.folder_run.compare import main

    records = Path(__file__).resolve().parent.parent / "results/h100/folder-run/folder-run-wan21-14b.records.jsonl"
    assert main([str(records)]) == 0
    out = capsys.readouterr().out
    assert "denoise.alloc_peak_reserved_bytes" in out and "load.nvml_proc_peak_bytes" in out
    assert "latents bitwise equal: True" in out
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    for phase in recs[1]["phases"].values():
        phase.pop("nvml_proc_peak_bytes")
    bad = tmp_path / "bad.records.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main([str(bad)]) == 2
    assert "lacks nvml_proc_peak_bytes" in capsys.readouterr().out
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    recs[1]["rounds"]["steady_step_ms"] = [s * 1.05 for s in recs[1]["rounds"]["steady_step_ms"]]
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main([str(bad)]) == 1
