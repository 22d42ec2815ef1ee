"""The fork server: one process per run that imports the child's stack once and forks one fresh child per cell.

`python -m harness.cell.forkserver --requests FD --replies FD [--for RUN_DIR]`, started by the runner
(`harness.run.cell_start.ForkServer`) at a run's first cell. It imports torch, the worker's modules and every class
the zoo's factories and the pipeline import lazily from diffusers and transformers (`preload`): the first import of
those classes was 9.0-12.2 s of each tiny CUDA cell's 14.45 s fixed cost (`guards_s`,
`results/h200/qwen-image-edit-tiny-cuda.records.jsonl`). It never touches CUDA: the CUDA context is made in each
child, after the fork (`torch.cuda.is_initialized()` is checked before every fork; the server exits rather than
fork a child that would inherit a context).

Each child runs exactly what `python -m harness.cell.worker --cell CELL --out OUT` runs (`worker.main`, then
`worker.exit_now`), in its own session and process group (pgid = its pid, as `start_new_session` gives a spawned
child), with SIGKILL as its parent-death signal (the server dies when the runner does: its request pipe reaches
EOF), stdin from /dev/null, stdout and stderr appended to the cell's log, the cell's working folder and the cell's
whole environment (os.environ replaced) applied before the worker runs. Variables read once at import (by torch,
diffusers, transformers) are the server's, which the runner starts with its own environment and restarts when that
changes.

Protocol (one JSON object per line): requests `{"argv", "env", "cwd", "log"}`; replies `{"ready": {...}}` once
after the preload, then `{"forked": pid}` per request and `{"exited": pid, "returncode": rc}` per child (rc as
subprocess gives it: the exit code, or minus the signal number). A failed fork answers `{"refused": why}`.

Imports no torch when imported: the server imports it in `preload`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import json
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from harness.common.lineage import die_with

# The worker's own modules; what they import at module level comes along. harness.engine.* stays out: the SGLang
# backend's cells are spawned (harness.run.cell_start.start_method says why).
CELL_MODULES = ("harness.cell.worker", "harness.cell.measure", "harness.cell.pipeline", "harness.cell.guards",
                "harness.cell.checkpoint", "harness.cell.offload.loader", "harness.models.folder")
HEAVY_ROOTS = ("diffusers", "transformers")
CUDA_ABORT_CODE = 70  # the server's exit code when it finds a CUDA context before a fork (EX_SOFTWARE)
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"


def lazy_heavy_imports(module_files: list[Path]) -> list[tuple[str, str]]:
    """(module, name) of every `from diffusers... import X` / `from transformers... import X` inside a function of
    these files: the classes a cell imports on first use (a zoo factory's model classes, the pipeline's
    schedulers), found in the source so that the list cannot drift from what the factories import."""
    found: dict[tuple[str, str], None] = {}
    for path in module_files:
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and not node.level and \
                        (node.module or "").split(".")[0] in HEAVY_ROOTS:
                    found.update({(str(node.module), a.name): None for a in node.names})
    return list(found)


def preload() -> dict[str, Any]:
    """Imports torch, the cell's modules, the zoo and the classes they import lazily; what it did, for the ready
    line. A class that does not import (an older diffusers without a model) is listed, not fatal: the cells of
    that model then fail in their child as they would when spawned."""
    t0 = time.perf_counter()
    before = dict(os.environ)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # as worker.main sets them before its first import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # An import that asks torch.cuda.is_available() would otherwise initialise the CUDA driver here (the runtime's
    # cudaGetDeviceCount), and a driver initialised before a fork fails in the child; through NVML it does not.
    # Not passed on: a child asks as a spawned one does.
    nvml_check = os.environ.get(NVML_CHECK_ENV)
    os.environ[NVML_CHECK_ENV] = "1"
    import torch

    from harness.models import ZOO, model_names

    model_names()  # registers the families
    modules = [importlib.import_module(m) for m in CELL_MODULES]
    factories = {spec.factory.split(":")[0] for model in ZOO.values() for spec in model.components.values()}
    modules += [importlib.import_module(m) for m in sorted(factories)]
    files = [Path(str(m.__file__)) for m in modules]
    missing = []
    for module, name in lazy_heavy_imports(files):
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{module}.{name}: {type(e).__name__}: {e}")
    if nvml_check is None:
        del os.environ[NVML_CHECK_ENV]
    else:
        os.environ[NVML_CHECK_ENV] = nvml_check
    # what the imports set in the environment (torch's TORCHINDUCTOR_CACHE_DIR): a child gets them under its own,
    # as a spawned child's imports would set them
    env_set = {k: v for k, v in os.environ.items() if before.get(k) != v}
    return {"pid": os.getpid(), "torch": torch.__version__, "preload_s": round(time.perf_counter() - t0, 3),
            "modules": len(sys.modules), "missing": missing, "threads": _thread_count(), "env_set": env_set,
            "cuda_initialized": torch.cuda.is_initialized()}


def _thread_count() -> int:
    """OS threads of this process (a fork copies only the calling one: a lock another holds stays locked)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def refuse_cuda() -> None:
    """Before every fork: a CUDA context here would be inherited by the child, which cannot use it (CUDA does
    not survive fork) and would measure against it. Nothing in the server calls CUDA; this holds it to that."""
    import torch

    assert torch.cuda.is_initialized() is False, "the fork server holds a CUDA context; it must never touch CUDA"


# ---------------------------------------------------------------------------------------------------- the child


def become_cell(request: dict[str, Any], sync_w: int, server_pid: int, keep_closed: list[int],
                env_set: dict[str, str]) -> None:
    """In the forked child: the process a spawned worker is (session, death signal, stdio, folder, environment),
    then the worker itself. Never returns."""
    code = 1
    try:
        os.setsid()  # before the parent learns the pid: its process group exists when the runner may kill it
        die_with(server_pid)
        os.write(sync_w, b"1")
        for fd in (*keep_closed, sync_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        _reset_signals()
        _redirect(request["log"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({**env_set, **request["env"]})
        code = _run_worker(request["argv"])
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        from harness.cell.worker import exit_now

        exit_now(code)


def _reset_signals() -> None:
    """The dispositions a fresh interpreter has (the server's SIGCHLD wake-up is its own)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _redirect(log: str) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    for stream in (sys.stdout, sys.stderr):  # PYTHONUNBUFFERED, as the runner gives a spawned child
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(write_through=True)  # type: ignore[union-attr]


def _run_worker(argv: list[str]) -> int:
    """`python -m harness.cell.worker ARGV`: its argv, its start time (for fork_s), its main; an exception is a
    traceback and exit 1, SystemExit its code, as the interpreter makes them."""
    import torch

    from harness.cell import worker

    if torch.cuda._is_in_bad_fork():  # the server's check makes this unreachable; the child says so if not
        print("fork server: this child inherited a CUDA context; it cannot run a cell", file=sys.stderr)
        return CUDA_ABORT_CODE
    worker.MODULE_STARTED_AT = time.time()
    sys.argv = [str(worker.__file__), *argv]
    try:
        return worker.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1


# --------------------------------------------------------------------------------------------------- the server


class Server:
    """The request loop: forks on each request, reports each child's exit, exits at EOF on its request pipe."""

    def __init__(self, requests: int, replies: int) -> None:
        self.requests, self.replies = requests, replies
        self.env_set: dict[str, str] = {}  # what the preload set in the environment (preload()'s env_set)
        self.buffer = b""
        self.children: set[int] = set()
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)

    def reply(self, message: dict[str, Any]) -> None:
        os.write(self.replies, (json.dumps(message) + "\n").encode())  # one short line: atomic on a pipe

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wake-up fd
        signal.set_wakeup_fd(self.sig_w)
        while True:
            ready, _, _ = select.select([self.requests, self.sig_r], [], [])
            if self.sig_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.sig_r, 4096)
                self.reap()
            if self.requests in ready:
                data = os.read(self.requests, 65536)
                if not data:
                    return  # the runner closed the pipe or died: its children die with this process
                self.buffer += data
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    self.fork(json.loads(line))

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.reply({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})

    def fork(self, request: dict[str, Any]) -> None:
        try:
            refuse_cuda()
        except AssertionError as e:
            print(f"fork server: {e}", file=sys.stderr, flush=True)
            os._exit(CUDA_ABORT_CODE)
        sync_r, sync_w = os.pipe()
        server_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(sync_r)
            os.close(sync_w)
            self.reply({"refused": f"fork failed: {e}"})
            return
        if pid == 0:
            become_cell(request, sync_w, server_pid, [self.requests, self.replies, self.sig_r, self.sig_w, sync_r],
                        self.env_set)
        os.close(sync_w)
        os.read(sync_r, 1)  # the child's setsid is done (or it died: EOF); either way its pid may be killed now
        os.close(sync_r)
        self.children.add(pid)
        self.reply({"forked": pid})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.cell.forkserver", description=__doc__)
    parser.add_argument("--requests", type=int, required=True, help="fd to read requests from")
    parser.add_argument("--replies", type=int, required=True, help="fd to write replies to")
    parser.add_argument("--for", dest="run", help="the run folder it serves (shown by ps; not read)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner stops it (EOF); a terminal's Ctrl-C is the runner's
    server = Server(args.requests, args.replies)
    info = preload()
    server.env_set = info["env_set"]
    # What the preload made goes to the permanent generation: the children's collections never walk it (nor copy
    # its pages on write). Without it a forked tiny Flux cell's load phase took 0.7-0.9 s against 0.2-0.25 s with
    # it, on the shared 2-core CPU box (the same cell spawned: 0.14-0.37 s).
    gc.freeze()
    refuse_cuda()
    print(f"fork server ready: {json.dumps(info)}", file=sys.stderr, flush=True)
    server.reply({"ready": info})
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
