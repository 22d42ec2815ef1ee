"""The field checks that reading a scenario file and its [expect] table share: an error naming the file and the
field, a positive finite number, a table of flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.common.flags import FlagError, check_flag_value, is_finite_number
from harness.plan.scenario.types import ScenarioError


def _err(path: Path | str, field_name: str, msg: str) -> ScenarioError:
    return ScenarioError(f"{path}: {field_name}: {msg}")


def _positive_number(v: Any) -> bool:
    """A finite number above zero, and not a boolean (TOML's true is an int to Python)."""
    return not isinstance(v, bool) and isinstance(v, int | float) and is_finite_number(v) and v > 0


def _flag_table(data: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _err(path, where, f"expected a table of flags, got {data!r}")
    try:
        return {k: check_flag_value(k, v, f"{path}: {where}") for k, v in data.items()}
    except FlagError as e:
        raise ScenarioError(str(e)) from None
