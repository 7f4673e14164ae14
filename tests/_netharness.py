"""A protected kv guest on a three-host namespace topology: see :mod:`tremus.testing.kvnet`.

Kept for the tests that import it from here; the harness itself lives in
``tremus/testing/kvnet.py`` so that the benchmarks and the fault-injection campaign
(``tremus/testing/faults.py``) share it.
"""

from __future__ import annotations

from tremus.testing.kvnet import (
    BACKUP_PORT,
    GUEST_MAC,
    KV_PORT,
    REPO,
    TAP,
    Exchange,
    KvNet,
    NsProcess,
    kv_net,
    kv_ready,
    run_in,
    start_in,
)

__all__ = [
    "BACKUP_PORT", "GUEST_MAC", "KV_PORT", "REPO", "TAP", "Exchange", "KvNet", "NsProcess",
    "kv_net", "kv_ready", "run_in", "start_in",
]
