"""Fault injection: under every fault a safe configuration loses no acknowledged write.

One trial per (fault, safety mode) that must be safe (``tremus/testing/faults.py``
does the work: hosts in namespaces, ``tremus backup`` and ``tremus protect`` of the kv
guest, a client writing through the fault, then every acknowledged key read back):

* with a fence (``backup --fence``, a power switch that SIGKILLs the old primary),
  every fault;
* with no fence and no arbiter, the faults that need neither: killed processes, a
  stalled backup (it must not take over once it wakes), a stalled primary (it must
  stop its guest once it wakes), and a stall that ends in a kill;
* with an arbiter (three etcd members), the faults only it can judge: a partition of
  the replication link, an isolated primary, a stopped primary.

Each asserts no lost write, no split brain, no crash, nothing the fault's kind
requires missing (``violations``), and that the trial ran to its end (``error``).
Each is a few seconds of writing; ``bench/faults.py`` runs the whole campaign.
"""

from __future__ import annotations

import pytest
import trio

from tests._microvm_util import needs_kvm
from tremus.testing.faults import Trial, run_trial, why_not

_why_not = why_not()
pytestmark = [needs_kvm, pytest.mark.slow,
              pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

CASES = [
    *[(kind, "fence") for kind in (
        "primary_kill", "backup_kill", "first_checkpoint_kill", "primary_stop", "backup_stop",
        "stall_then_kill", "partition", "isolate_primary")],
    *[(kind, "none") for kind in (
        "primary_kill", "backup_kill", "first_checkpoint_kill", "primary_stop", "backup_stop",
        "stall_then_kill")],
    *[(kind, "arbiter") for kind in ("partition", "isolate_primary", "primary_stop")],
]
#: Run with ``-m extended`` only: every fault and every safety mode is still in the
#: default run (the suite's time), and bench/faults.py runs them all, many times.
EXTENDED = {("backup_kill", "fence"), ("backup_stop", "none"), ("stall_then_kill", "none"),
            ("isolate_primary", "fence"), ("primary_stop", "arbiter")}


@pytest.mark.parametrize(("kind", "safety"), [
    pytest.param(k, s, marks=[pytest.mark.extended] if (k, s) in EXTENDED else [])
    for k, s in CASES], ids=[f"{k}-{s}" for k, s in CASES])
async def test_no_acknowledged_write_is_lost(kind: str, safety: str) -> None:
    # Shorter than bench/faults.py's trials (the suite's time): still ~20 checkpoints
    # of writes after the fault settled.
    trial = Trial(kind, safety=safety, seed=7, fault_window_s=0.5, write_after_s=1.0)
    reason = why_not(trial)
    if reason is not None:
        pytest.skip(reason)
    with trio.fail_after(trial.timeout_s + 60):  # run_trial bounds itself; a backstop
        result = await run_trial(trial)
    report = result.describe()
    assert result.skipped is None, report
    assert result.error is None, report
    assert result.crashes == 0, report
    assert not result.split_brain, report
    assert result.lost_writes == 0, report
    assert not result.violations, report
    assert result.ok, report
