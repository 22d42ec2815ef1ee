"""Finding scenario files: every file under a folder (`load_all`, `discover`), the tier that runs a scenario
(`in_tier`), and a scenario file run on another model (`with_model`, `same_family`)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from harness.models import UnknownModelError, get_model
from harness.plan.scenario.fields import _err
from harness.plan.scenario.read import _model_name, load_scenario
from harness.plan.scenario.types import Scenario, ScenarioError


def load_all(folder: Path | str) -> tuple[list[Scenario], list[ScenarioError]]:
    """Every scenario file under `folder` (recursively), each loaded on its own: the scenarios that load and the
    errors of those that do not, so a caller that wants some scenarios by name is not blocked by an unrelated bad
    file. A missing folder or two files with one name raise."""
    if not Path(folder).is_dir():
        raise ScenarioError(f"{folder}: no such scenarios folder")
    scenarios, errors = [], []
    for path in sorted(Path(folder).rglob("*.toml")):
        try:
            scenarios.append(load_scenario(path))
        except ScenarioError as e:
            e.scenario_name = _peek_name(path)  # type: ignore[attr-defined]  # which file a --bench-scenario asks for
            errors.append(e)
    names = [s.name for s in scenarios]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        files = [s.path for s in scenarios if s.name == dupes[0]]
        raise ScenarioError(f"scenario name {dupes[0]!r} is used by more than one file: {', '.join(files)}")
    return scenarios, errors


def _peek_name(path: Path) -> str | None:
    """The `name` a scenario file declares, read without validating anything else (None if unreadable)."""
    try:
        name = tomllib.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return name if isinstance(name, str) else None


def discover(folder: Path | str, profile: str | None = None) -> list[Scenario]:
    """Every scenario file under `folder` (recursively), optionally only those of one profile. Any bad file
    raises its ScenarioError."""
    scenarios, errors = load_all(folder)
    if errors:
        raise errors[0]
    return [s for s in scenarios if profile is None or s.profile == profile]


def in_tier(scenario: Scenario, tier: str | None) -> bool:
    """Whether `--tier tier` runs `scenario`: "pr" only the pr scenarios, "nightly" (or None) every scenario."""
    return tier in (None, "nightly") or scenario.tier == tier


def with_model(path: Path | str, model: str, out: Path) -> Path:
    """A copy of scenario file `path` written to `out`, its `model` replaced by `model` (a zoo name, or a pipeline
    folder as its absolute path), everything else as written: how `capacity --model` and `bench --model` run a
    scenario on your checkpoint. The copy is what the run loads, so `report` reads it back the same.

    Raises:
        ScenarioError: the file does not name its model on a top-level `model = "..."` line, or `model` is no
            model the harness knows.
    """
    path = Path(path)
    try:
        spec = get_model(model, "--model")
    except UnknownModelError as e:
        raise ScenarioError(str(e)) from None
    text = path.read_text(encoding="utf-8")
    head, sep, tables = text.partition("\n[")  # the top-level keys come before the first table
    new, n = re.subn(r'(?m)^model\s*=\s*"[^"\n]*"[ \t]*', lambda _: f"model = {json.dumps(spec.name)}", head)
    if n != 1:
        raise _err(path, "model", 'expected one top-level line model = "..." to replace')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new + sep + tables, encoding="utf-8")
    return out


def same_family(path: Path | str, model: str) -> bool:
    """Whether scenario file `path`'s model and `model` run the same pipeline (family, and edit or not): the
    scenarios whose settings (frames, CFG batching, prefetch windows) apply to `model` too."""
    try:
        mine = get_model(_model_name(tomllib.loads(Path(path).read_text(encoding="utf-8")).get("model"),
                                     Path(path).resolve()))
        other = get_model(model)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, UnknownModelError):
        return False
    return (mine.family, mine.edit) == (other.family, other.edit)
