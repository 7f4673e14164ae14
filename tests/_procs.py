"""Run ``tremus`` commands as real OS processes and read their JSON-line events."""

from __future__ import annotations

import socket

from tremus.testing.procs import TremusProcess, start_tremus

__all__ = ["TremusProcess", "free_port", "start_tremus"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
