"""Free TCP ports on 127.0.0.1 for child servers started by `compare` (and by the tests).

The OS picks a free port (bind to port 0); for a block, the ports after it are bound one by
one to check they are free too, then all are released. A port is only "free a moment ago":
the caller binds it soon after, and a lost race shows up as a startup error of that child.
"""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_port_block"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just reported free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_block(count: int, attempts: int = 50) -> int:
    """A first port P such that P..P+count-1 on 127.0.0.1 were all free a moment ago."""
    if count < 1:
        raise ValueError("count must be at least 1")
    for _ in range(attempts):
        base = free_port()
        if base + count > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports found")
