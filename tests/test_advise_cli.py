"""What a person reads from `plan` and `advise` (issue 29): the pick and the next few with the flags to paste,
where the step times come from, the PCIe link, every flag the scenario format takes, and one line per bad argument."""

from __future__ import annotations

import json
import re

import pytest

from harness import cli
from harness.common.flags import OffloadFlags
from harness.plan.paste import PCIE_GBPS, diffusers_calls, sglang_flags


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_advise_shows_the_pick_and_the_next_few_with_sglang_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "advise", "--model", "qwen-image", "--card", "rtx5090-32g", "--records", "")
    assert code == 0 and "fastest that fits" in out
    assert len(out.splitlines()) < 45, len(out.splitlines())
    assert "the pick and the next 4" in out and "--all for every row" in out
    pasted = re.findall(r"^\s+\d+\s+(--dit-cpu-offload .*)$", out, re.M)
    assert len(pasted) >= 5
    assert all("--dit-layerwise-offload" in p and "--pin-cpu-memory true" in p for p in pasted)
    # the spelling SGLang 0.5.23's ServerArgs.add_cli_args takes
    assert "--dit-offload-prefetch-size" in pasted[0] and "--dit-layerwise-residency-policy" in pasted[0]
    code, everything, _ = run(capsys, "advise", "--model", "qwen-image", "--card", "rtx5090-32g", "--records", "",
                              "--all")
    assert "does not fit:" in everything and len(everything.splitlines()) > 3 * len(out.splitlines())


def test_advise_names_the_step_profile_and_says_when_the_card_has_none(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "advise", "--model", "flux-dev", "--card", "rtx4090-24g", "--records", "")
    assert "machine for step times: nvidia-h100-80gb-hbm3" in out
    assert "no step profile for rtx4090-24g: step times are for the profile's GPU (nvidia-h100-80gb-hbm3)" in out
    _, out, _ = run(capsys, "advise", "--model", "flux-dev", "--card", "rtx4090-24g", "--records", "",
                    "--machine", "nvidia-h200")
    assert "machine for step times: nvidia-h200" in out
    code, _, err = run(capsys, "advise", "--model", "flux-dev", "--machine", "rtx4090")
    assert code == 2 and err.count("\n") == 1
    assert "no step-time profile 'rtx4090'; profiles: nvidia-h100-80gb-hbm3, nvidia-h200" in err


def test_pcie_gen4_halves_the_link_and_doubles_a_transfer_bound_step(capsys: pytest.CaptureFixture[str]) -> None:
    flags = "dit_cpu_offload=true,dit_layerwise_offload=true,dit_offload_prefetch_size=1"
    plans = {}
    for gen in ("gen4", "gen5"):
        code, out, _ = run(capsys, "plan", "--model", "qwen-image", "--card", "rtx5090-32g", "--pcie", gen,
                           "--flags", flags, "--json")
        assert code == 0
        plans[gen] = json.loads(out)
    gen4, gen5 = plans["gen4"], plans["gen5"]
    assert gen5["bound"] == gen4["bound"] == "transfer"
    ratio = PCIE_GBPS["gen4"] / PCIE_GBPS["gen5"]
    assert gen4["step_s"] == pytest.approx(gen5["step_s"] / ratio, rel=1e-3)
    assert gen4["machine"]["pinned_h2d_gbps"] == pytest.approx(gen5["machine"]["pinned_h2d_gbps"] * ratio, rel=1e-3)
    assert "PCIe gen4" in gen4["machine"]["source"] and "31.5" in gen4["machine"]["source"]
    _, out, _ = run(capsys, "advise", "--model", "qwen-image", "--card", "rtx4090-24g", "--pcie", "gen4",
                    "--records", "")
    assert "PCIe gen4: H2D scaled x0.5" in out


def test_plan_flags_take_every_flag_the_scenario_format_does(capsys: pytest.CaptureFixture[str]) -> None:
    base = "dit_cpu_offload=true,dit_layerwise_offload=true,dit_offload_prefetch_size=1"
    code, out, err = run(capsys, "plan", "--model", "qwen-image", "--card", "rtx5090-32g", "--flags",
                         base + ",dit_layerwise_resident_layers=32", "--json")
    assert code == 0, err
    assert json.loads(out)["flags"]["dit_layerwise_resident_layers"] == 32
    steps = {}
    for policy in ("leading", "strided"):
        code, out, err = run(capsys, "plan", "--model", "qwen-image", "--card", "rtx5090-32g", "--flags",
                             f"{base},dit_layerwise_residency_policy={policy}", "--resident-layers", "30", "--json")
        assert code == 0, err
        p = json.loads(out)
        assert p["flags"]["dit_layerwise_residency_policy"] == policy and p["resident_layers"] == 30
        steps[policy] = p["step_s"]
    assert steps["strided"] < steps["leading"]  # the strided schedule is planned, not the leading one's
    code, out, err = run(capsys, "plan", "--model", "qwen-image", "--flags",
                         "dit_cpu_offload=true,layerwise_offload_components=[text_encoder,vae],"
                         "layerwise_prefetch_size={text_encoder=2,vae=1},layerwise_residency_policy=text_encoder="
                         "strided,layerwise_resident_layers=vae=1,pin_cpu_memory=true")
    assert code == 0, err
    assert ("--layerwise-offload-components text_encoder vae --layerwise-prefetch-size text_encoder=2,vae=1 "
            "--layerwise-resident-layers vae=1 --layerwise-residency-policy text_encoder=strided") in out


@pytest.mark.parametrize(("args", "message"), [
    (("--card", "tiny=0"), "--card: 'tiny=0': GIB must be a finite number > 0"),
    (("--card", "l40s=1.2.3"), "--card: 'l40s=1.2.3': expected NAME=GIB with GIB a number"),
    (("--card", "l40s=nan"), "GIB must be a finite number > 0"),
    (("--resolution", "0x0"), "--resolution: width and height must be > 0"),
    (("--cfg", "nan"), "--cfg: expected a finite number >= 1"),
    (("--cfg", "-3"), "--cfg: expected a finite number >= 1"),
    (("--cfg", "inf"), "--cfg: expected a finite number >= 1"),
    (("--frames", "-5"), "--frames: expected a frame count >= 1"),
    (("--frames", "81"), "--frames: flux-dev is an image model"),
    (("--model", "wan-tiny", "--resolution", "64x64", "--frames", "6"), "takes 1 + 4k frames"),
    (("--flags", "dit_layerwise_offload=true,dit_offload_prefetch_size=999"), "999 layers is more than"),
    (("--flags", "dit_offload_prefetch_size=abc"), "expected a finite number >= 0, got 'abc'"),
    (("--flags", "dit_offload_prefetch_size="), "expected NAME=VALUE"),
    (("--flags", "dit_offload_prefetch_size=nan"), "expected a finite number >= 0"),
    (("--flags", "dit_layerwise_resident_layers=-1"), "must be >= 0"),
    (("--flags", "dit_cpu_offload=true,dit_cpu_offload=false"), "given twice"),
    (("--flags", "layerwise_offload_components=[te"), "unclosed bracket"),
    (("--resident-layers", "nan"), "--resident-layers: expected a finite number"),
])
def test_bad_plan_arguments_get_one_line(capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                         message: str) -> None:
    argv = ("--model", "flux-dev", *args) if "--model" not in args else args
    for command in ("plan", "advise"):
        if command == "advise" and "--flags" in args:
            continue
        code, _, err = run(capsys, command, *argv, "--records", "") if command == "advise" else \
            run(capsys, command, *argv)
        assert code == 2, (command, args, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (command, err)


def test_the_pasted_flags() -> None:
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_offload_prefetch_size=2,
                         text_encoder_cpu_offload=True, dit_layerwise_resident_layers=0.5,
                         dit_layerwise_residency_policy="strided")
    assert sglang_flags(flags) == (
        "--dit-cpu-offload true --dit-layerwise-offload true --dit-offload-prefetch-size 2 "
        "--dit-layerwise-resident-layers 0.5 --dit-layerwise-residency-policy strided "
        "--text-encoder-cpu-offload true --vae-cpu-offload false --pin-cpu-memory true")
    assert sglang_flags(OffloadFlags()) == ("--dit-cpu-offload false --dit-layerwise-offload false "
                                            "--text-encoder-cpu-offload false --vae-cpu-offload false "
                                            "--pin-cpu-memory true")
    calls = diffusers_calls(flags, "flux")
    assert calls[0].startswith("pipe.transformer.enable_group_offload(") and "num_blocks_per_group=2" in calls[0]
    assert "no diffusers counterpart" in calls[1]
    assert any(c.startswith("pipe.text_encoder_2.enable_group_offload(") for c in calls)
    assert not any("enable_model_cpu_offload" in c for c in calls)  # diffusers refuses it with group offload
    whole = OffloadFlags(dit_cpu_offload=True, text_encoder_cpu_offload=True, vae_cpu_offload=True)
    assert diffusers_calls(whole) == ["pipe.enable_model_cpu_offload()"]


def test_advise_prints_diffusers_calls_for_the_diffusers_engine(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "advise", "--model", "flux-dev", "--card", "rtx4090-24g", "--records", "",
                       "--engine", "diffusers")
    assert code == 0 and "diffusers calls on a loaded pipeline" in out and "enable_group_offload" in out
