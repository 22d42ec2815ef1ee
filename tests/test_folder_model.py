"""Bring your own checkpoint (issue 29): a diffusers pipeline folder written by save_pretrained is a model for the
planner: its family from the pipeline class, its dtype as stored, its weight table from the safetensors headers
(one file, or shards through the index), its DiT blocks the zoo's or the generic ModuleList rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import cli
from harness.models import UnknownModelError, get_model
from harness.models.folder import FolderError, folder_spec, folder_weights, module_lists
from harness.plan.planner import load_data
from tests.pipeline_folders import write_pipeline_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {name: write_pipeline_folder(root / name, name, shard_dit=name == "flux-tiny")
            for name in ("flux-tiny", "qwen-image-tiny", "wan-tiny")}


@pytest.mark.parametrize("twin", ["flux-tiny", "qwen-image-tiny", "wan-tiny"])
def test_the_weight_table_comes_from_the_files(folders: dict[str, Path], twin: str) -> None:
    """Written in float32 from the zoo twin's configs: the same parameters, twice the twin's bfloat16 bytes."""
    spec = get_model(str(folders[twin]))
    assert spec.family == get_model(twin).family and spec.name == str(folders[twin].resolve())
    assert {c.dtype for c in spec.components.values()} == {"float32"}
    mine, zoo = folder_weights(spec), load_data()["weights"][twin]
    for role in ("text_encoder", "dit", "vae"):
        assert mine[role]["params"] == zoo[role]["params"], role
        assert mine[role]["weight_bytes"] == 2 * zoo[role]["weight_bytes"], role
        for g, data in zoo[role].get("groups", {}).items():
            assert mine[role]["groups"][g]["layers"] == data["layers"]
            assert mine[role]["groups"][g]["layer_params"] == data["layer_params"]
    assert spec.components["dit"].layer_group_sizes() == get_model(twin).components["dit"].layer_group_sizes()


def test_a_sharded_transformer_is_read_through_its_index(folders: dict[str, Path]) -> None:
    sub = folders["flux-tiny"] / "transformer"
    assert (sub / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(sub.glob("*.safetensors"))) > 1


def test_plan_and_advise_take_a_folder(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for twin, extra in (("flux-tiny", ()), ("qwen-image-tiny", ()), ("wan-tiny", ("--frames", "5"))):
        code = cli.main(["plan", "--model", str(folders[twin]), "--card", "big=2", "--resolution", "64x64", *extra,
                         "--flags", "dit_cpu_offload=true,dit_layerwise_offload=true", "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        p = json.loads(out.out)
        dit = folder_weights(get_model(str(folders[twin])))["dit"]
        assert p["streamed_bytes_per_forward"] == sum(g["host_bytes"] for g in dit["groups"].values())
    code = cli.main(["advise", "--model", str(folders["flux-tiny"]), "--card", "big=2", "--resolution", "64x64",
                     "--records", ""])
    out = capsys.readouterr().out
    assert code == 0 and "fastest that fits" in out and "--dit-cpu-offload" in out


def test_a_hugging_face_cache_snapshot(folders: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "models--acme--tiny-wan"
    shutil.copytree(folders["wan-tiny"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert get_model(str(repo)).family == "wan"
    assert get_model(str(repo / "snapshots" / "abc123")).name == str((repo / "snapshots" / "abc123").resolve())


def test_unknown_pipelines_and_transformers_without_blocks_are_named(folders: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    bad = tmp_path / "sd"
    shutil.copytree(folders["wan-tiny"], bad)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(FolderError, match="pipeline class StableDiffusionPipeline is not one"):
        folder_spec(str(bad))
    # a transformer class the zoo does not know: its blocks by the generic rule (top-level ModuleLists)
    other = tmp_path / "other"
    shutil.copytree(folders["wan-tiny"], other)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "MyDiT"}))
    assert folder_spec(str(other)).components["dit"].layer_groups == ("blocks",)
    assert module_lists(["a.0.w", "a.1.w", "b.0.w", "c.w"]) == {"a": 2}
    flat = tmp_path / "flat"
    shutil.copytree(folders["wan-tiny"], flat)
    (flat / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "FlatDiT"}))
    from safetensors.torch import load_file, save_file

    f = flat / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k.replace(".", "_"): v for k, v in load_file(f).items()}, f)
    with pytest.raises(FolderError, match=r"no repeated blocks .* class FlatDiT"):
        folder_spec(str(flat))
    with pytest.raises(UnknownModelError, match="or a diffusers pipeline folder"):
        get_model(str(tmp_path / "nothing-here"))


def _folder_cells(folder: Path, tmp_path: Path, axes: str, frames: int = 1) -> list[dict]:
    """Each cell of a 64x64, 2-step, true-CFG scenario on the folder, run in this process (CPU, one round)."""
    from dataclasses import replace

    from harness.cell.worker import run_cell
    from harness.plan.scenario import expand, load_scenario
    from harness.run.runner import spec_for_child

    path = tmp_path / "folder.toml"
    path.write_text(f'name = "folder"\nmodel = "{folder}"\nprofile = "cpu"\ncards = ["native"]\nheight = 64\n'
                    f'width = 64\nframes = {frames}\nsteps = 2\ntrue_cfg_scale = 4.0\nseed = 0\n{axes}')
    return [run_cell(replace(spec_for_child(c, "cpu"), warmup=0, rounds=1)).to_dict()
            for c in expand(load_scenario(path))]


@pytest.mark.parametrize("twin", ["flux-tiny", "qwen-image-tiny", "wan-tiny"])
def test_a_float32_folder_runs_in_its_stored_dtype(folders: dict[str, Path], tmp_path: Path, twin: str) -> None:
    """The pipeline's latents, timesteps and text states follow the DiT's stored dtype (float32 here), not bfloat16
    ("Input type BFloat16 and bias type float" before): resident and streamed layerwise, the same latents."""
    resident, streamed = _folder_cells(folders[twin], tmp_path, "[axes]\ndit_layerwise_offload = [false, true]\n"
                                       "[flags]\ndit_cpu_offload = true\n", frames=5 if twin == "wan-tiny" else 1)
    for rec in (resident, streamed):
        assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
        assert rec["outputs"]["latents_stats"]["finite"]
    assert streamed["placements"]["dit"] == "layerwise-from-host"
    assert streamed["outputs"]["latents_sha256"] == resident["outputs"]["latents_sha256"]
