"""Builds what device_batch.sh needs on the lent GPU machine: .whl/ (diffusers for Python 3.12) and
.engine/sglang-0.5.23-py3.12.tar.xz, leaving out of the archive only the packages that machine already has.

    python experiments/sglang_findings/make_carry.py [--kinds /work/.library/device/KINDS.md]

The exclude list is computed, never typed: a package the machine lacks must stay in the archive. A hand-typed list
that left out pydantic (which the machine does not have) made every SGLang import of the first device batch fail
with "No module named 'pydantic'". transformers and its tokenizers / huggingface-hub stay in: the release pins
its own. What is left out is written into the archive (host-shared.json), and the sealed ServerArgs child shares
exactly that with the machine. Keep the carry under the device's 64 MiB working-tree limit (about 33 MiB + 6 MiB).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

KEEP = {"transformers", "tokenizers", "huggingface_hub", "hf_xet"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().rstrip(".")).lower()


def device_packages(kinds: Path) -> set[str]:
    text = kinds.read_text()
    line = text[text.index("Packages: "):].split("\n")[0]
    return {_norm(n) for n in line[len("Packages: "):].split(",")}


def exclude_list(site: Path, on_device: set[str]) -> list[str]:
    """Top-level names (modules and dist-info stems) of the folder's distributions the machine has."""
    out: set[str] = set()
    for info in site.glob("*.dist-info"):
        raw = info.name[: -len(".dist-info")].rsplit("-", 1)[0]
        if _norm(raw) not in on_device:
            continue
        out.add(raw)
        for line in (info / "RECORD").read_text().splitlines():
            top = line.split(",")[0].split("/")[0]
            if top and top != ".." and not top.endswith((".dist-info", ".data")):
                out.add(top.removesuffix(".py"))
    return sorted(out - KEEP)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", type=Path, default=Path("/work/.library/device/KINDS.md"))
    parser.add_argument("--version", default="0.5.23")
    args = parser.parse_args()
    py = [sys.executable, "-m"]
    subprocess.run([*py, "harness.engine.install", args.version, "--python", "3.12"], check=True)
    from harness.engine.install import version_dir

    site = version_dir(args.version, "3.12") / "site"
    excluded = exclude_list(site, device_packages(args.kinds))
    subprocess.run([*py, "harness.engine.install", args.version, "--python", "3.12", "--archive",
                    f".engine/sglang-{args.version}-py3.12.tar.xz", "--exclude", ",".join(excluded)], check=True)
    subprocess.run([*py, "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "-d", ".whl",
                    "diffusers==0.42.1", "importlib_metadata"], check=True)
    print(f"left out of the archive ({len(excluded)}): {', '.join(excluded)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
