"""Fault-injection campaign: acknowledged writes lost, split brain, crashes, downtime.

Every trial (``tremus/testing/faults.py``) builds fresh hosts in network namespaces
- ``client``, ``primary``, ``backup`` and, for the arbiter, ``etcd1..3`` - protects
the kv guest from ``primary`` to ``backup``, writes from the client without pause
(``SET key<i> value<i>``, each retried until its OK) and injects one fault at a
random moment:

``primary_kill``          SIGKILL the primary
``backup_kill``           SIGKILL the backup (the guest must run on, from the primary)
``first_checkpoint_kill`` SIGKILL the primary within its first (full, 64 MiB) checkpoint
``primary_stop``          SIGSTOP the primary past the heartbeat timeout, then SIGCONT
``backup_stop``           SIGSTOP the backup past the heartbeat timeout, then SIGCONT
``stall_then_kill``       stall the primary 300 ms, stall the backup, kill the primary,
                          resume the backup 0.1-0.8 s later
``partition``             cut the replication link (iptables, both ways), heal later
``isolate_primary``       cut the primary host from everyone (link down), heal later

under a safety mode: ``none`` (no fence, no arbiter: the documented unsafe
configuration - losses and split brain are expected for the faults a backup cannot
tell from a dead primary), ``fence`` (``backup --fence``: SIGKILL the primary's
process group, a power switch) or ``arbiter`` (``--arbiter etcd://...``, three etcd
members). Afterwards every acknowledged key is read back from whichever host runs
the guest.

Rows: one per trial (``summary: false``: the trial's parameters, ``ok``,
``acked_writes``, ``lost_writes``, ``split_brain``, ``crashes``, ``failover_ms``,
``client_downtime_ms``, ``violations``, ``error``, ``skipped``, ...) and one per
(kind, safety) (``summary: true``: ``trials``, ``lost_writes``, ``split_brain``,
``crashes``, ``failover_ms_median``/``_max``, ``client_downtime_ms_median``/``_max``).
Trials vary the interval (20-200 ms) and the output buffer (``vmm``, ``nfqueue``).
Needs root, ``/dev/kvm`` and iptables; arbiter trials need etcd.

    python bench/faults.py [--quick] [--trials N] [--repeat M] [--kinds K,...]
                           [--safety S,...] [--netbuf B,...] [--intervals MS,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import trio  # noqa: E402

from tremus.testing.faults import (  # noqa: E402
    KINDS,
    NETBUFS,
    SAFETIES,
    Trial,
    TrialResult,
    run_trial,
    summarize,
    why_not,
)

INTERVALS = (20, 50, 100, 200)
#: --quick: a handful of trials, well under a minute.
QUICK = (
    ("primary_kill", "none"), ("primary_kill", "fence"), ("backup_kill", "none"),
    ("first_checkpoint_kill", "none"), ("stall_then_kill", "fence"), ("backup_stop", "none"),
)


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(choices)}")
        return items
    return parse


def _intervals(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(not 1 <= v <= 10_000 for v in values):
        raise argparse.ArgumentTypeError("expected intervals in ms (1..10000), comma-separated")
    return values


def plan(args: argparse.Namespace) -> list[Trial]:
    """The trials of this run, in order."""
    netbufs: list[str] = args.netbuf or list(NETBUFS)
    intervals: list[float] = args.intervals or list(INTERVALS)
    if args.smoke:
        return [Trial("primary_kill", safety="none", seed=args.seed, write_after_s=1.0)]
    if args.quick:
        return [Trial(kind, safety=safety, seed=args.seed + i, write_after_s=1.0)
                for i, (kind, safety) in enumerate(QUICK)
                if kind in (args.kinds or KINDS) and safety in (args.safety or SAFETIES)]
    trials = []
    for kind in args.kinds or KINDS:
        for safety in args.safety or SAFETIES:
            count = args.trials if kind == "primary_kill" else args.repeat
            for i in range(count):
                # Every interval in turn, the output buffers alternating with a shift
                # every round: a few trials see each interval and each buffer, and
                # len(intervals) * len(netbufs) trials every combination.
                interval = intervals[i % len(intervals)]
                netbuf = netbufs[(i + i // len(intervals)) % len(netbufs)]
                trials.append(Trial(kind, interval_ms=interval, netbuf=netbuf, safety=safety,
                                    seed=args.seed + i))
    return trials


def _progress(n: int, total: int, result: TrialResult) -> None:
    if result.skipped:
        what = f"skipped ({result.skipped})"
    else:
        what = (f"{'ok' if result.ok else 'FAILED'}: acked {result.acked_writes}, "
                f"lost {result.lost_writes}, split brain {result.split_brain}, crashes "
                f"{result.crashes}, failover {result.failover_ms} ms, client downtime "
                f"{result.client_downtime_ms} ms ({result.duration_s:.1f} s)")
        if result.error:
            what += f"\n      error: {result.error.splitlines()[0][:300]}"
        for violation in result.violations:
            what += f"\n      violation: {violation}"
    _common.log(f"  [{n}/{total}] {result.trial.label}: {what}")


async def run(trials: list[Trial]) -> list[TrialResult]:
    results = []
    skipped: dict[str, TrialResult] = {}
    for n, trial in enumerate(trials, 1):
        # A reason to skip (no etcd, ...) holds for every trial of the same safety.
        if trial.safety in skipped:
            result = TrialResult(trial=trial, skipped=skipped[trial.safety].skipped)
        else:
            result = await run_trial(trial)
            if result.skipped:
                skipped[trial.safety] = result
        results.append(result)
        _progress(n, len(trials), result)
    return results


def main() -> int:
    parser = _common.arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, metavar="N",
                        help="primary_kill trials per safety mode (default 40)")
    parser.add_argument("--repeat", type=int, default=4, metavar="M",
                        help="trials of every other kind per safety mode (default 4)")
    parser.add_argument("--kinds", type=_csv(KINDS), metavar="K,...",
                        help=f"fault kinds (default all: {','.join(KINDS)})")
    parser.add_argument("--safety", type=_csv(SAFETIES), metavar="S,...",
                        help=f"safety modes (default all: {','.join(SAFETIES)})")
    parser.add_argument("--netbuf", type=_csv(NETBUFS), metavar="B,...",
                        help="output buffers to cycle through (default vmm,nfqueue)")
    parser.add_argument("--intervals", type=_intervals, metavar="MS,...",
                        help="checkpoint intervals to cycle through (default 20,50,100,200)")
    parser.add_argument("--seed", type=int, default=20261126, help="first trial's seed")
    args = parser.parse_args()
    why = why_not()
    if why is not None:
        _common.log(f"faults: {why}")
        return 1
    trials = plan(args)
    _common.log(f"faults: {len(trials)} trials")
    started = time.perf_counter()
    results = trio.run(run, trials)
    _common.log(f"done in {time.perf_counter() - started:.1f} s")
    rows = [{"summary": False, **r.to_json()} for r in results] + summarize(results)
    _common.emit("faults", rows, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
