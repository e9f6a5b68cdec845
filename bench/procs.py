"""Child processes of the harness: started in their own session, measured, always stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import psutil


class Child:
    """A subprocess tree (the process and whatever it forks) with CPU and peak-RSS readings."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name = name
        self._log: IO[bytes] = log.open("ab")
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches its children
        )
        self.pid = self.process.pid
        self._cpu_mark = 0.0

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> float:
        """CPU seconds (user + system) used so far by the live processes of the tree."""
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def mark_cpu(self) -> None:
        self._cpu_mark = self.cpu()

    def cpu_since_mark(self) -> float:
        return self.cpu() - self._cpu_mark

    def peak_rss(self) -> dict[int, int]:
        """Peak resident set (VmHWM, bytes) of every live process of the tree."""
        return self._tree_field("VmHWM")

    def rss(self) -> dict[int, int]:
        """Current resident set (VmRSS, bytes) of every live process of the tree."""
        return self._tree_field("VmRSS")

    def _tree_field(self, name: str) -> dict[int, int]:
        values: dict[int, int] = {}
        for proc in self.tree():
            value = status_field(proc.pid, name)
            if value is not None:
                values[proc.pid] = value
        return values

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group (a warm shutdown for rq/celery), then SIGKILL what is left."""
        if self.process.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        # Whatever the leader left behind in its group (forked children) goes too.
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._log.close()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def status_field(pid: int, name: str) -> int | None:
    """A `kB` field of /proc/<pid>/status, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_json(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> dict[str, Any]:
    """Run a driver to completion (bounded) and parse the JSON line it prints last."""
    try:
        done = subprocess.run(
            argv, env=env, cwd=cwd, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{argv[2:]} did not finish in {timeout:.0f} s") from err
    if done.returncode != 0:
        raise RuntimeError(f"{argv[2:]} failed:\n{done.stderr.decode()[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return report


class SinkClient:
    """The sink's control port (see bench/sink.py)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _ask(self, command: str) -> Any:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(command.encode() + b"\n")
            with sock.makefile("rb") as reply:
                return json.loads(reply.readline())

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._ask("STATS")
        return stats

    def dump(self) -> dict[str, list[float]]:
        dump: dict[str, list[float]] = self._ask("DUMP")
        return dump

    def seen(self, message_id: str) -> list[float] | None:
        """[when accepted (time.monotonic()), times] for one Message-ID, or None."""
        entry: list[float] | None = self._ask(f"SEEN {message_id}")
        return entry

    def reset(self) -> None:
        self._ask("RESET")

    def set_lag(self, ms: float) -> None:
        """Every reply from now on `ms` late (a provider a round trip away)."""
        self._ask(f"LAG {ms:g}")

    def set_chunking(self, on: bool) -> None:
        """Offer CHUNKING (BDAT) to connections greeted from now on, or stop offering it."""
        self._ask(f"CHUNKING {'on' if on else 'off'}")

    def wait_for(self, count: int, timeout: float, stall: float = 20.0) -> int:
        """Wait until the sink has `count` messages; give up at `timeout`, or after `stall`
        seconds without a new one. Returns the count reached."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            seen = int(self.stats()["messages"])
            now = time.monotonic()
            if seen >= count or now > deadline:
                return seen
            if seen != last:
                last, last_change = seen, now
            elif now - last_change > stall:
                return seen
            time.sleep(0.02)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
