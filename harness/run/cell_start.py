"""How the runner starts a cell's child: `spawn` (a fresh interpreter, `python -m harness.cell.worker`) or
`fork-server` (a child forked from a server that imported torch and the model classes once per run,
`harness.cell.forkserver`). OFFLOAD_BENCH_CELL_START picks one; fork-server is the default on Linux, spawn
elsewhere (the server needs fork and PR_SET_PDEATHSIG).

Why not `multiprocessing`'s 'forkserver' context (`set_forkserver_preload`): it reports exit codes and signals as
subprocess does, and a child can set its own session, log and environment, but its server, its resource tracker
and its children outlived a SIGKILLed parent here (every child it forks holds the write end of the pipe whose EOF
stops the server, so the server never stops while a cell runs, and the cell never gets a parent-death signal);
stopping it is a private method (`_stop`); its server is one per interpreter with one global preload list; each
child re-runs the parent's `__main__` module (`python -m harness.run.runner`: the runner) before its target; and
its server takes the parent's working folder and path, not the package's. What this module and the server add
is that: a pipe only the server holds, a stop, a server per run, the worker's own argv, and cwd = the package.

The parent side imports no torch: the server is another process, started with `python -m`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import REPO
from harness.common.contract import Backend
from harness.common.inputs import ENV

CELL_START_ENV = "OFFLOAD_BENCH_CELL_START"
FORK_SERVER, SPAWN = "fork-server", "spawn"
# The server's preload (torch and every model class) took 4-9 s on the shared 2-core CPU box; a first import on a
# cold GPU machine took up to 12 s per child. Ten minutes means it hangs, not that it is slow.
READY_TIMEOUT_S = 600.0
FORK_TIMEOUT_S = 60.0
# Variables whose change does not restart the server: pytest sets PYTEST_CURRENT_TEST around every test phase (a
# server per test otherwise), and nothing the server imports reads it. The child gets it, as every variable.
VOLATILE_ENV = ("PYTEST_CURRENT_TEST",)


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What the server's imports may have read: the environment but for VOLATILE_ENV."""
    return {k: v for k, v in environ.items() if k not in VOLATILE_ENV}


def default_method() -> str:
    return FORK_SERVER if sys.platform.startswith("linux") else SPAWN


def start_method(backend: str, environ: Mapping[str, str] | None = None) -> str:
    """How a cell of `backend` starts: OFFLOAD_BENCH_CELL_START (checked by harness.common.inputs) or the
    platform's default, except where the fork server cannot serve.

    The SGLang backend's cells (`sglang`, `sglang@X`) are spawned. Their child puts a release folder on sys.path
    and imports SGLang's layerwise manager (harness.engine.layerwise), whose import runs module-level code that
    reads and changes process-wide state (it turns cuDNN attention off for the whole process:
    docs/findings/sglang-import-disables-cudnn-attention.md, still being confirmed on the device) and decides its
    stand-ins by what is importable. A forked child would import it on top of every zoo model's classes that the
    server preloaded, where every SGLang record so far imported it in a fresh interpreter holding only its own
    model's; and those cells need CUDA (skipped on the CPU profile), so no CPU test can show the two starts give
    the same cell. Their cells run for minutes, the import is a small share of them.
    """
    env = os.environ if environ is None else environ
    raw = env.get(CELL_START_ENV, "")
    chosen = str(ENV[CELL_START_ENV].parse(raw)) if raw.strip() else default_method()
    if chosen == FORK_SERVER and (not sys.platform.startswith("linux") or Backend.of(backend) is Backend.SGLANG):
        return SPAWN
    return chosen


class ServerError(RuntimeError):
    """The fork server did not start or stopped answering: the runner spawns the cell instead, and warns."""


class ForkedChild:
    """A child of the fork server with what the runner uses of subprocess.Popen: pid, returncode, poll(), wait()."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, 0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"fork-server child {self.pid}", timeout or 0.0)
        return self.returncode


class ForkServer:
    """The runner's handle on one `python -m harness.cell.forkserver`: started at the first fork (and again when
    the runner's environment changed since, or the server died), stopped by `close()` or with the runner."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.log = run_dir / "fork-server.log"
        self.proc: subprocess.Popen | None = None
        self.requests = self.replies = -1
        self.buffer = b""
        self.exits: dict[int, int] = {}  # returncode by pid, as the server reported them
        self.pending: list[dict[str, Any]] = []  # the other replies, not yet taken
        self.env: dict[str, str] = {}
        self.info: dict[str, Any] = {}
        self.lost: str | None = None  # why the server went away under a running child (its log's end)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def ensure(self) -> float | None:
        """Starts the server unless it runs with today's environment; the seconds that took, None if it ran."""
        if self.proc is not None and self.proc.poll() is None and self.same_environment():
            return None
        self.close()
        t0 = time.monotonic()
        self._start()
        return time.monotonic() - t0

    def same_environment(self) -> bool:
        """Whether the runner's environment is the one the server started with, but for VOLATILE_ENV and what the
        server's own imports set (a runner that imported torch itself, as a test does, has TORCHINDUCTOR_CACHE_DIR)."""
        now, env_set = server_environment(os.environ), self.info.get("env_set") or {}
        return all(now.get(k) == self.env.get(k) or (k in env_set and now.get(k) == env_set[k])
                   for k in set(now) | set(self.env))

    def _start(self) -> None:
        req_r, self.requests = os.pipe()
        self.replies, rep_w = os.pipe()
        self.env, self.buffer, self.exits, self.pending = server_environment(os.environ), b"", {}, []
        self.lost = None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.cell.forkserver", "--requests", str(req_r), "--replies", str(rep_w),
                 "--for", str(self.run_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, pass_fds=(req_r, rep_w),
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a terminal's Ctrl-C is the runner's to handle, not the server's
            )
        os.close(req_r)
        os.close(rep_w)
        ready = self._next("ready", READY_TIMEOUT_S)
        self.info = ready["ready"]
        if self.info.get("cuda_initialized") is not False:
            raise self._failed(f"reported a CUDA context after its preload ({self.info})")

    def fork(self, argv: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> ForkedChild:
        """One child running `python -m harness.cell.worker ARGV` with `env`, in `cwd`, its output appended to `log`."""
        request = {"argv": argv, "env": dict(env), "cwd": str(cwd), "log": str(log)}
        try:
            os.write(self.requests, (json.dumps(request) + "\n").encode())
        except OSError as e:
            raise self._failed(f"took no request ({e})") from None
        answer = self._next("forked", FORK_TIMEOUT_S)
        return ForkedChild(self, int(answer["forked"]))

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """The child's exit code (minus the signal that killed it), waiting up to `timeout` s (None: no limit);
        None if it still runs. If the server is gone, its children died of their death signal: -SIGKILL."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self.exits:
            if self.replies < 0:  # stopped: its children died with it
                return -int(signal.SIGKILL)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                if not self._read(left) and left == 0.0:
                    return None
            except ServerError as e:
                self.lost = str(e)
                return self.exits.get(pid, -int(signal.SIGKILL))
        return self.exits.pop(pid)

    def _next(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next reply of `kind` (a refusal raises), keeping the exits that arrive meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.pending):
                if kind in message or "refused" in message:
                    del self.pending[i]
                    if "refused" in message:
                        raise self._failed(f"refused to fork: {message['refused']}")
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failed(f"gave no {kind!r} answer within {timeout:.0f} s")
            self._read(left)

    def _read(self, timeout: float | None) -> bool:
        """Reads what the server said within `timeout` s into exits / pending; False if it said nothing."""
        if self.replies < 0:
            raise ServerError("the fork server was stopped")
        ready, _, _ = select.select([self.replies], [], [], timeout)
        if not ready:
            return False
        data = os.read(self.replies, 65536)
        if not data:
            raise self._failed("exited")
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exited" in message:
                self.exits[int(message["exited"])] = int(message["returncode"])
            else:
                self.pending.append(message)
        return True

    def _failed(self, why: str) -> ServerError:
        """Stops what is left of the server; the error names why and the end of its log."""
        proc = self.proc
        self.close()  # reaps it (a live one exits at EOF on its requests, or is killed after 10 s)
        code = None if proc is None else proc.returncode
        tail = self.log.read_bytes()[-1500:].decode("utf-8", "replace") if self.log.exists() else ""
        return ServerError(f"the fork server {why}" + (f" (exit code {code})" if code is not None else "")
                           + (f"; the end of {self.log}:\n{tail}" if tail.strip() else ""))

    def close(self) -> None:
        """Stops the server: EOF on its request pipe (it exits; a child it still had dies of its death signal)."""
        for fd in (self.requests, self.replies):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.requests = self.replies = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
