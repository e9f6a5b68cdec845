"""The benchmark harness runs end to end with tiny N and leaves nothing running.

This checks the harness, not performance: timings are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The harness's own dependencies come with the `bench` extra.
psutil = pytest.importorskip("psutil")
pytest.importorskip("celery")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_runs_every_row_with_tiny_n_and_cleans_up() -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "-n", "20", "--workers", "1", "--subscribers", "20",
            "--attachment-n", "20", "--lanes-backlog", "200",
            "--bulk", "200", "--micro-calls", "50", "--timeout", "60", "--stall", "15",
            "--lag-ms", "20", "--lag-n", "20", "--lag-subscribers", "20",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| (e) in-process limit" in done.stdout
    report_dir = done.stdout.strip().splitlines()[-1].split(": ", 1)[1].rstrip(")")
    report = json.loads((ROOT / report_dir / "report.json").read_text())
    rows = {row["key"]: row for row in report["rows"]}
    for key in ("e", "a", "b", "c1", "p", "f"):
        assert rows[key]["received"] == 20, rows[key]
        assert rows[key]["duplicates"] == 0
    lagged = {(row["key"], row["lag_ms"]): row for row in report["lag_rows"]}
    assert {lag for _key, lag in lagged} == {0, 20}
    for row in lagged.values():
        assert row["received"] == row["sent"] > 0, row
        assert row["duplicates"] == 0
    assert "SMTP replies delayed by a lag" in done.stdout
    assert report["micro"]["send_email_ms"] > 0
    assert report["micro"]["rq_many_per_s"] > 0  # the in-run baseline of send_many
    assert "RQ's enqueue_many of the same 200 jobs" in done.stdout
    assert report["pids"], "the report lists the processes the run started"
    assert not [pid for pid in report["pids"] if _running(pid)], "a bench process outlived the run"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
