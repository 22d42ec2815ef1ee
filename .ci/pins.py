"""The pinned environment, checked with the standard library alone (it runs before anything is installed).

`python .ci/pins.py check constraints.txt`: exit 0 when offload-bench's requirements (pyproject.toml, with the dev
extra) are installed and every installed distribution that constraints.txt pins is at its pinned version; else
exit 1, naming what differs (`make deps` then installs the pins).
`python .ci/pins.py diff constraints.txt`: one line per installed distribution whose version is not the pinned one
(what `make deps-latest` reports).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[_norm(name)] = version.strip()
    return out


def required() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [_norm(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs]


def installed() -> dict[str, str]:
    return {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def differences(pinned: dict[str, str], have: dict[str, str]) -> list[str]:
    return [f"{name}: {have[name]} installed, {version} pinned" for name, version in sorted(pinned.items())
            if name in have and have[name].split("+")[0] != version.split("+")[0]]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "diff"):
        print(__doc__, file=sys.stderr)
        return 2
    pinned, have = pins(Path(argv[1])), installed()
    lines = differences(pinned, have)
    if argv[0] == "diff":
        print("\n".join(lines) or "every installed distribution is at its pinned version")
        return 0
    lines += [f"{name}: not installed" for name in [*required(), "offload-bench"] if name not in have]
    for line in lines:
        print(f"pins: {line}", file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
