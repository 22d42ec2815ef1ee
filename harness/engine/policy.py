"""SGLang's own flag resolution, asked in a child process: the real `ServerArgs` of an installed release.

The parent never imports SGLang: each version lives in its own folder with its own pinned transformers
(`harness.engine.install`), so a child (`python -m harness.engine.serverargs`) puts that folder on `sys.path`,
builds `ServerArgs` as SGLang's unit tests build it (platform mocked as a CUDA GPU of the card's memory), and
answers a batch of requests as JSON. One child per version answers a whole grid.

This module imports no torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from harness import REPO
from harness.models.standin import CheckpointSource, StandinError, ensure_written

Task = Literal["T2I", "I2I", "T2V", "I2V"]


@dataclass(frozen=True)
class EngineRequest:
    """What a user hands SGLang: flags as typed (None = not passed, the engine's defaults decide), the card's memory,
    and the model (which selects SGLang's pipeline config and task type)."""

    flags: dict[str, bool | float | None]
    memory_gib: float
    family: str  # a harness zoo family: "qwen-image", "qwen-image-edit", "flux", "wan"
    task: Task
    performance_mode: str | None = None  # None: the release's default (auto where it exists)
    checkpoint: CheckpointSource | None = None  # what the release finds on disk (None: no checkpoint)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineResolution:
    """What the release's ServerArgs made of a request."""

    version: str
    effective: dict[str, bool | float | None]  # the six modelled flags after resolution
    layerwise_components: tuple[str, ...]  # SGLang's layerwise_offload_components ([] before it existed)
    dit_residency: str | None  # residency_mode("transformer") where the release has it
    messages: tuple[str, ...]  # what SGLang logged while resolving (warnings and info)
    pipeline_config: str  # the pipeline config class used, and how it was chosen
    error: str | None = None  # ServerArgs refused the request (its exception, one line)
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = "none"  # what the release was shown: "none", "folder <path>", "zoo sized stand-in <key>"
    checkpoint_bytes: int | None = None  # the tensor bytes of the checkpoint shown (what a load would read)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineResolution:
        return cls(
            version=str(data["version"]),
            effective=dict(data.get("effective") or {}),
            layerwise_components=tuple(data.get("layerwise_components") or ()),
            dit_residency=data.get("dit_residency"),
            messages=tuple(data.get("messages") or ()),
            pipeline_config=str(data.get("pipeline_config") or ""),
            error=data.get("error"),
            extra=dict(data.get("extra") or {}),
            checkpoint=str(data.get("checkpoint") or "none"),
            checkpoint_bytes=data.get("checkpoint_bytes"),
        )


class EngineError(RuntimeError):
    """The engine could not be asked: a version not installed, a child that failed or timed out. The message names
    the version and says what to do."""


class ReleaseMissing(EngineError):
    """The release is not installed here and no recorded answer covers the request. `version` names it; the message
    holds the install command."""

    def __init__(self, version: str, message: str) -> None:
        super().__init__(message)
        self.version = version


def install_command(version: str) -> str:
    return f"python -m harness.engine.install {version}"


DEFAULT_TIMEOUT_S = 900.0
"""A child imports SGLang (10-60 s, depending on the disk) and then answers about 1-5 ms a request."""

_CACHE: dict[tuple[str, str], EngineResolution] = {}


def available_versions() -> list[str]:
    """Installed SGLang versions for this interpreter, oldest first (by release number)."""
    from harness.engine.install import installed

    return sorted(installed(), key=version_key)


def version_key(version: str) -> tuple[int, ...]:
    """0.5.8 < 0.5.13 < 0.5.23, as releases order (string order would put 0.5.13 first)."""
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _request_key(request: EngineRequest) -> str:
    """The request as JSON; `FLAGS_OMITTED_AT_DEFAULT` are left out at their defaults, so answers recorded
    before the flags existed still match (the child passes them only off their defaults too). The checkpoint is
    keyed by its identity (kind, name, digest of what the release reads; not where a stand-in lies on this
    machine), and left out when there is none."""
    from harness.common.flags import FLAGS_OMITTED_AT_DEFAULT

    data = request.as_dict()
    data["flags"] = {k: v for k, v in data["flags"].items()
                     if k not in FLAGS_OMITTED_AT_DEFAULT or v != FLAGS_OMITTED_AT_DEFAULT[k]}
    if request.checkpoint is None:
        del data["checkpoint"]
    else:
        data["checkpoint"] = request.checkpoint.identity()
    return json.dumps(data, sort_keys=True)


def _with_folders(requests: list[EngineRequest]) -> list[EngineRequest]:
    """The requests with their checkpoints on disk (a zoo stand-in is written once per spec, in a child).

    Raises:
        EngineError: a stand-in could not be written.
    """
    written: dict[str, CheckpointSource] = {}
    out = []
    for r in requests:
        if r.checkpoint is not None and r.checkpoint.path is None:
            key = r.checkpoint.label
            try:
                written.setdefault(key, ensure_written(r.checkpoint))
            except StandinError as e:
                raise EngineError(str(e)) from None
            r = replace(r, checkpoint=written[key])
        out.append(r)
    return out


def resolve_engine(version: str, requests: list[EngineRequest], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                   cache: bool = True) -> list[EngineResolution]:
    """SGLang `version`'s real ServerArgs for each request, in order: one child for all requests not yet cached.

    `cache=False` asks the child for every request and keeps nothing in this process: the differential grid asks
    about 29,000 distinct questions a release, which a scenario never asks again.

    Raises:
        EngineError: the version is not installed (with the install command), the child failed (with the tail of
            its stderr) or ran past `timeout_s`.
    """
    from harness.engine.install import engine_root, installed

    keys = [_request_key(r) for r in requests]
    recorded = _recorded_answers()
    if recorded is not None and all((version, k) in recorded for k in keys):
        return [recorded[(version, k)] for k in keys]
    store: dict[tuple[str, str], EngineResolution] = _CACHE if cache else {}
    engines = installed()
    if cache and any((version, k) not in store for k in keys):
        # what this release's folder (or, without it, the shipped file) recorded for this child's code: read only
        # when this process has not got every answer already (a scenario asks once per card)
        saved = _saved_answers(version, engines[version].site.parent if version in engines else None)
        for key in keys:
            if (version, key) not in store and key in saved:
                store[(version, key)] = saved[key]
    todo: dict[str, EngineRequest] = {}
    for key, request in zip(keys, requests, strict=True):
        if (version, key) not in store:
            todo.setdefault(key, request)
    if todo and version not in engines:
        have = ", ".join(sorted(engines, key=version_key)) or "none"
        raise ReleaseMissing(version,
            f"sglang {version} is not installed under {engine_root()} (installed: {have}) and no recorded answer "
            f"covers {len(todo)} of these {len(keys)} requests; install it with `{install_command(version)}` (or "
            "point OFFLOAD_BENCH_SGLANG_ROOT at a folder holding it)"
        )
    if todo:
        answers = _ask_child(version, _with_folders(list(todo.values())), timeout_s)
        for key, answer in zip(todo, answers, strict=True):
            store[(version, key)] = answer
        if recorded is not None:
            _record_answers({(version, k): store[(version, k)] for k in todo})
        if cache:
            _save_answers(engines[version].site.parent, {k: store[(version, k)] for k in todo})
    return [store[(version, key)] for key in keys]


SHIPPED_ANSWERS = Path(__file__).with_name("answers.jsonl")
"""Answers of the real releases to the requests the shipped scenarios make, recorded by `python -m harness
record-answers` on a machine with the releases: what a machine without a release resolves from
(each keeps `extra.answered_by`). A line recorded by another version of the child's code is not used."""


def child_code_digest() -> str:
    """A digest of the child's code (serverargs.py): an answer holds only for the code that asked it."""
    import hashlib

    return hashlib.sha256(Path(__file__).with_name("serverargs.py").read_bytes()).hexdigest()[:16]


def _read_answer_lines(path: Path, version: str) -> dict[str, EngineResolution]:
    out: dict[str, EngineResolution] = {}
    digest = child_code_digest()
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-append: asked again
        if item.get("version") == version and item.get("child") == digest:
            out[item["request_key"]] = EngineResolution.from_dict(item["answer"])
    return out


def _saved_answers(version: str, folder: Path | None) -> dict[str, EngineResolution]:
    """The installed release's own answers file, else (no release here) the shipped one."""
    return _read_answer_lines(folder / "answers.jsonl" if folder else SHIPPED_ANSWERS, version)


def _save_answers(folder: Path, answers: dict[str, EngineResolution], path: Path | None = None) -> None:
    import platform

    by = f"{platform.node()} python {platform.python_version()}"
    digest = child_code_digest()
    version = folder.name.rsplit("-py", 1)[0]
    try:
        with (path or folder / "answers.jsonl").open("a") as f:
            for key, answer in answers.items():
                item = answer.as_dict()
                item["extra"] = {**item.get("extra", {}), "answered_by": by}
                f.write(json.dumps({"version": version, "child": digest, "request_key": key, "answer": item}) + "\n")
    except OSError:
        pass  # a read-only engine folder: the answers are asked again next time


def clear_cache() -> None:
    _CACHE.clear()


def write_shipped(out: Path = SHIPPED_ANSWERS) -> int:
    """Writes the installed releases' answers that this process asked or read since `clear_cache()` into `out`
    (replacing it): after loading every shipped scenario, the answers those scenarios need (`python -m harness
    record-answers`). Returns the number of answers."""
    from harness.engine.install import installed

    engines = installed()
    lines = 0
    out.write_text("")
    for version in sorted({v for v, _ in _CACHE}, key=version_key):
        if version in engines:
            answers = {k: a for (v, k), a in sorted(_CACHE.items()) if v == version}
            _save_answers(engines[version].site.parent, answers, path=out)
            lines += len(answers)
    return lines


ANSWERS_ENV = "OFFLOAD_BENCH_SGLANG_ANSWERS"
"""A JSON-lines file of ServerArgs answers, read before asking a child and appended to after. The answer depends
only on the release and the request (the child mocks the platform, runs offline with a HF cache holding only the
request's checkpoint, which the request names by the digest of what is read from it), so answers recorded on one
machine hold on another: the lent GPU machine, which carries the file instead of every release and its pinned
transformers. Each answer keeps `extra.answered_by` (the machine and Python that asked)."""


def _recorded_answers() -> dict[tuple[str, str], EngineResolution] | None:
    path = os.environ.get(ANSWERS_ENV)
    if not path:
        return None
    out: dict[tuple[str, str], EngineResolution] = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                out[(item["version"], item["request_key"])] = EngineResolution.from_dict(item["answer"])
    return out


def _record_answers(answers: dict[tuple[str, str], EngineResolution]) -> None:
    import platform

    path = Path(os.environ[ANSWERS_ENV])
    path.parent.mkdir(parents=True, exist_ok=True)
    by = f"{platform.node()} python {platform.python_version()}"
    with path.open("a") as f:
        for (version, key), answer in answers.items():
            item = answer.as_dict()
            item["extra"] = {**item.get("extra", {}), "answered_by": by}
            f.write(json.dumps({"version": version, "request_key": key, "answer": item}) + "\n")


def _ask_child(version: str, requests: list[EngineRequest], timeout_s: float) -> list[EngineResolution]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    payload = json.dumps([r.as_dict() for r in requests])
    cmd = [sys.executable, "-m", "harness.engine.serverargs", "--version", version]
    try:
        proc = subprocess.run(cmd, input=payload, capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=REPO)
    except subprocess.TimeoutExpired as e:
        tail = _tail(e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
        raise EngineError(f"sglang {version}: the ServerArgs child ran past {timeout_s:.0f} s "
                          f"({len(requests)} requests); its stderr ended with:\n{tail}") from None
    if proc.returncode != 0:
        raise EngineError(f"sglang {version}: the ServerArgs child exited with {proc.returncode} "
                          f"({len(requests)} requests); its stderr ended with:\n{_tail(proc.stderr)}")
    try:
        raw = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise EngineError(f"sglang {version}: the ServerArgs child wrote no JSON answer ({e}); its stderr ended "
                          f"with:\n{_tail(proc.stderr)}") from None
    if not isinstance(raw, list) or len(raw) != len(requests):
        raise EngineError(f"sglang {version}: the ServerArgs child answered {len(raw)} of {len(requests)} requests")
    return [EngineResolution.from_dict(item) for item in raw]


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"

