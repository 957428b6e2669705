"""Hold many open descriptors, so that sockets opened next get numbers above 1023.

``select()`` cannot watch such descriptors; tests use this to show that fedge's
network loop (epoll) can.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def descriptors_above(count: int) -> Iterator[None]:
    """Hold ``count`` open descriptors so that new sockets get numbers above them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"the descriptor limit ({hard}) is below {wanted}: raise ulimit -n")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
