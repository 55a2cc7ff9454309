"""`make run`'s process supervisor: what an orchestrator does for a pod, on one machine.

A child that exits (crash, kill -9, OOM) is started again after a back-off that doubles from
`first_delay` up to `max_delay` seconds and starts over once a child has run for `stable_after`
seconds; every exit and restart is logged. One service dying is then a few seconds of 503s for the
calls that need it, not an outage of the node.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    delay: float = 0.0
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, first_delay: float = 0.5, max_delay: float = 30.0, stable_after: float = 60.0, out=None):
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self.out = out or sys.stderr
        self.children: dict[str, Child] = {}

    def start(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        child = Child(name, args, env, log_path)
        self.children[name] = child
        self._spawn(child)
        return child.process

    def _spawn(self, child: Child) -> None:
        log = child.log_path.open("ab")
        # A session of its own, as under an orchestrator: a Ctrl-C at the terminal reaches only `make run`, which
        # then stops every child with SIGTERM, newest first, while NATS and Postgres are still up for its drain.
        child.process = subprocess.Popen(
            child.args, env=child.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor
        child.started_at = time.monotonic()
        child.restart_at = None

    def processes(self) -> dict[str, subprocess.Popen]:
        return {name: child.process for name, child in self.children.items() if child.process is not None}

    def tick(self) -> None:
        """Notice exits and restart children whose back-off has passed; call this every fraction of a second."""
        now = time.monotonic()
        for child in self.children.values():
            if child.restart_at is None and child.process.poll() is not None:
                code = child.process.returncode
                child.exits.append(code)
                ran = now - child.started_at
                child.delay = (
                    self.first_delay
                    if ran >= self.stable_after or not child.delay
                    else min(child.delay * 2, self.max_delay)
                )
                child.restart_at = now + child.delay
                self._say(f"{child.name} exited with {code} after {ran:.1f}s; restarting in {child.delay:g}s "
                          f"(see {child.log_path})")  # fmt: skip
            elif child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                self._say(f"{child.name} restarted (restart #{child.restarts}, pid {child.process.pid})")

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM every child (newest first), then SIGKILL what has not exited after `timeout` seconds."""
        running = [c.process for c in reversed(list(self.children.values())) if c.process and c.process.poll() is None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _say(self, text: str) -> None:
        print(f"[supervisor] {text}", file=self.out, flush=True)
