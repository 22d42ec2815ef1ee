"""The inputs every command takes from a person or a script, checked in one place before any work: names (scenario,
card, run id), the `OFFLOAD_BENCH_*` environment variables, and the files a command writes. Each failure is one
`InputError` line naming the input and the form it accepts; the commands turn it into `exitcodes.USAGE`.

Hand-written checks, not a declarative schema: the scenario file's rules are mostly relations (frames against the
model's VAE, prefetch against the model's layer groups, backends against the installed releases, expectations
against the cells they name) that a JSON Schema cannot say, so a schema would be a second, weaker copy of
harness/plan/scenario/ that drifts from it; docs/scenarios.md is the field reference.

Ground floor: imports no stage.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.common.records import ensure_writable


class InputError(ValueError):
    """An input (a name, an environment variable, an output path) has no meaning here. One line, naming it."""


# ------------------------------------------------------------------------------------------------------- names

# A name becomes a folder name (a run id: results/runs/<id>; a cell id: cells/<scenario>__<card>__<flags>) and a
# part of every cell id and log line. 255 bytes is the file-name limit of ext4, xfs and tmpfs; a cell's folder
# name adds the card and the flags label (tens of bytes) to the scenario name, so names stay well below it.
NAME_MAX_BYTES = {"scenario name": 100, "card name": 64, "run id": 128}


def name_problem(value: object, what: str) -> str | None:
    """Why `value` cannot be a `what` (a key of NAME_MAX_BYTES), or None. A name is a non-empty string without
    '/', control or format characters (newline, tab, NUL, U+202E which reverses what a terminal shows) or
    leading/trailing blanks, not '.' or '..', at most
    NAME_MAX_BYTES[what] bytes of UTF-8."""
    limit = NAME_MAX_BYTES[what]
    if not isinstance(value, str):
        return f"expected a string, got {value!r}"
    if not value.strip():
        return f"expected a non-empty name, got {value!r}"
    if value != value.strip():
        return f"has leading or trailing blanks: {value!r}"
    if any(unicodedata.category(ch).startswith("C") for ch in value):  # Cc (newline, NUL), Cf (bidi overrides)...
        return f"holds a control or format character (newline, tab, NUL, a bidi override, ...): {value!r}"
    if "/" in value or value in (".", ".."):
        return f"must be a plain folder name (no '/', not '.' or '..'), got {value!r}"
    size = len(value.encode("utf-8"))
    if size > limit:
        return f"is {size} bytes long; at most {limit} (it becomes part of file names)"
    return None


def check_name(value: object, what: str, where: str = "") -> str:
    """`value` if it is a valid `what` (see name_problem), else InputError naming `where` (e.g. '--run-id')."""
    problem = name_problem(value, what)
    if problem is not None:
        raise InputError(f"{where or what}: {problem}")
    return str(value)


# ------------------------------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class EnvVar:
    """One OFFLOAD_BENCH_* variable: its kind and the form it accepts (docs/environment-variables.md)."""

    name: str
    kind: str  # "bytes", "size" (bytes > 0), "seconds", "fraction", "margin", "choice"
    choices: tuple[str, ...] = ()

    def form(self) -> str:
        return {
            "bytes": "a byte count: a number >= 0 such as 268435456 or 2.5e9",
            "size": "a memory size in bytes: a number > 0 such as 85899345920 or 8e10",
            "seconds": "a number of seconds > 0 such as 15 or 0.5",
            "fraction": "a fraction from 0 to 1 such as 0.05",
            "margin": "a fraction >= 0 such as 0.10",
            "choice": f"one of {', '.join(self.choices)}",
        }[self.kind]

    def parse(self, raw: str) -> float | str:
        """The value of `raw`, or InputError naming the variable and the accepted form."""
        text = raw.strip()
        if self.kind == "choice":
            if text.lower() not in self.choices:
                raise InputError(f"{self.name}={raw!r}: expected {self.form()}")
            return text.lower()
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and value >= 0
        if self.kind in ("seconds", "size"):
            ok = ok and value > 0
        if self.kind == "fraction":
            ok = ok and value <= 1
        if not ok:
            raise InputError(f"{self.name}={raw!r}: expected {self.form()}")
        return value


_ENV_LIST = (
    EnvVar("OFFLOAD_BENCH_RESULTS_FREE_BYTES", "bytes"),
    EnvVar("OFFLOAD_BENCH_RESULTS_MIN_FREE_BYTES", "bytes"),
    EnvVar("OFFLOAD_BENCH_GPU_TOTAL_BYTES", "size"),  # a GPU of 0 bytes has no meaning (SGLang's defaults divide)
    EnvVar("OFFLOAD_BENCH_GPU_FREE_BYTES", "bytes"),
    EnvVar("OFFLOAD_BENCH_HOST_AVAILABLE_BYTES", "bytes"),
    EnvVar("OFFLOAD_BENCH_DISK_FREE_BYTES", "bytes"),
    EnvVar("OFFLOAD_BENCH_PROGRESS_S", "seconds"),
    EnvVar("OFFLOAD_BENCH_GUARD_MARGIN", "margin"),
    EnvVar("OFFLOAD_BENCH_GPU_MAX_FOREIGN_FRACTION", "fraction"),
    EnvVar("OFFLOAD_BENCH_PROFILE", "choice", ("cpu", "gpu", "auto")),
    EnvVar("OFFLOAD_BENCH_GUARDS", "choice", ("0", "1", "off", "on", "false", "true", "no", "yes")),
    EnvVar("OFFLOAD_BENCH_H2D_PROBE", "choice", ("each", "first")),
    EnvVar("OFFLOAD_BENCH_CELL_START", "choice", ("fork-server", "spawn")),
)
ENV = {v.name: v for v in _ENV_LIST}


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Every OFFLOAD_BENCH_* variable of ENV that is set (and not blank) has its form, else one InputError naming
    the first bad one. The runner, the pytest suite and `capacity` call it before any child starts: a child that
    reads a bad value would fail once per cell, after the cells before it ran."""
    environ = os.environ if environ is None else environ
    for var in _ENV_LIST:
        raw = environ.get(var.name)
        if raw is not None and raw.strip():
            var.parse(raw)


def env_number(name: str, default: float | None = None, environ: Mapping[str, str] | None = None) -> float | None:
    """The number in variable `name` (an ENV entry), `default` when unset or blank; InputError when malformed."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or not raw.strip():
        return default
    value = ENV[name].parse(raw)
    assert isinstance(value, float)
    return value


# ------------------------------------------------------------------------------------------------ output files


def check_output_file(path: Path | str, what: str) -> Path:
    """A file a command will write: not an existing folder, in a writable folder (made when written, so its
    nearest existing ancestor must be writable). InputError for a folder (UnwritableError from ensure_writable
    for an unwritable place), before the command prints or reads anything."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder; name a file to write")
    ensure_writable(path.parent, create=False)
    return path
