"""What this machine can hold, asked before a number from the user or a file turns into an
allocation: a typo then fails in the first second with a message, not after minutes of swapping."""
from __future__ import annotations

import os


def available_memory() -> int:
    """Bytes of memory the kernel says are available now (Linux), else the physical total."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40
