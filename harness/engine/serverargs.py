"""Child process: SGLang's real `ServerArgs` of one installed release, asked for a batch of offload requests.

`python -m harness.engine.serverargs --version 0.5.23` reads a JSON list of `EngineRequest` dicts on stdin and
writes a JSON list of `EngineResolution` dicts (same order) on stdout; SGLang's own logging goes to stderr and, per
request, into the resolution's `messages`.

How a request becomes a `ServerArgs`, as SGLang's unit tests (`test/unit/test_server_args.py`) build one:

- the platform is SGLang's `current_platform` object with its CUDA answers mocked: `is_cuda` true, `is_cpu`/`is_mps`
  false, total device memory = the card's GiB, available memory the same (a fresh card), DiT layerwise on by default
  (CUDA's own answer; ROCm's differs) and a discrete card (not a shared host/device pool). The mock stays on while
  the effective values are read back, since `residency_mode()` asks the platform again;
- the checkpoint is the request's (`checkpoint`: a folder model's own folder, a zoo model's sized stand-in,
  `harness.models.standin`; or none): the child runs with `HF_HUB_OFFLINE=1` and a Hugging Face cache of its own
  (`HF_HUB_CACHE`, a temporary folder) in which the family's published id resolves, per request, to that folder
  (`models--Org--Name/refs/main` naming the snapshot `snapshots/<digest>`, a link to it) or to nothing. 0.5.23's
  sizing rules (`_fits_all_components_resident`, `_dit_overflows_device_in_auto`) call `checkpoint_component_sizes`
  and `dit_parameter_count` with `model_path`, which read a local folder or, for a Hub id, the snapshot
  `snapshot_download(local_files_only=True)` finds in that cache: both ways read the same headers. The Hub id is
  kept as `model_path` because everything else in ServerArgs that reads it asks about the published checkpoint by
  name: 0.5.23's overlay registry (`resolve_model_overlay`, an exact-name match), its list of checkpoints
  validated for breakable CUDA graphs and the model registry (`get_model_info`, for a model's CFG default), the
  registry the pipeline config below is looked up in by the same id. A local path there would change those
  answers (a folder is matched by its basename) along with the sizes, and a folder model runs as its family's
  published checkpoint anyway (`harness.models.folder`). What the sizing functions returned is kept in
  `extra.checkpoint_read`, and `checkpoint` names what was shown ("none", "folder <path>", "zoo sized stand-in
  <model>@<digest>") with its tensor bytes; without a checkpoint they find nothing and the model's declared
  policy stands, as before;
- `PipelineConfig.from_kwargs` is replaced by an instance of the release's own pipeline config class for the
  family's published checkpoint, looked up in the release's model registry by its Hugging Face id (an exact match,
  so nothing is downloaded). SGLang's offload defaults read the config's task type and, from 0.5.13 on, its
  deployment hints (e.g. Wan's auto DiT layerwise), so the real class matters; a base `PipelineConfig` with the
  task type set is the fallback, and `pipeline_config` in the answer says which was used and why;
- only flags the request sets are passed: `ServerArgs.from_dict` marks every key it is given as explicitly set
  (0.5.13 on), and an explicit `None` is not SGLang's "unset".

SGLang's root log handler writes to stdout, so stdout is pointed at stderr for the whole run and the answer goes
to the saved descriptor. Its `info_once` dedup is cleared before each request, so each request gets its own
messages.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from harness.common.flags import FLAGS_OMITTED_AT_DEFAULT

MODELLED_FLAGS = (
    "dit_cpu_offload",
    "dit_layerwise_offload",
    "text_encoder_cpu_offload",
    "vae_cpu_offload",
    "dit_offload_prefetch_size",
    "pin_cpu_memory",
    "dit_layerwise_resident_layers",
    "dit_layerwise_residency_policy",
    "layerwise_offload_components",
    "layerwise_prefetch_size",
    "layerwise_resident_layers",
    "layerwise_residency_policy",
)

RESIDENCY_NAMES = {"dit": "transformer", "text_encoder": "text_encoder", "vae": "vae"}
"""The zoo's roles by the component names SGLang's residency_mode takes."""
# FLAGS_OMITTED_AT_DEFAULT: flags only some releases have (0.5.23), with their ServerArgs defaults: passed only when
# a request moves them off the default (passing a default would mark it explicitly set), refused by a release
# without the field.

FAMILY_CHECKPOINTS: dict[str, tuple[str, str]] = {
    # family: (published checkpoint whose pipeline config SGLang registers, task type SGLang gives it)
    "qwen-image": ("Qwen/Qwen-Image", "T2I"),
    "qwen-image-edit": ("Qwen/Qwen-Image-Edit-2509", "I2I"),  # the #26925 model
    "flux": ("black-forest-labs/FLUX.1-dev", "T2I"),
    "wan": ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "T2V"),
}

EXTRA_FIELDS = (
    "image_encoder_cpu_offload",
    "use_fsdp_inference",
    "performance_mode",
    "component_residency",
    "cpu_offload_components",
)
"""Other ServerArgs fields read back where the release has them (not modelled; kept for the report)."""


class _Capture(logging.Handler):
    """Collects SGLang's log records of the request being resolved."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not fail the resolution it belongs to
            text = str(record.msg)
        if text.startswith("server_args:"):  # the whole ServerArgs dump, not a decision
            return
        self.records.append(f"{record.levelname}: {text}")


_CONFIG_CLASSES: dict[str, Any] = {}


def _pipeline_config(family: str, task: str) -> tuple[Any, str]:
    """An instance of the release's pipeline config for `family`, and a note saying which class and why."""
    from sglang.multimodal_gen.configs.pipeline_configs.base import ModelTaskType, PipelineConfig

    checkpoint, _ = FAMILY_CHECKPOINTS.get(family, (None, task))
    note = ""
    if checkpoint is not None:
        try:
            from sglang.multimodal_gen.registry import _get_config_info

            if family not in _CONFIG_CLASSES:  # the registry lookup is slow; a fresh instance per request is not
                info = _get_config_info(checkpoint)
                _CONFIG_CLASSES[family] = info.pipeline_config_cls if info is not None else None
            if _CONFIG_CLASSES[family] is not None:
                config = _CONFIG_CLASSES[family]()
                cls = type(config)
                note = f"{cls.__module__}.{cls.__name__}: the release's registered config for {checkpoint}"
                got = getattr(config.task_type, "name", str(config.task_type))
                if got != task:
                    # the request's task wins: the differential grid asks for the task it compares
                    config.task_type = ModelTaskType[task]
                    note += f" (task type {got} overridden to {task})"
                return config, note
        except Exception as e:  # an older registry without the model, or one that wants the network
            note = f"registry lookup of {checkpoint} failed ({type(e).__name__}: {e}); "
    config = PipelineConfig()
    config.task_type = ModelTaskType[task]
    return config, note + f"PipelineConfig (base) with task_type={task}: no registered config for {family!r}"


@contextlib.contextmanager
def _mocked_cuda(memory_gib: float) -> Iterator[None]:
    """SGLang's platform answers as one CUDA GPU with `memory_gib` GiB, all of it free."""
    from sglang.multimodal_gen.runtime.platforms import current_platform

    answers: dict[str, Any] = {
        "is_cpu": mock.Mock(return_value=False),
        "is_mps": mock.Mock(return_value=False),
        "is_cuda": mock.Mock(return_value=True),
        "get_device_total_memory": mock.Mock(return_value=int(memory_gib * 1024**3)),
        "get_available_gpu_memory": mock.Mock(return_value=memory_gib),
        # CUDA's answers (platforms/cuda.py, interface.py); the CPU platform says no to both
        "enable_dit_layerwise_offload_for_wan_by_default": mock.Mock(return_value=True),  # 0.5.8, 0.5.13
        "enable_dit_layerwise_offload_by_default": mock.Mock(return_value=True),  # 0.5.23
        # a discrete card: the CPU platform's shared pool would turn pinning off (0.5.23 finalize_auto_flags)
        "device_shares_host_memory": mock.Mock(return_value=False),
    }
    with contextlib.ExitStack() as stack:
        for name, answer in answers.items():
            if hasattr(current_platform, name):
                stack.enter_context(mock.patch.object(current_platform, name, answer))
        yield


def _clear_log_once() -> None:
    from sglang.multimodal_gen.runtime.utils import logging_utils

    for name in ("_print_info_once", "_print_warning_once"):
        clear = getattr(getattr(logging_utils, name, None), "cache_clear", None)
        if clear is not None:
            clear()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def _server_kwargs(server_args_cls: Any, request: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """ServerArgs keyword arguments for a request, and the flags this release does not have (from_dict would drop
    them without a word)."""
    kwargs: dict[str, Any] = {"model_path": FAMILY_CHECKPOINTS.get(request["family"], ("/fake",))[0]}
    fields = {f.name for f in dataclasses.fields(server_args_cls)}
    missing: list[str] = []
    for name, value in request["flags"].items():
        if name in FLAGS_OMITTED_AT_DEFAULT and value == FLAGS_OMITTED_AT_DEFAULT[name]:
            continue
        if name in FLAGS_OMITTED_AT_DEFAULT and name not in fields:
            missing.append(name)
        elif value is not None:
            kwargs[name] = value
    if request.get("performance_mode") is not None:
        kwargs["performance_mode"] = request["performance_mode"]
    return kwargs, missing


_SIZERS = ("checkpoint_component_sizes", "dit_parameter_count")
"""What 0.5.23's auto memory policy reads a checkpoint with (`runtime/server_args/auto_tune.py` imports both)."""
_SHOWN: dict[str, str] = {}  # family -> what its Hub id resolves to in this child's HF cache now


def _show_checkpoint(hub: Path, family: str, checkpoint: dict[str, Any] | None) -> str:
    """Makes the family's Hub id resolve, in the HF cache `hub`, to the request's checkpoint folder, or to nothing;
    returns what SGLang is shown ("none", or the checkpoint's label)."""
    from harness.models.standin import CheckpointSource

    repo_id = FAMILY_CHECKPOINTS.get(family, (None, ""))[0]
    source = CheckpointSource.from_dict(checkpoint) if checkpoint else None
    if source is not None and (repo_id is None or not source.path):
        raise ValueError(f"checkpoint {source.label}: no folder to show, or no published id for family {family!r}")
    label = source.label if source is not None else "none"
    if repo_id is None or _SHOWN.get(family) == f"{label} {source.path if source else ''}":
        return label
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    shutil.rmtree(repo, ignore_errors=True)  # the snapshot is a link: rmtree removes the link, not the folder
    if source is not None:
        (repo / "refs").mkdir(parents=True)
        (repo / "snapshots").mkdir()
        (repo / "refs" / "main").write_text(source.digest)
        (repo / "snapshots" / source.digest).symlink_to(str(source.path), target_is_directory=True)
    _SHOWN[family] = f"{label} {source.path if source else ''}"
    return label


_SIZING_MODULE: list[Any] = []


def _sizing_module() -> Any:
    """0.5.23's auto_tune module (None for a release without it), imported once."""
    if not _SIZING_MODULE:
        try:
            _SIZING_MODULE.append(importlib.import_module("sglang.multimodal_gen.runtime.server_args.auto_tune"))
        except ImportError:
            _SIZING_MODULE.append(None)
    return _SIZING_MODULE[0]


@contextlib.contextmanager
def _watched_sizing(read: dict[str, Any]) -> Iterator[None]:
    """Records in `read` what the release's checkpoint sizing answered, call by call (the release's own functions
    answer: they are wrapped, not replaced)."""
    module = _sizing_module()
    with contextlib.ExitStack() as stack:
        for name in _SIZERS:
            original = getattr(module, name, None) if module is not None else None
            if original is None:
                continue

            def spy(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                value = _original(*args, **kwargs)
                read[_name] = _jsonable(value)
                return value

            stack.enter_context(mock.patch.object(module, name, spy))
        yield


def _read_back(args: Any, answer: dict[str, Any]) -> None:
    """The resolved flags, layerwise components and residency of a built ServerArgs, into `answer`."""
    answer["effective"] = {n: _jsonable(getattr(args, n)) for n in MODELLED_FLAGS if hasattr(args, n)}
    comps = getattr(args, "layerwise_offload_components", None)
    answer["layerwise_components"] = list(comps or [])
    if hasattr(args, "residency_mode"):
        answer["dit_residency"] = str(args.residency_mode("transformer"))
        answer["extra"]["residency"] = {role: str(args.residency_mode(name))
                                        for role, name in RESIDENCY_NAMES.items()}
    answer["extra"] = {**answer["extra"],
                       **{n: _jsonable(getattr(args, n)) for n in EXTRA_FIELDS if hasattr(args, n)}}
    answer["extra"]["has_layerwise_offload_components"] = hasattr(args, "layerwise_offload_components")


def resolve_one(server_args_cls: Any, version: str, request: dict[str, Any], capture: _Capture,
                hub: Path | None = None) -> dict[str, Any]:
    """One EngineResolution dict for one EngineRequest dict (ServerArgs raising is an answer, not a failure).
    `hub`: this child's Hugging Face cache, where the request's checkpoint is shown (None: none is)."""
    from sglang.multimodal_gen.configs.pipeline_configs.base import PipelineConfig

    config, note = _pipeline_config(request["family"], request["task"])
    kwargs, missing = _server_kwargs(server_args_cls, request)
    checkpoint = request.get("checkpoint")
    capture.records.clear()
    _clear_log_once()
    answer: dict[str, Any] = {
        "version": version, "effective": {}, "layerwise_components": [], "dit_residency": None, "messages": [],
        "pipeline_config": note, "error": None, "extra": {},
        "checkpoint": _show_checkpoint(hub, request["family"], checkpoint) if hub is not None else "none",
        "checkpoint_bytes": int(checkpoint["total_bytes"]) if checkpoint and hub is not None else None,
    }
    if missing:
        answer["error"] = f"SGLang {version} has no {', '.join(missing)}"
        return answer
    read: dict[str, Any] = {}
    with _mocked_cuda(float(request["memory_gib"])), mock.patch.object(PipelineConfig, "from_kwargs",
                                                                       return_value=config), _watched_sizing(read):
        try:
            args = server_args_cls.from_dict(kwargs)
        except Exception as e:  # SGLang refusing the combination is the answer
            answer["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            args = None
        if args is not None:
            _read_back(args, answer)
    if read:
        answer["extra"]["checkpoint_read"] = read
    answer["messages"] = list(capture.records)
    return answer


def _import_server_args() -> Any:
    """The release's server_args module (0.5.23: a package whose __init__ re-exports ServerArgs)."""
    import importlib

    return importlib.import_module("sglang.multimodal_gen.runtime.server_args")


def _sealed_server_args(version: str, site: Path) -> Any:
    """The release's ServerArgs class, imported in this process sealed to the release's folder (None, with one line
    on stderr naming the module and the reinstall command, when the folder lacks a module it needs)."""
    import harness
    from harness.engine.install import host_shared
    from harness.engine.runtime import HOST_SHARED, activate, seal

    seal(site, harness_root=Path(harness.__file__).resolve().parent.parent, also_shared=host_shared(site))
    activate(site, first=True)
    t0 = time.monotonic()
    try:
        server_args_cls = _import_server_args().ServerArgs
    except ModuleNotFoundError as e:
        print(f"sglang {version}: ServerArgs needs module {e.name!r}, which its folder {site} lacks (the host's "
              f"packages are sealed off, but for {', '.join(HOST_SHARED)}); reinstall the release: rm -r "
              f"{site.parent} && python -m harness.engine.install {version}", file=sys.stderr)
        return None
    print(f"sglang {version}: ServerArgs imported in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return server_args_cls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.engine.serverargs", description=__doc__.split("\n")[0])
    parser.add_argument("--version", required=True)
    args = parser.parse_args(argv)

    # SGLang's log handler writes to sys.stdout; the answer must be the only thing on the real stdout.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    answer_out = io.TextIOWrapper(os.fdopen(answer_fd, "wb"), encoding="utf-8")

    from harness.engine.install import installed

    engines = installed()
    if args.version not in engines:
        print(f"sglang {args.version} is not installed (have: {', '.join(engines) or 'none'})", file=sys.stderr)
        return 3
    requests = json.loads(sys.stdin.read())
    # before SGLang (and huggingface_hub) read them: no network, and a cache of this child's own, which holds only
    # the checkpoint each request is asked with (the same answer everywhere)
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = Path(tempfile.mkdtemp(prefix="offload-bench-hf-"))
    os.environ["HF_HUB_CACHE"] = os.environ["HUGGINGFACE_HUB_CACHE"] = str(hub)
    server_args_cls = _sealed_server_args(args.version, engines[args.version].site)
    if server_args_cls is None:
        return 5
    capture = _Capture()
    sglang_logger = logging.getLogger("sglang")
    sglang_logger.setLevel(logging.INFO)
    sglang_logger.addHandler(capture)
    sglang_logger.propagate = False  # thousands of requests: their info lines stay out of stderr

    answers = []
    t0 = time.monotonic()
    for request in requests:
        try:
            answers.append(resolve_one(server_args_cls, args.version, request, capture, hub))
        except Exception:
            traceback.print_exc()
            return 4
    print(f"sglang {args.version}: {len(answers)} requests in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    shutil.rmtree(hub, ignore_errors=True)
    json.dump(answers, answer_out)
    answer_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
