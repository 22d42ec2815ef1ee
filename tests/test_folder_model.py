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
from tests.pipeline_folders import folder_cells as _folder_cells
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


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_flux_folder_computes_what_diffusers_flux_pipeline_does(folders: dict[str, Path], tmp_path: Path,
                                                                  dtype: str) -> None:
    """The same folder through diffusers' own FluxPipeline (`from_pretrained` + `__call__`): the harness's seeded
    inputs drawn again in its order (per prompt the CLIP ids, start + words + end, then the T5 ids; then the
    noise), the prompts encoded by the folder's own CLIP and T5 and passed as `prompt_embeds` (the tiny folders
    have no tokenizers), the noise passed packed as `latents`, the scheduler the harness's FLUX.1-dev config (a
    folder written per component has none). Bitwise: on CPU both run the same modules on the same inputs in the
    same order (true CFG with a negative prompt, the guidance embedding, 2 steps), CPU-offloaded and streamed
    layerwise; the decoded image's stats agree to rounding (diffusers' image is postprocessed to [0, 1])."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from harness.cell.pipeline import FLUX_SCHEDULER, _pack

    folder = folders["flux-tiny"] if dtype == "float32" else write_pipeline_folder(tmp_path / "bf16", "flux-tiny",
                                                                                   dtype=dtype)
    ours = []
    for i, rec in enumerate(_folder_cells(folder, tmp_path, "[axes]\ndit_layerwise_offload = [false, true]\n"
                                          "[flags]\ndit_cpu_offload = true\n", latents_dir=tmp_path)):
        assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
        ours.append((rec, torch.load(tmp_path / f"latents{i}.pt")))
    assert [r["placements"]["dit"] for r, _ in ours] == ["cpu-offload", "layerwise-from-host"]

    cast, spec = getattr(torch, dtype), get_model(str(folder))
    pipe = FluxPipeline.from_pretrained(folder, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                                        tokenizer=None, tokenizer_2=None, dtype=cast)
    # The float32 CPU GEMMs' last bits depend on where a weight lies in memory, and diffusers' sharded load
    # leaves the transformer's weights laid out otherwise than one fresh allocation each: as loaded, the sharded
    # float32 folder's latents differ from ours by relative L2 4.6e-7 (max abs 2.3e-6) while the one-file folder
    # is bitwise. Each weight copied to a fresh tensor (the values untouched): bitwise for both.
    for param in pipe.transformer.parameters():
        param.data = param.data.clone()
    gen = torch.Generator("cpu").manual_seed(0)
    clip_vocab, t5_vocab = pipe.text_encoder.config.vocab_size, pipe.text_encoder_2.config.vocab_size
    embeds = []
    with torch.inference_mode():
        for _ in range(2):  # positive, negative
            words = torch.randint(0, clip_vocab - 2, (1, spec.extra["clip_tokens"] - 2), generator=gen)
            clip_ids = torch.cat([torch.tensor([[clip_vocab - 2]]), words, torch.tensor([[clip_vocab - 1]])], dim=1)
            t5_ids = torch.randint(0, t5_vocab, (1, spec.prompt_tokens), generator=gen)
            embeds.append((pipe.text_encoder(input_ids=clip_ids, output_hidden_states=False).pooler_output,
                           pipe.text_encoder_2(input_ids=t5_ids)[0]))
    noise = torch.randn(1, pipe.vae.config.latent_channels, 1, 8, 8, generator=gen)
    final: dict[str, torch.Tensor] = {}

    def keep(_pipe: object, _i: int, _t: object, kw: dict) -> dict:
        final["latents"] = kw["latents"].clone()
        return kw

    image = pipe(prompt_embeds=embeds[0][1], pooled_prompt_embeds=embeds[0][0], negative_prompt_embeds=embeds[1][1],
                 negative_pooled_prompt_embeds=embeds[1][0], true_cfg_scale=4.0, guidance_scale=3.5, height=64,
                 width=64, num_inference_steps=2, latents=_pack(noise, 2).to(cast), output_type="pt",
                 callback_on_step_end=keep, return_dict=False)[0]
    theirs = final["latents"].float()
    # diffusers' image is (decoded / 2 + 0.5).clamp(0, 1), ours decoded.clamp(-1, 1): the same up to that affine map
    image = image.float() * 2 - 1
    for rec, latents in ours:
        assert torch.equal(latents, theirs), float((latents - theirs).norm() / theirs.norm())
        stats = rec["outputs"]["image_stats"]
        assert stats["shape"] == list(image.shape)
        for key, value in (("mean", image.mean()), ("std", image.std()), ("absmax", image.abs().max())):
            assert stats[key] == pytest.approx(float(value), rel=1e-2 if dtype == "bfloat16" else 1e-5, abs=1e-6)


def test_a_scenario_file_names_a_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    """`model = "/path"` in a scenario file, or a path relative to the file's folder ("./my-flux"): the folder's
    model, by its resolved path, in every cell; `with_model` writes a copy on another model (capacity and bench
    --model)."""
    from harness.plan.scenario import ScenarioError, expand, load_scenario, with_model

    shutil.copytree(folders["flux-tiny"], tmp_path / "my-flux")
    text = (Path(__file__).resolve().parent.parent / "scenarios" / "cpu" / "flux_tiny.toml").read_text()
    for value in (str(tmp_path / "my-flux"), "./my-flux", "my-flux/../my-flux"):
        path = tmp_path / "s.toml"
        path.write_text(text.replace('model = "flux-tiny"', f"model = {json.dumps(value)}"))
        scenario = load_scenario(path)
        assert scenario.model == str((tmp_path / "my-flux").resolve()), value
        assert {c.spec("cpu").model for c in expand(scenario)} == {scenario.model}
    copy = with_model(tmp_path / "s.toml", "flux-tiny", tmp_path / "elsewhere" / "copy.toml")
    assert load_scenario(copy).model == "flux-tiny"
    assert copy.read_text().replace('model = "flux-tiny"', "") == path.read_text().replace(
        f"model = {json.dumps(value)}", "")
    with pytest.raises(ScenarioError, match="unknown model"):
        with_model(path, str(tmp_path / "nothing"), tmp_path / "x.toml")


def test_a_transformer_class_the_harness_cannot_build_or_drive_is_one_line(folders: dict[str, Path],
                                                                            tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A class diffusers does not have (the folder's own code) plans, and is refused in one line by what would run
    it (a scenario, `offload-bench run`); a diffusers class whose forward lacks what the pipeline passes fails its
    cell at load with one line naming both (ChromaTransformer2DModel under FluxPipeline: no guidance, no pooled
    projections)."""
    from harness.models.folder import unrunnable
    from harness.plan.scenario import ScenarioError

    mine = tmp_path / "mine"
    shutil.copytree(folders["wan-tiny"], mine)
    cfg = json.loads((mine / "transformer" / "config.json").read_text())
    (mine / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "MyDiT"}))
    assert "transformer class MyDiT is not a diffusers class" in unrunnable(get_model(str(mine)))
    assert cli.main(["plan", "--model", str(mine), "--card", "big=2", "--resolution", "64x64", "--frames", "5",
                     "--flags", "dit_cpu_offload=true,dit_layerwise_offload=true"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--model", str(mine), "--card", "big=2", "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "MyDiT is not a diffusers class" in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()
    with pytest.raises(ScenarioError, match=r"model: .*MyDiT is not a diffusers class"):
        _folder_cells(mine, tmp_path, "", frames=5)

    chroma = tmp_path / "chroma"
    shutil.copytree(folders["flux-tiny"], chroma)
    cfg = json.loads((chroma / "transformer" / "config.json").read_text())
    (chroma / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "ChromaTransformer2DModel"}))
    assert unrunnable(get_model(str(chroma))) is None  # diffusers has it: only building it tells
    (rec,) = _folder_cells(chroma, tmp_path, "[flags]\ndit_cpu_offload = true\n")
    assert rec["status"] == "error" and rec["failed_phase"] == "load", rec
    assert rec["reason"].endswith("transformer class ChromaTransformer2DModel: its forward takes no guidance, "
                                  "pooled_projections, which the harness's FluxPipeline passes: the harness cannot "
                                  "drive it")
