"""The fault-injection harness's own logic, without hosts or VMs: how it counts.

``tests/test_faults.py`` runs the real trials; these check that what it reports as a
lost write, a split brain or a crash is one, on made-up processes and replies.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tremus.testing.faults import (
    Trial,
    TrialResult,
    Writer,
    _crashes,
    _Run,
    _split_brain,
    summarize,
)
from tremus.testing.procs import TremusProcess


def proc(name: str, *, rc: int | None = None, events: list[dict[str, Any]] = (),
         stderr: str = "", pid: int = 4242) -> TremusProcess:
    p = TremusProcess(SimpleNamespace(returncode=rc, pid=pid), name, True)  # type: ignore[arg-type]
    p.events = list(events)
    p.stderr = stderr.encode()
    return p


def a_run(tmp_path: Path, kind: str = "primary_kill", safety: str = "none") -> _Run:
    return _Run(Trial(kind, safety=safety), random.Random(0), tmp_path)


def test_trial_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="kind"):
        Trial("reboot")
    with pytest.raises(ValueError, match="safety"):
        Trial("primary_kill", safety="prayer")
    with pytest.raises(ValueError, match="netbuf"):
        Trial("primary_kill", netbuf="plug")


def test_lost_writes_are_last_acked_values_not_read_back() -> None:
    writer = Writer(None, max_keys=3)  # type: ignore[arg-type]
    writer.acked = {"key0": "value3-x", "key1": "value1-x", "key2": "value2-x"}
    writer.in_flight = ("key1", "value4-x")  # sent, never acknowledged
    reads: dict[str, str | None] = {
        "key0": "VAL key0 value0-x",   # an older value: the acknowledged one was lost
        "key1": "VAL key1 value4-x",   # the in-flight write landed: fine
        "key2": None,                  # nobody answered: lost to the client
    }
    assert writer.lost(reads) == [("key0", "value3-x", "VAL key0 value0-x"),
                                  ("key2", "value2-x", None)]
    reads["key1"] = "NONE key1"
    assert ("key1", "value1-x", "NONE key1") in writer.lost(reads)


def test_client_downtime_is_the_longest_gap_around_the_fault() -> None:
    writer = Writer(None)  # type: ignore[arg-type]
    writer.ok_times = [1.0, 1.1, 1.2, 2.7, 2.8, 3.5]
    assert writer.longest_gap_ms(1.25) == 1500.0
    assert writer.longest_gap_ms(3.6) is None
    assert writer.oks_after(1.25) == 3


def test_what_is_a_crash(tmp_path: Path) -> None:
    run = a_run(tmp_path, safety="fence")
    run.backup = proc("backup", rc=1, events=[{"event": "failover_refused", "time": 1}])
    run.primary = proc("primary", rc=-signal.SIGKILL)
    killed = proc("primary", rc=-signal.SIGKILL)
    run.killed.append(killed)
    usage = proc("backup", rc=2, stderr="usage: tremus [-h] ...\n"
                 "tremus: error: unrecognized arguments: --arbiter x\n")
    gave_up = proc("primary", rc=1, events=[{"event": "ownership_lost", "time": 1}],
                   stderr="tremus: error: ownership lost\n")
    # The primary died of SIGKILL that neither the trial nor a fence sent.
    assert len(_crashes(run, [run.backup, run.primary, killed, usage, gave_up])) == 1
    run.fence_marker.write_text("1.0 no word from the primary\n")
    assert _crashes(run, [run.backup, run.primary, killed, usage, gave_up]) == []

    traceback = proc("backup", stderr="Traceback (most recent call last):\n  boom\n")
    group = proc("primary", rc=0, stderr="  | ExceptionGroup: 2 sub-exceptions\n")
    segv = proc("backup", rc=-signal.SIGSEGV)
    exit1 = proc("primary", rc=1)
    refused_with_traceback = proc("backup", rc=1,
                                  events=[{"event": "failover_refused", "time": 1}],
                                  stderr="Traceback (most recent call last):\n")
    found = _crashes(run, [traceback, group, segv, exit1, refused_with_traceback])
    assert len(found) == 5, found
    assert "SIGSEGV" in found[2]


def test_what_is_split_brain(tmp_path: Path) -> None:
    run = a_run(tmp_path, kind="partition")
    complete = {"event": "failover_complete", "time": 10.0, "downtime_ms": 5}
    run.backup = proc("backup", events=[complete])
    # Released before the failover, then stopped its guest: fine.
    run.primary = proc("primary", events=[
        {"event": "output_released", "time": 9.9, "packets": 3},
        {"event": "output_released", "time": 10.5, "packets": 0},
        {"event": "domain_stopped", "time": 10.6}])
    assert _split_brain(run) == []
    # Released packets after the backup's failover_complete.
    run.primary.events.insert(1, {"event": "output_released", "time": 10.2, "packets": 2})
    assert len(_split_brain(run)) == 1
    # The old primary's frames on the wire after the failover (whoever let them out).
    run.primary.events.pop(1)
    run.primary_guest_frames = [9.0, 10.03]
    assert _split_brain(run) == []
    run.primary_guest_frames.append(10.4)
    assert "1 IPv4 frame(s) of the guest left" in _split_brain(run)[0]
    run.primary_guest_frames.clear()
    # Alive, guest not stopped, ownership not lost: two copies answering.
    run.primary = proc("primary", events=[{"event": "backup_lost", "time": 9.0}])
    assert "still runs the guest" in _split_brain(run)[0]
    run.primary.events.append({"event": "ownership_lost", "time": 9.5})
    assert _split_brain(run) == []
    # Dead old primary, or no failover: no split brain.
    run.primary = proc("primary", rc=-signal.SIGKILL)
    assert _split_brain(run) == []
    run.backup = proc("backup", events=[{"event": "failover_refused", "time": 10}])
    run.primary = proc("primary", events=[{"event": "backup_lost", "time": 9.0}])
    assert _split_brain(run) == []


def test_summary_rows_per_kind_and_safety() -> None:
    results = [
        TrialResult(Trial("primary_kill"), acked_writes=10, failover=True, failover_ms=20.0,
                    client_downtime_ms=300.0),
        TrialResult(Trial("primary_kill"), acked_writes=12, lost_writes=2, failover=True,
                    failover_ms=40.0, client_downtime_ms=500.0),
        TrialResult(Trial("primary_kill", safety="arbiter"), skipped="no etcd"),
    ]
    rows = {(r["kind"], r["safety"]): r for r in summarize(results)}
    none = rows[("primary_kill", "none")]
    assert none["trials"] == 2 and none["lost_writes"] == 2 and none["trials_with_loss"] == 1
    assert none["failover_ms_median"] == 30.0 and none["failover_ms_max"] == 40.0
    assert none["client_downtime_ms_max"] == 500.0 and none["ok"] == 1
    arbiter = rows[("primary_kill", "arbiter")]
    assert arbiter["trials"] == 0 and arbiter["skipped"] == 1 and arbiter["skip_reason"] == "no etcd"
    row = results[1].to_json()
    assert row["kind"] == "primary_kill" and row["ok"] is False and row["lost_writes"] == 2
