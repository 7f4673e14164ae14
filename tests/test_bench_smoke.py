"""Every benchmark runs and prints one valid JSON object with the expected keys.

Not a performance test (figures are never asserted): it only keeps ``bench/`` from
rotting. Each script runs in its smallest form — ``--quick``, or the hidden
``--smoke`` (one tiny row) where ``--quick`` takes more than a few seconds — so the
whole file stays well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tremus import accel
from tremus.testing.topology import require_root

REPO = Path(__file__).resolve().parent.parent
HAS_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)

# (script, arguments, needs KVM, keys every result row has)
BENCHES = [
    ("copyloop", ["--quick"], False,
     {"dirty_pages", "gather_gbps", "memcpy_gbps", "ratio_to_memcpy"}),
    ("pause", ["--smoke"], True,
     {"method", "dirty_pages", "pause_us", "pause_us_p90", "kick_us", "capture_us"}),
    ("throughput", ["--smoke"], False,
     {"codec", "topology", "dirty_pages", "bytes_sent", "gbps", "socket_gbps",
      "ratio_to_socket"}),
    ("engine_pause", ["--smoke"], True,
     {"mode", "working_set_pages", "dirty_pages", "pause_us", "pause_us_p90", "kick_us",
      "guest_pause_us"}),
    ("compression", ["--smoke"], True,
     {"pattern", "working_set_pages", "raw_bytes", "bytes_sent", "ratio"}),
    ("disk", ["--smoke"], True,
     {"mode", "io_size", "interval_ms", "writes_per_s", "mb_per_s", "guest_bound",
      "ratio_to_unprotected"}),
    ("latency", ["--smoke"], True,
     {"netbuf", "interval_ms", "requests", "rtt_ms_median", "rtt_ms_p90", "rtt_ms_p99",
      "ratio_to_unprotected"}),
]


@pytest.mark.parametrize(("name", "args", "needs_kvm", "keys"), BENCHES,
                         ids=[b[0] for b in BENCHES])
def test_bench_prints_one_json_object(name: str, args: list[str], needs_kvm: bool,
                                      keys: set[str], tmp_path: Path) -> None:
    if accel.native is None:
        pytest.skip("the native helper is not built")
    if needs_kvm and not HAS_KVM:
        pytest.skip("needs /dev/kvm")
    if name == "latency" and (why_not := require_root()) is not None:
        pytest.skip(why_not)  # network namespaces
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), *args],
        capture_output=True, text=True, timeout=180, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert doc["bench"] == name
    assert {"cpu_model", "cores", "kernel", "python", "date"} <= set(doc["machine"])
    assert doc["results"], "no result rows"
    for row in doc["results"]:
        assert keys <= set(row), sorted(keys - set(row))
    if name == "throughput":
        assert {"one_process", "two_processes"} == {r["topology"] for r in doc["results"]}
        assert {"raw", "delta"} == {r["codec"] for r in doc["results"]}
        assert "stages" in doc
    if name == "disk":
        assert {"fdatasync", "sequential_write"} <= set(doc["limit"])
        replicated = [r for r in doc["results"] if r["mode"] == "replicated"]
        assert replicated
        assert {"durable_us", "durable_us_p99", "ratio_to_fdatasync", "round_trip_ms",
                "commit_delay_ms"} <= set(replicated[0])
    if name == "latency":
        triggered = [r for r in doc["results"] if r.get("output_triggered")]
        assert triggered and {"ack_rtt_ms", "pause_us", "to_send_ms"} <= set(triggered[0])
        assert doc["cost"], "no cost rows"
        assert {"mode", "offered_rps", "sent_rps", "replied_rps", "checkpoints_per_s",
                "cpu_cores", "rtt_ms_median"} <= set(doc["cost"][0])
        # The plot, from the JSON (skipped with a note without matplotlib).
        (tmp_path / "latency.json").write_text(proc.stdout)
        png = tmp_path / "latency.png"
        plotted = subprocess.run(
            [sys.executable, str(REPO / "bench" / "latency.py"), "--plot",
             str(tmp_path / "latency.json"), "--png", str(png)],
            capture_output=True, text=True, timeout=45, cwd=REPO, check=False)
        assert plotted.returncode == 0, plotted.stderr[-3000:]
        assert png.exists() or "matplotlib is not installed" in plotted.stderr
    if name == "compression":
        assert {"miss", "delta", "same"} == {r["case"] for r in doc["codec_speed"]}
