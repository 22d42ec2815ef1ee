"""An SGLang release's child sees its own folder and the host's torch, never another host package; its answers
are recorded per release and request and read back instead of asking again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.engine import policy
from harness.engine.policy import EngineRequest, EngineResolution, ReleaseMissing, resolve_engine

REPO = Path(__file__).resolve().parent.parent


def test_a_sealed_child_sees_its_folder_and_the_shared_packages_only(tmp_path: Path) -> None:
    """A host package the release's folder lacks (here an incompatible `kernels` that fails on import, as kernels
    0.19.1 did under 0.5.13's transformers 5.8.1) is invisible: a probe finds nothing and an import fails by name.
    numpy (shared, with its metadata for transformers' version checks) and the folder's own modules import."""
    host = tmp_path / "host"
    (host / "kernels").mkdir(parents=True)
    (host / "kernels" / "__init__.py").write_text("raise ValueError('Either a revision or a version must be given.')\n")
    site = tmp_path / "engine" / "0.0.1-py3" / "site"
    (site / "probe").mkdir(parents=True)
    (site / "probe" / "__init__.py").write_text("WHERE = 'engine folder'\n")
    script = textwrap.dedent(f"""
        import importlib.metadata, importlib.util, sys
        from pathlib import Path
        from harness.engine.runtime import seal
        seal(Path({str(site)!r}), harness_root=Path({str(REPO)!r}))
        assert importlib.util.find_spec("kernels") is None, "the host's kernels leaked in"
        try:
            import kernels
        except ModuleNotFoundError as e:
            assert e.name == "kernels"
        else:
            raise AssertionError("imported the host's kernels")
        import numpy, probe
        assert probe.WHERE == "engine folder"
        assert importlib.metadata.version("numpy") == numpy.__version__
        assert importlib.util.find_spec("tabulate") is None, "a host package the harness has leaked in"
        print("sealed")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(host)])}
    unsealed = subprocess.run([sys.executable, "-c", "import kernels"], env=env, capture_output=True, text=True)
    assert "Either a revision" in unsealed.stderr  # without the seal the host's copy is what the child imports
    sealed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout.strip() == "sealed"


def _request() -> EngineRequest:
    return EngineRequest(flags={"dit_cpu_offload": True, "dit_layerwise_offload": True}, memory_gib=31.36,
                         family="qwen-image-edit", task="I2I")


def _answer(version: str) -> EngineResolution:
    return EngineResolution(version=version, effective={"dit_cpu_offload": True}, layerwise_components=("dit",),
                            dit_residency=None, messages=(), pipeline_config="recorded")


@pytest.fixture()
def engine_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An engine root holding one fake installed release 9.9.1 and nothing shipped."""
    root = tmp_path / "sglang"
    folder = root / f"9.9.1-py{sys.version_info.major}.{sys.version_info.minor}"
    (folder / "site").mkdir(parents=True)
    (folder / "engine.json").write_text(json.dumps({"version": "9.9.1", "layerwise_module": None}))
    monkeypatch.setenv("OFFLOAD_BENCH_SGLANG_ROOT", str(root))
    monkeypatch.delenv("OFFLOAD_BENCH_SGLANG_ANSWERS", raising=False)
    monkeypatch.setattr(policy, "SHIPPED_ANSWERS", tmp_path / "shipped.jsonl")
    monkeypatch.setattr(policy, "_CACHE", {})
    return folder


def test_answers_are_recorded_in_the_release_folder_and_read_back(engine_root: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def child(version: str, requests: list, timeout_s: float) -> list:
        asked.append(len(requests))
        return [_answer(version) for _ in requests]

    monkeypatch.setattr(policy, "_ask_child", child)
    first = resolve_engine("9.9.1", [_request()])
    policy._CACHE.clear()  # a new process
    second = resolve_engine("9.9.1", [_request()])
    assert asked == [1] and first[0].effective == second[0].effective
    assert second[0].extra["answered_by"]  # the read-back answer says which machine asked it
    line = json.loads((engine_root / "answers.jsonl").read_text())
    assert line["child"] == policy.child_code_digest() and line["answer"]["extra"]["answered_by"]


def test_an_answer_recorded_by_other_child_code_is_asked_again(engine_root: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stale = {"version": "9.9.1", "child": "0" * 16, "request_key": policy._request_key(_request()),
             "answer": _answer("9.9.1").as_dict()}
    (engine_root / "answers.jsonl").write_text(json.dumps(stale) + "\n")
    asked: list[int] = []
    monkeypatch.setattr(policy, "_ask_child", lambda v, r, t: asked.append(len(r)) or [_answer(v) for _ in r])
    resolve_engine("9.9.1", [_request()])
    assert asked == [1]


def test_without_the_release_shipped_answers_answer_and_anything_else_names_the_install(
        engine_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = {"version": "9.9.2", "child": policy.child_code_digest(), "request_key": policy._request_key(_request()),
            "answer": _answer("9.9.2").as_dict()}
    policy.SHIPPED_ANSWERS.write_text(json.dumps(line) + "\n")
    monkeypatch.setattr(policy, "_ask_child", lambda *a: pytest.fail("asked a release that is not installed"))
    assert resolve_engine("9.9.2", [_request()])[0].pipeline_config == "recorded"
    other = EngineRequest(flags={}, memory_gib=24.0, family="flux", task="T2I")
    with pytest.raises(ReleaseMissing, match=r"python -m harness\.engine\.install 9\.9\.2") as caught:
        resolve_engine("9.9.2", [other])
    assert caught.value.version == "9.9.2"


def test_the_shipped_answers_are_those_of_the_shipped_scenarios_and_this_child() -> None:
    """harness/engine/answers.jsonl is regenerated (`python -m harness record-answers`) whenever the
    child's code changes: otherwise a machine without releases cannot list the sglang@ scenarios."""
    lines = [json.loads(x) for x in policy.SHIPPED_ANSWERS.read_text().splitlines() if x.strip()]
    assert lines, "no shipped answers"
    assert {x["child"] for x in lines} == {policy.child_code_digest()}
    assert {x["version"] for x in lines} >= {"0.5.8", "0.5.23"}


def test_pins_check_names_what_differs(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / ".ci"))
    try:
        import pins
    finally:
        sys.path.remove(str(REPO / ".ci"))
    assert pins.differences({"numpy": "1.0.0", "nothere": "1"}, {"numpy": "2.4.6"}) == [
        "numpy: 2.4.6 installed, 1.0.0 pinned"]
    assert pins.differences({"torch": "2.13.0"}, {"torch": "2.13.0+cpu"}) == []
    assert "pytest-benchmark" in pins.required()
