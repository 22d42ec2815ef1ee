"""A child process that dies with its parent: the run's cells never outlive the runner (or the fork server).

Linux's PR_SET_PDEATHSIG sends the child SIGKILL when its parent dies, even when the parent is SIGKILLed; a
parent that died before the call took effect is caught by comparing getppid() with the pid it should be.
Elsewhere (no prctl) only that second check applies.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with(parent_pid: int) -> None:
    """In the child: SIGKILL when `parent_pid` dies; exit at once (code 1) if it already has."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
