"""The checkpoint a resolution is asked with (#29): a zoo model's sized stand-in laid out as its published
checkpoint, read as SGLang 0.5.23 reads it, keyed into the recorded answers, shown to the ServerArgs child in its
Hugging Face cache, and its sizes in our model of 0.5.23's auto policy. The release itself answering is in
tests/test_standin_engine.py."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from harness.common.flags import OffloadFlags
from harness.engine.policy import EngineRequest, _request_key
from harness.models import get_model, model_names
from harness.models.standin import (
    LAYOUTS,
    SIZES_PATH,
    CheckpointSource,
    build,
    checkpoint_source,
    committed_sizes,
    component_counts,
    folder_source,
    standin_dir,
    zoo_source,
)
from harness.policy import EngineContext, resolve

U = None
UNSET = OffloadFlags(U, U, U, U)


@pytest.fixture(scope="module")
def wan_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan2.1-T2V-14B's stand-in, written in this process (the harness writes it in a child)."""
    source = zoo_source("wan2.1-t2v-14b")
    assert source is not None
    return build("wan2.1-t2v-14b", tmp_path_factory.mktemp("standin") / "wan")


def test_the_wan_standin_is_the_published_layout_with_headers_only(wan_standin: Path) -> None:
    index = json.loads((wan_standin / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert {k for k in index if not k.startswith("_")} == {"scheduler", "text_encoder", "tokenizer", "transformer",
                                                           "vae"}
    dit = wan_standin / "transformer"
    weight_map = json.loads((dit / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(dit.glob("*.safetensors"))
    assert len(shards) == 3 and set(weight_map.values()) == {s.name for s in shards}  # 28.6 GB in 10 GB shards
    apparent = sum(p.stat().st_size for p in wan_standin.rglob("*") if p.is_file())
    on_disk = sum(p.stat().st_blocks * 512 for p in wan_standin.rglob("*") if p.is_file())
    assert apparent > 40e9 and on_disk < 50e6, (apparent, on_disk)  # the data region is a hole
    assert json.loads((wan_standin / "text_encoder" / "config.json").read_text())["architectures"] == [
        "UMT5EncoderModel"]


def test_a_standin_tensor_reads_as_zeros_of_its_shape(wan_standin: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(wan_standin / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        name = sorted(f.keys())[0]
        t = f.get_tensor(name)
        assert list(t.shape) == f.get_slice(name).get_shape() and not t.any()


def test_the_standin_reads_back_as_its_committed_sizes_and_as_a_folder_model(wan_standin: Path) -> None:
    """SGLang's reading (component_counts, mirroring checkpoint_component_sizes) of the stand-in is the committed
    table; as a folder model it is the zoo model's weight table, parameter for parameter."""
    from harness.models.folder import folder_spec, folder_weights
    from harness.plan.planner import load_data

    want = committed_sizes()["wan2.1-t2v-14b"]["components"]
    assert component_counts(wan_standin) == want
    assert want["transformer"] == {"BF16": 14_288_491_584}  # 40 blocks of 40 x 128 heads, ffn 13824
    as_folder = folder_source(str(wan_standin))
    zoo = zoo_source("wan2.1-t2v-14b")
    assert zoo is not None and as_folder.component_sizes() == zoo.component_sizes()
    assert as_folder.dit_params == zoo.dit_params == 14_288_491_584
    weights = folder_weights(folder_spec(str(wan_standin)))
    zoo_weights = load_data()["weights"]["wan2.1-t2v-14b"]
    assert {r: w["params"] for r, w in weights.items()} == {r: w["params"] for r, w in zoo_weights.items()}


@pytest.mark.parametrize("model", [m for m in model_names() if (get_model(m).family, get_model(m).edit) in LAYOUTS])
def test_committed_standin_sizes_are_the_zoo_built_on_meta(model: str) -> None:
    """standin_sizes.json is what harness.models.sizes reads from the modules on meta, by published folder: a zoo
    change that leaves it stale fails here (refresh with `python -m harness.models.sizes --write`)."""
    from harness.models.sizes import standin_sizes

    assert committed_sizes()[model] == standin_sizes(model)


def test_flux_text_encoders_go_to_their_two_published_folders() -> None:
    sizes = committed_sizes()["flux-dev"]["components"]
    assert sizes["text_encoder"] == {"BF16": 123_060_480}  # CLIP-L
    assert sizes["text_encoder_2"] == {"BF16": 4_762_310_656}  # T5-v1.1-XXL encoder, one embedding
    assert SIZES_PATH.name == "standin_sizes.json"


def test_a_stale_committed_size_is_named_with_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.models import standin

    stale = {**committed_sizes(), "wan-tiny": {**committed_sizes()["wan-tiny"], "spec": "0" * 16}}
    monkeypatch.setattr(standin, "committed_sizes", lambda: stale)
    with pytest.raises(standin.StandinError, match=r"python -m harness\.models\.sizes --write"):
        zoo_source("wan-tiny")


# ---------------------------------------------------------------------------------------- keys and the child


def _request(checkpoint: CheckpointSource | None) -> EngineRequest:
    return EngineRequest(flags=UNSET.as_dict(), memory_gib=24.0, family="wan", task="T2V", checkpoint=checkpoint)


def test_answers_with_and_without_a_checkpoint_never_share_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.models import standin

    source = zoo_source("wan2.1-t2v-14b")
    assert source is not None
    without, with_ = _request(None), _request(source)
    assert _request_key(without) != _request_key(with_)
    assert "checkpoint" not in json.loads(_request_key(without))  # as keyed before checkpoints existed
    # where the stand-in lies is this machine's: not part of the key
    assert _request_key(_request(replace(source, path="/elsewhere"))) == _request_key(with_)
    # other sizes (the same spec digest, a VAE one parameter larger): another digest, so another answer
    entry = committed_sizes()["wan2.1-t2v-14b"]
    bigger = {**entry, "components": {**entry["components"], "vae": {"BF16": entry["components"]["vae"]["BF16"] + 1}}}
    monkeypatch.setattr(standin, "committed_sizes", lambda: {"wan2.1-t2v-14b": bigger})
    other = zoo_source("wan2.1-t2v-14b")
    assert other is not None and other.digest != source.digest
    assert _request_key(_request(other)) != _request_key(with_)


def test_the_child_shows_the_checkpoint_under_the_hub_id_and_takes_it_away(tmp_path: Path,
                                                                         wan_standin: Path) -> None:
    """What the release's snapshot_download(local_files_only=True) finds in the child's cache for the family's
    Hub id: the request's checkpoint folder, and after a request without one, nothing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from harness.engine.serverargs import _SHOWN, _show_checkpoint

    _SHOWN.clear()
    source = folder_source(str(wan_standin))
    label = _show_checkpoint(tmp_path, "wan", source.as_dict())
    assert label == f"folder {wan_standin.resolve()}"
    found = snapshot_download("Wan-AI/Wan2.1-T2V-14B-Diffusers", cache_dir=tmp_path, local_files_only=True,
                              allow_patterns=["*model_index.json"])
    assert Path(found).resolve() == wan_standin.resolve()
    assert component_counts(Path(found)) == component_counts(wan_standin)
    assert _show_checkpoint(tmp_path, "wan", None) == "none"
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("Wan-AI/Wan2.1-T2V-14B-Diffusers", cache_dir=tmp_path, local_files_only=True)
    assert wan_standin.is_dir()  # the link went, not the folder


def test_a_zoo_standin_is_written_once_per_spec_in_the_harness_cache(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from harness.models import standin

    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path))
    source = zoo_source("wan-tiny")
    assert source is not None and source.path is None
    written = standin.ensure_written(source)
    assert written.path == str(standin_dir("wan-tiny", source.digest)) and Path(written.path).is_relative_to(tmp_path)
    assert (Path(written.path) / "standin.json").is_file()
    assert zoo_source("wan-tiny") == written  # found there from now on
    monkeypatch.setattr(standin.subprocess, "run", lambda *a, **k: pytest.fail("wrote it again"))
    assert standin.ensure_written(source) == written


# ------------------------------------------------------------------------------ what the resolution records


def test_a_context_for_a_model_carries_its_checkpoint_into_the_record() -> None:
    context = EngineContext.for_model("wan", False, 24.0, "wan2.1-t2v-14b")
    source = zoo_source("wan2.1-t2v-14b")
    assert source is not None and context.checkpoint == source
    engine = resolve(UNSET, "sglang", context).as_dict()["engine"]
    assert engine["checkpoint"] == f"zoo sized stand-in wan2.1-t2v-14b@{source.digest}"
    assert engine["checkpoint_bytes"] == source.total_bytes == 40_192_588_902
    assert engine["context"]["checkpoint"] == engine["checkpoint"]
    bare = resolve(UNSET, "sglang", EngineContext(24.0, "T2V", "wan")).as_dict()["engine"]
    assert bare["checkpoint"] == "none" and "checkpoint" not in bare["context"]
    assert checkpoint_source("no-such-model") is None and checkpoint_source(None) is None


def test_a_folder_models_context_reads_its_folder(tmp_path: Path) -> None:
    from tests.pipeline_folders import write_pipeline_folder

    folder = write_pipeline_folder(tmp_path / "wan", "wan-tiny")
    source = checkpoint_source(str(folder))
    assert source is not None and source.kind == "folder" and source.label == f"folder {folder.resolve()}"
    sizes = source.component_sizes()
    assert sizes is not None and set(sizes) == {"text_encoder", "transformer", "vae"}
    assert sizes["transformer"][1] == 4 * sizes["transformer"][0]  # stored in F32 as written
    assert os.path.samefile(source.path or "", folder)
