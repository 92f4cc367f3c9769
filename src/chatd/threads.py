"""The names ``top -H``, ``ps -L -o comm`` and ``/proc/PID/task/TID/comm``
show for chatd's processes and threads.

Every child of ``chatd serve`` is a Python started by ``multiprocessing``,
and every thread in it is "python3" to the kernel: an operator cannot tell
the log from a shard, nor a shard's event loop from its SQLite writer. So
each names itself: the children ``chatd-log``, ``chatd-shard-N``,
``chatd-api-N`` (the process's name is its main thread's), and the threads
``chatd-writer`` and ``chatd-reader`` (a store's connections) and
``chatd-checkpt``. ``chatd-bench`` splits the server's CPU by these
names.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

#: prctl's option to name the calling thread (linux/prctl.h)
PR_SET_NAME: Final = 15
#: the kernel keeps 15 bytes of a name (16 with the terminating NUL)
MAX_NAME_BYTES: Final = 15


def name_this_thread(name: str) -> bool:
    """Give the calling thread ``name`` (cut to 15 bytes) where the kernel
    keeps one (Linux); False where it could not be set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:MAX_NAME_BYTES]), 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return bool(done == 0)
