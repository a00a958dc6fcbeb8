"""``python -m launcher --topology agg --workers 2``: start, supervise and stop a serving topology.

Prints ``ready: http://HOST:PORT`` once every process is serving. Exits
non-zero with a one-line reason if any process fails to start. Ctrl-C or
SIGTERM stops every process (SIGTERM, then SIGKILL after a grace period) and
removes the run directory with its socket files.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import signal
import sys
import time
from multiprocessing.connection import wait

from launcher.config import ConfigError, parse_args, topology_counts
from launcher.processes import config_dict, frontend_entry, queue_main, set_child_env, worker_entry

log = logging.getLogger("launcher")
GRACE_SECONDS = 5.0


class Child:
    def __init__(self, role: str, proc: mp.Process, conn) -> None:
        self.role, self.proc, self.conn = role, proc, conn
        self.ready = False
        self.reported_exit = False


def _wait_ready(children: list[Child], timeout: float, stopping) -> str | None:
    """Wait until every child is READY; return an error line, or None."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    pending = [c for c in children if not c.ready]
    while pending:
        if stopping():
            return "interrupted while starting"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return f"{', '.join(c.role for c in pending)} did not start within {timeout:.0f}s"
        ready_objs = wait([c.conn for c in pending] + [c.proc.sentinel for c in pending], timeout=min(remaining, 0.2))
        for c in pending:
            if c.conn in ready_objs or c.conn.poll():
                try:
                    status, detail = c.conn.recv()
                except EOFError:
                    status, detail = "failed", f"{c.role} exited before it was ready"
                if status == "failed":
                    return detail
                c.ready = True
                log.info("%s ready (%.1fs)", c.role, time.monotonic() - t0)
                c.detail = detail  # type: ignore[attr-defined]
            elif c.proc.sentinel in ready_objs and not c.proc.is_alive():
                return f"{c.role} exited with code {c.proc.exitcode} before it was ready"
        pending = [c for c in children if not c.ready]
    return None


def _shutdown(children: list[Child]) -> None:
    for c in children:
        if c.proc.is_alive():
            c.proc.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for c in children:
        c.proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for c in children:
        if c.proc.is_alive():
            log.warning("%s did not stop in %.0fs; killing it", c.role, GRACE_SECONDS)
            c.proc.kill()
            c.proc.join(timeout=2)
    # a worker that was killed cannot remove its shared-memory KV pool: do it for it
    from dyn_actor.kv.transfer import remove_segments_of

    for c in children:
        for name in remove_segments_of(c.proc.pid):
            log.info("removed %s left by %s", name, c.role)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s launcher %(levelname)s: %(message)s")
    set_child_env()
    from dyn_actor.transport import ipc_endpoint, make_run_dir

    stop_flag = {"stop": False}

    def on_signal(signum, _frame) -> None:
        stop_flag["stop"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ctx = mp.get_context("spawn")
    run_dir = make_run_dir()
    children: list[Child] = []
    code = 0
    try:
        cd = config_dict(cfg)
        endpoints = {}
        n_agg, n_prefill, n_decode = topology_counts(cfg.topology, cfg.workers)
        log.info("starting topology %s for %s; run directory %s", cfg.topology, cfg.model, run_dir)

        def spawn(role: str, index: int, target, args) -> None:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=target, args=(*args, child), name=f"dyn-actor {role} {index}")
            p.start()
            children.append(Child(f"{role} {index}", p, parent))

        queue_ep = None
        if n_prefill:
            queue_ep = ipc_endpoint(run_dir, "prefill-queue")
            spawn("prefill-queue", 0, queue_main, (cd, queue_ep))
        for role, count in (("worker", n_agg), ("decode", n_decode), ("prefill", n_prefill)):
            for i in range(count):
                ep = ipc_endpoint(run_dir, f"{role}-{i}")
                if role != "prefill":
                    endpoints[f"{role}-{i}"] = ep
                spawn(role, i, worker_entry, (i, cd, ep, role, queue_ep))
        err = _wait_ready(children, cfg.ready_timeout, lambda: stop_flag["stop"])
        if err is None:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=frontend_entry, args=(cd, endpoints, queue_ep, child), name="dyn-actor frontend 0")
            p.start()
            children.append(Child("frontend", p, parent))
            err = _wait_ready(children, cfg.ready_timeout, lambda: stop_flag["stop"])
        if err is not None:
            if not stop_flag["stop"]:
                print(f"error: {err}", file=sys.stderr)
                code = 1
            return code
        url = children[-1].detail  # type: ignore[attr-defined]
        print(f"ready: {url}", flush=True)
        frontend = children[-1]
        while not stop_flag["stop"]:
            wait([c.proc.sentinel for c in children if c.proc.is_alive()], timeout=0.5)
            for c in children:
                if not c.proc.is_alive() and not c.reported_exit:
                    c.reported_exit = True
                    log.error("%s exited unexpectedly (exit code %s)", c.role, c.proc.exitcode)
            if not frontend.proc.is_alive():
                print("error: the frontend exited; stopping", file=sys.stderr)
                code = 1
                break
        return code
    finally:
        _shutdown(children)
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
