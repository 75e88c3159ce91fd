"""How this process allocates: at most two malloc arenas, set before any asset's thread starts.

glibc gives each thread that allocates under contention an arena of its own and keeps what was
freed in it for reuse. Assets run in threads (a landing, its reader, dlt's load workers), each
passing tens of MB through malloc, so the process kept a high-water mark per thread: a full sync
of 200k transcripts peaked at 622 MB with the default (8 per core) and 447 MB with two, in the
same time (bench/). An operator's MALLOC_ARENA_MAX (or glibc.malloc.arena_max tunable) wins; elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameter for the arena limit (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Ask glibc for at most ARENAS arenas; False where that is not possible or was set already."""
    if os.environ.get("MALLOC_ARENA_MAX") or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        # The process's own symbols: the C library it runs on (find_library would spawn ldconfig).
        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, ARENAS))
    except (OSError, AttributeError):  # not glibc: no mallopt, or no such parameter
        return False


limit_malloc_arenas()
