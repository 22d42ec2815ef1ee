"""The policies that turn requested offload flags into the flags an engine really runs with.

SGLang resolves its offload flags in `ServerArgs` before anything is loaded, and one step of that resolution was
the #26925 bug: with DiT layerwise offload on, `dit_cpu_offload` was forced off, so the loader put the whole DiT on
the GPU. Each hand-written policy models one SGLang release's resolution, one module each (`sglang_0_5_23`,
`sglang_0_5_13`, `sglang_0_5_8`, and `sglang_legacy` for the unreleased code between #24593 and #26925), so a
scenario can run "as SGLang would have" and the record keeps requested flags, effective flags and the policy's
messages side by side. `sglang@<version>` asks the release itself (`engine`), the only module here that talks to
the engine adapter; `differential` holds each model against its release.

The parent resolves once (`resolve_many`, a card's cells at a time) and hands the child the `Resolution`.
This package imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from harness.common.flags import FlagError, OffloadFlags
from harness.engine.policy import EngineError, ReleaseMissing, clear_cache, install_command, write_shipped
from harness.policy import sglang_0_5_8, sglang_0_5_13, sglang_0_5_23, sglang_legacy
from harness.policy.engine import ENGINE_PREFIX, engine_flags, engine_version, resolve_with_engine
from harness.policy.resolution import FAMILY_TASKS, TASKS, EngineContext, EngineDetails, Resolution, Task

__all__ = [
    "ENGINE_PREFIX", "FAMILY_TASKS", "MODEL_FOR_VERSION", "POLICIES", "TASKS", "EngineContext", "EngineDetails",
    "EngineError", "ReleaseMissing", "Resolution", "Task", "check_policy", "clear_cache", "engine_flags",
    "engine_version", "install_command", "release_status", "resolve", "resolve_many", "write_shipped",
]

PolicyFn = Callable[..., tuple[OffloadFlags, list[str], EngineDetails | None]]

POLICIES: dict[str, PolicyFn] = {
    "sglang": sglang_0_5_23.resolve,
    "sglang-0.5.13": sglang_0_5_13.resolve,
    "sglang-legacy": sglang_legacy.resolve,
    "sglang-pre18997": sglang_0_5_8.resolve,
}
"""Our hand-written models. `sglang@<version>` and `sglang@installed` ask the real engine instead."""

MODEL_FOR_VERSION: dict[str, str] = {"0.5.8": "sglang-pre18997", "0.5.13": "sglang-0.5.13", "0.5.23": "sglang"}
"""Which hand-written model follows which release (checked by tests/test_engine_differential.py)."""


def release_status(version: str) -> tuple[str, list[str]]:
    """Whether SGLang `version` is "installed" here, "known" (a release this harness models, `MODEL_FOR_VERSION`,
    not installed here) or "unknown" (neither: a typo such as 9.9.9); with the known and installed versions."""
    from harness.engine.install import installed
    from harness.engine.policy import version_key

    here = installed()
    known = sorted(set(MODEL_FOR_VERSION) | set(here), key=version_key)
    if version in here:
        return "installed", known
    return ("known" if version in MODEL_FOR_VERSION else "unknown"), known


def check_policy(name: Any, where: str = "policy") -> str:
    """Returns a valid policy name: one of POLICIES, `sglang@<version>` or `sglang@installed`.

    The engine policies are checked by form only: whether the version is installed is asked when resolving.
    """
    if isinstance(name, str) and name.startswith(ENGINE_PREFIX):
        version = name[len(ENGINE_PREFIX):]
        if version == "installed" or re.fullmatch(r"\d+(\.\d+){1,3}([a-z0-9.+-]*)", version):
            return name
        raise FlagError(f"{where}: {name!r}: expected sglang@<version> (e.g. sglang@0.5.23) or sglang@installed")
    if not isinstance(name, str) or name not in POLICIES:
        known = [*POLICIES, "sglang@<version>", "sglang@installed"]
        raise FlagError(f"{where}: unknown policy {name!r}; known policies: {', '.join(known)}")
    return name


def resolve(flags: OffloadFlags, policy: str, context: EngineContext | None = None) -> Resolution:
    """Resolves requested flags under a named policy (`context`: the card and task, for unset flags).

    Example:
        >>> r = resolve(OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True), "sglang-legacy")
        >>> r.effective.dit_cpu_offload
        False
    """
    return resolve_many([flags], policy, context)[0]


def resolve_many(flags_list: list[OffloadFlags], policy: str,
                 context: EngineContext | None = None) -> list[Resolution]:
    """`resolve` for many flag sets under one policy and context: an engine policy asks one child for all.

    Raises:
        FlagError: an unknown policy, unset flags without a context, or flags our model cannot express.
        harness.engine.policy.EngineError: the engine policy's release is not installed or its child failed.
    """
    check_policy(policy)
    version = engine_version(policy)
    if version is None:
        out = []
        for flags in flags_list:
            effective, messages, details = POLICIES[policy](flags, context, policy)
            out.append(Resolution(policy, flags, effective, tuple(messages), details))
        return out
    return resolve_with_engine(flags_list, policy, version, context)
