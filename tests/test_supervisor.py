"""`make run`'s supervisor: a child that dies is restarted with exponential back-off, every exit logged."""

from __future__ import annotations

import io
import sys
import time

from devstack.supervisor import Supervisor


def test_a_crashing_child_is_restarted_with_doubling_back_off(tmp_path):
    out = io.StringIO()
    supervisor = Supervisor(first_delay=0.05, max_delay=0.2, stable_after=60, out=out)
    supervisor.start("crasher", [sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "crasher.log")
    child = supervisor.children["crasher"]
    delays = []
    deadline = time.monotonic() + 30
    while child.restarts < 4:
        assert time.monotonic() < deadline, out.getvalue()
        before = child.restart_at
        supervisor.tick()
        if child.restart_at is not None and before is None:
            delays.append(child.delay)
        time.sleep(0.01)
    supervisor.stop()
    assert delays[:4] == [0.05, 0.1, 0.2, 0.2]  # doubling, capped at max_delay
    assert child.exits[:4] == [3, 3, 3, 3]
    log = out.getvalue()
    assert "crasher exited with 3" in log and "crasher restarted (restart #4" in log


def test_stop_ends_every_child(tmp_path):
    supervisor = Supervisor(out=io.StringIO())
    sleeper = supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path / "s.log")
    supervisor.stop(timeout=5)
    assert sleeper.poll() is not None
