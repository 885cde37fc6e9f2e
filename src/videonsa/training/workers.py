"""Worker processes that end with the process that started them.

A `ProcessPoolExecutor` worker outlives its parent when the parent is killed (SIGKILL, or SIGTERM with no
handler): it is re-parented to init and stays until it finishes its queue, holding files and CPUs. Passing
`die_with_parent` as the pool's initializer asks the Linux kernel to send the worker SIGKILL when its parent
dies (``prctl(PR_SET_PDEATHSIG)``). Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Initializer for pool workers: be killed when the parent process dies (Linux; a no-op elsewhere).

    `parent_pid`: the pid of the process creating the pool (``os.getpid()`` there). If that process is already
    gone when the worker starts, the worker exits at once.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here (unusual sandboxes): the worker still works, it just may outlive its parent
    # The parent may have died between fork and prctl, in which case no signal will ever come. A worker whose
    # parent is not `parent_pid` was started through an intermediate (a forkserver), which the death signal
    # covers in turn since that one exits with the parent.
    if os.getppid() == 1 or not _alive(parent_pid):
        os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
