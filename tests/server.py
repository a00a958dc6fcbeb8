"""Start a real topology for integration tests: with the launcher, as a user would (``Server``), or
its actors in this process (``InprocServer``) where the processes are not the point."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def segments_of(pids) -> list[str]:
    """The KV segments in /dev/shm created by the processes ``pids`` (their names carry the
    creator's pid): what a test checks is gone, whatever other tests running beside it (pytest -n)
    hold at the moment."""
    from dyn_actor.kv.segments import SHM_PREFIX, leftover_segments

    prefixes = tuple(f"{SHM_PREFIX}{pid}-" for pid in pids)
    return [n for n in leftover_segments() if n.startswith(prefixes)] if prefixes else []


def own_segments() -> list[str]:
    """The KV segments this (test) process created: those of in-process pools and topologies."""
    return segments_of([os.getpid()])


class Server:
    def __init__(self, *args: str, timeout: float = 120.0) -> None:
        # DYN_TEST_SERVER_FLAGS: flags added to every server a test starts, e.g. "--device cuda
        # --dtype float32" to run the fault matrix on a GPU (scripts/gpu_check.sh does)
        # the port: one the launcher picks and binds itself (a free port looked up here could be
        # taken by another test's server before the launcher binds it)
        self.args = ["--port", "0", *args, *os.environ.get("DYN_TEST_SERVER_FLAGS", "").split()]
        self.seen: set[int] = set()  # every process of this server that pids() has seen
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", *self.args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        # read the log as it comes: a long test must not fill the pipe and block the launcher
        self._log: list[str] = []
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("ready: "):
                break
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                raise RuntimeError(f"launcher exited ({self.proc.returncode}): {self.log()[-2000:]}")
        else:
            self.stop()
            raise RuntimeError("launcher did not become ready")
        self.url = line.split("ready: ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        self.base_url = self.url + "/v1"
        self.pids()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self._log.append(line)

    def log(self) -> str:
        """What the launcher and its processes logged so far."""
        return "".join(self._log)

    def pids(self) -> dict[str, int]:
        """Role -> pid of the processes this launcher started (by their process titles)."""
        from launcher.processes import launched_processes

        found = launched_processes(self.proc.pid)
        self.seen.update(found.values())
        return found

    def segments_left(self) -> list[str]:
        """The KV segments still in /dev/shm that this server's processes created (after ``stop``:
        what it leaked)."""
        return segments_of(self.seen)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.pids()  # those running now (restarted, added) are checked for leftovers too
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        self.proc.stdout.close()
        return self.proc.returncode, self.log()


class InprocServer:
    """The same topology as ``Server`` with the same flags, in this process: its actors on one event
    loop in a thread of their own (``launcher.inproc``), serving HTTP on a free port. For tests
    where a process start-up is not the point; the interface is ``Server``'s."""

    def __init__(self, *args: str, timeout: float = 120.0) -> None:
        from launcher.config import parse_args
        from launcher.inproc import InprocTopology

        self.args = ["--port", "0", *args]
        self.topology = InprocTopology(parse_args(self.args))
        self._log: list[str] = []
        self._handler = _ListHandler(self._log)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._handler)
        if logging.getLogger().level > logging.INFO:
            logging.getLogger().setLevel(logging.INFO)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="inproc-topology")
        self._thread.start()
        try:
            self.url = asyncio.run_coroutine_threadsafe(self.topology.start(), self._loop).result(timeout)
        except BaseException:
            self._close_loop()
            raise
        self.port = int(self.url.rsplit(":", 1)[1])
        self.base_url = self.url + "/v1"

    def log(self) -> str:
        return "".join(self._log)

    def pids(self) -> dict[str, int]:
        """As ``Server.pids``: "decode 0" -> pid for every actor still serving (all in this process;
        one whose mailbox closed, e.g. after its engine thread died, is missing)."""
        return {name.replace("-", " ", 1) if name != "prefill-queue" else "prefill-queue 0": os.getpid()
                for name, server in self.topology.servers.items() if not server.stopped}

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        """Drain and stop every actor; (0, the log) as ``Server.stop`` gives (exit code, log)."""
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.topology.stop(), self._loop).result(timeout)
        self._close_loop()
        return 0, self.log()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        logging.getLogger().removeHandler(self._handler)


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record) -> None:
        self.lines.append(self.format(record) + "\n")
