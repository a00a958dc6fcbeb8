"""Start a real topology with the launcher, as a user would, for integration tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, timeout: float = 120.0) -> None:
        self.port = free_port()
        # DYN_TEST_SERVER_FLAGS: flags added to every server a test starts, e.g. "--device cuda
        # --dtype float32" to run the fault matrix on a GPU (scripts/gpu_check.sh does)
        self.args = ["--port", str(self.port), *args, *os.environ.get("DYN_TEST_SERVER_FLAGS", "").split()]
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
        self.base_url = self.url + "/v1"

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self._log.append(line)

    def log(self) -> str:
        """What the launcher and its processes logged so far."""
        return "".join(self._log)

    def pids(self) -> dict[str, int]:
        """Role -> pid of the processes this launcher started (by their process titles)."""
        out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
        found = {}
        for line in out.splitlines()[1:]:
            pid, ppid, args = line.strip().split(None, 2)
            m = re.match(r"dyn-actor (\w[\w-]*) (\d+)", args)
            if m and int(ppid) == self.proc.pid:
                found[f"{m.group(1)} {m.group(2)}"] = int(pid)
        return found

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        self.proc.stdout.close()
        return self.proc.returncode, self.log()
