"""Child processes die with the run that started them, whatever killed it (SIGKILL included).

Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`) asks the kernel to signal a process when its parent
ends. The children a run starts (the temporary Prefect server, torchrun) get it through `preexec_fn`, the training
ranks set it on themselves (torchrun starts them). Elsewhere (macOS) it is a no-op and children may outlive a
killed run.

The kernel ties the signal to the *thread* that forked the child, so children are started from the main thread
(or a thread that lives as long as they do).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: a forked child should not have to load a library before it can ask.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent ends (Linux). Call it in the child (as
    `preexec_fn`, or first thing in a process someone else started). If the parent is already gone, exit now."""
    if _libc is None:
        return
    parent = os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(128 + int(sig))


def signal_process_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (a child started with start_new_session=True); quietly
    nothing if it is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
