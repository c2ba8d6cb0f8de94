"""Chaos: busy workers SIGKILLed at random while a pool runs a few hundred
tasks (the suite's small run of ``bench/chaos.py``; ``make chaos`` is the big one).

The run happens in a fresh interpreter so that what it leaves behind (children,
zombies, fds) is measured in a process nothing else touched.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

CHAOS = pathlib.Path(__file__).resolve().parent.parent / "bench" / "chaos.py"


@pytest.mark.timeout(240)
def test_a_pool_whose_busy_workers_are_sigkilled_keeps_serving_and_leaves_nothing_behind():
    out = subprocess.run(
        [
            sys.executable,
            str(CHAOS),
            "--tasks",
            "400",
            "--kills",
            "30",
            "--workers",
            "3",
            "--pause",
            "0.002",
            "--stdlib-tasks",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    r = report["warden"]
    assert report["failed_checks"] == [], report
    assert r["kills"] == 30
    # Every kill hit a busy worker, so each cost at most one task, and the
    # rest of the tasks returned their own value.
    assert 0 < r["crashed"] <= 30
    assert r["values"] + r["crashed"] == 400
    assert r["wrong_values"] == 0
    assert r["pool_failure"] is None
    assert r["children_left"] == [] and r["fds_left"] == []
