"""``python -m launcher --topology agg --workers 2``: start, supervise and stop a serving topology.

Prints ``ready: http://HOST:PORT`` once every process is serving. Exits
non-zero with a one-line reason if any process fails to start.

Supervision: a worker, decode worker, prefill worker or the prefill queue that
exits unexpectedly has its shared-memory segments removed at once and is
restarted at the same endpoint (``--restart-policy always``, with a back-off
and a budget); its peers' refs reconnect to it the moment it answers, which it
does only once it is ready. A frontend that exits is restarted on the port
(sockets bound again), knowing the workers of the moment; the workers abort
the requests it had started, and the other frontends serve meanwhile. Only
when no frontend is left to serve does the launcher stop everything.

The launcher binds the HTTP port itself and hands it to the frontend processes
(``--frontends N``: each gets a socket of its own on the port; see ``listen.py``).

Ctrl-C or SIGTERM drains: the frontends take no new requests (503) and give
those in flight ``--drain-timeout`` seconds; then the processes stop in order
(frontend, decode and aggregated workers, prefill workers, queue) and the run
directory with its socket files is removed. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from multiprocessing.connection import wait

from launcher.config import (
    ConfigError,
    gpu_plan,
    parse_args,
    resolve_gpus,
    topology_counts,
    visible_devices,
    with_default_threads,
)
from launcher.listen import frontend_sockets, listen_sockets
from launcher.processes import (
    config_dict,
    frontend_entry,
    planner_endpoints_in,
    planner_main,
    queue_main,
    set_child_env,
    worker_entry,
)
from launcher.services import planner_budget

log = logging.getLogger("launcher")
GRACE_SECONDS = 5.0
# vLLM's own shutdown (``AsyncLLM.shutdown``) waits up to 5 s for its engine core, which waits for its
# model runner (about 3 s to exit on the CPU), then kills it: an --engine vllm worker gets that on top
VLLM_SHUTDOWN_SECONDS = 5.0
ENGINE_ROLES = ("worker", "decode", "prefill")
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds before a restart, doubling while restarts keep failing
HEALTHY_AFTER = 60.0  # a child up this long has its back-off reset
RESTART_BUDGET, RESTART_WINDOW = 10, 600.0  # at most this many restarts of one child per window
STOP_ORDER = ("planner", "frontend", "worker", "decode", "prefill", "prefill-queue")


# Imported once, by the fork server, before it forks each child on the CPU: torch and the worker's
# own modules take about 2 s to import here, and each child used to import them itself, all at the
# same start on two cores. Not the frontend's metrics: prometheus-client picks its value store
# (one process or several) when it is imported, in the frontend, after the frontend says which.
PRELOAD = ["torch", "zmq", "msgspec", "aiohttp.web", "dyn_actor.actor", "dyn_actor.engine.engine",
           "dyn_actor.components.worker", "dyn_actor.components.decode_worker",
           "dyn_actor.components.prefill_worker", "dyn_actor.components.prefill_queue", "launcher.processes",
           "launcher.fork_server"]


def process_context(gpus: bool):
    """How the children start. On the CPU from a fork server that has ``PRELOAD`` imported (a
    fork of a process with one thread that has run nothing: torch's thread pools start lazily, in
    the child). On GPUs by ``spawn``, a fresh interpreter each: nothing of CUDA can have been
    touched before a worker picks its card."""
    if gpus:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def catch_up(given: set[str], endpoints: dict[str, str], draining, drain_timeout: float) -> list[tuple]:
    """What to tell a frontend that was started with the decode workers ``given`` and is ready now,
    when the workers are ``endpoints`` and those of them in ``draining`` are being retired: route
    to a worker added meanwhile; drain one that has begun draining since; let go at once of one
    retired since."""
    out: list[tuple] = []
    for name in sorted(given | set(endpoints)):
        if name not in given:
            if name not in draining:
                out.append(("add_worker", name, endpoints[name]))
        elif name in draining:
            out.append(("retire_worker", name, drain_timeout))
        elif name not in endpoints:
            out.append(("retire_worker", name, 0.0))
    return out


def stop_fork_server() -> None:
    """Stop the fork server (it has nothing left to fork) and reap it here: left to exit with the
    launcher it would be an orphan, a zombie where the box's first process does not reap them (a
    container's). multiprocessing has no public call for it."""
    from multiprocessing import forkserver

    try:
        forkserver._forkserver._stop()
    except (AttributeError, OSError, ChildProcessError):
        pass


class Child:
    def __init__(self, role: str, index: int, target, args: tuple, ctx) -> None:
        self.role, self.index, self.target, self.args, self._ctx = role, index, target, args, ctx
        self.name = f"{role} {index}"
        self.proc: mp.Process
        self.conn = None
        self.ready = False
        self.detail = ""
        self.exited = False  # its exit was seen (and handled)
        self.started_at = 0.0
        self.restarts: list[float] = []  # times of restarts, for the budget
        self.backoff = BACKOFF_FIRST
        self.restart_at: float | None = None
        self.added = False  # started by the planner while serving
        self.retiring = False  # stopped on purpose (the planner removed it): not restarted
        self.on_up = None  # called once an added child is ready (announce it)
        self.was_up = False  # an added child has been ready (if it crashed while starting: once back)
        self.on_gone = None  # called once a retiring child has exited (a role move starts its successor)
        self.on_back = None  # called once a restarted child is ready again (a frontend catches up)
        # its arguments built afresh at each (re)start, with what to close once it holds them (a
        # frontend's listening sockets); None: ``args``
        self.make_args = None

    def spawn(self) -> None:
        args, hand_over = self.make_args() if self.make_args is not None else (self.args, ())
        parent, child = self._ctx.Pipe()  # both ways: READY up; while serving, announcements down
        self.proc = self._ctx.Process(target=self.target, args=(*args, child), name=f"dyn-actor {self.role} {self.index}")
        try:
            self.proc.start()
        finally:
            for obj in hand_over:  # the child has its own copies now (or never will)
                obj.close()
        child.close()
        self.conn, self.ready, self.exited, self.started_at = parent, False, False, time.monotonic()

    def poll_ready(self) -> tuple[str, str] | None:
        """('ready' | 'failed', detail) once the child reported; None while it is starting."""
        if self.conn is None or not self.conn.poll():
            return None
        try:
            return self.conn.recv()
        except EOFError:
            return "failed", f"{self.name} exited before it was ready"


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
            return f"{', '.join(c.name for c in pending)} did not start within {timeout:.0f}s"
        wait([c.conn for c in pending] + [c.proc.sentinel for c in pending], timeout=min(remaining, 0.2))
        for c in pending:
            got = c.poll_ready()
            if got is not None:
                status, detail = got
                if status == "failed":
                    return detail
                c.ready, c.detail = True, detail
                log.info("%s ready (%.1fs)", detail if " on " in detail else c.name, time.monotonic() - t0)
            elif not c.proc.is_alive():
                return f"{c.name} exited with code {c.proc.exitcode} before it was ready"
        pending = [c for c in children if not c.ready]
    return None


def _remove_segments(c: Child) -> None:
    """A process that was killed cannot remove its shared-memory KV pool, nor stop the processes it
    started (``--engine vllm`` workers lead a process group of their own): do it for it."""
    from dyn_actor.kv.segments import remove_segments_of

    try:
        os.killpg(c.proc.pid, signal.SIGKILL)  # the group's leader is gone: what is left are its orphans
        log.info("stopped the processes left by %s", c.name)
        time.sleep(0.1)
    except (ProcessLookupError, PermissionError):
        pass  # no such group: nothing was left
    for name in remove_segments_of(c.proc.pid):
        log.info("removed %s left by %s", name, c.name)


def _stop(children: list[Child], grace: float, force=lambda: False) -> None:
    alive = [c for c in children if c.proc.is_alive()]
    for c in alive:
        c.proc.terminate()
    deadline = time.monotonic() + grace
    while any(c.proc.is_alive() for c in alive) and time.monotonic() < deadline and not force():
        wait([c.proc.sentinel for c in alive if c.proc.is_alive()], timeout=0.2)
    for c in alive:
        if c.proc.is_alive():
            log.warning("%s did not stop in %.0fs; killing it", c.name, grace)
            c.proc.kill()
            c.proc.join(timeout=2)
    for c in children:
        _remove_segments(c)


def _shutdown(children: list[Child], drain_timeout: float, force, engine_grace: float = GRACE_SECONDS) -> None:
    """Stop in order: the frontends first (they drain), then those that serve them, the queue last.
    ``engine_grace``: how long an engine process may take to stop before it is killed."""
    for role in STOP_ORDER:
        group = [c for c in children if c.role == role and hasattr(c, "proc")]
        if not group:
            continue
        grace = (drain_timeout + GRACE_SECONDS if role == "frontend" else engine_grace if role in ENGINE_ROLES
                 else GRACE_SECONDS)
        _stop(group, grace, force)


class Supervisor:
    """Restarts children that exit unexpectedly, with a back-off and a budget."""

    def __init__(self, children: list[Child], policy: str, on_exit=lambda c: None) -> None:
        self.children = children
        self.policy = policy
        self.on_exit = on_exit  # called with a child that exited unexpectedly, before its restart is planned

    def tick(self) -> str | None:
        """Handle exits, due restarts and restarted children becoming ready. Returns a reason to
        stop everything, or None."""
        now = time.monotonic()
        for c in list(self.children):
            if c.retiring and not c.proc.is_alive():
                c.exited = True
                log.warning("%s stopped (removed by the planner; exit code %s)", c.name, c.proc.exitcode)
                _remove_segments(c)
                self.children.remove(c)
                if c.on_gone is not None:
                    c.on_gone()
            elif not c.exited and not c.proc.is_alive():
                c.exited = True
                log.error("%s exited unexpectedly (exit code %s)", c.name, c.proc.exitcode)
                _remove_segments(c)
                self.on_exit(c)
                self._plan_restart(c, now)
                if c.role == "frontend" and c.restart_at is None and not any(
                        f.role == "frontend" and not f.exited for f in self.children):
                    return f"{c.name} exited and no frontend is left"
            elif c.restart_at is not None and now >= c.restart_at:
                c.restart_at = None
                c.restarts.append(now)
                try:
                    c.spawn()
                except OSError as e:  # a frontend's port could not be bound again
                    log.error("%s could not restart: %s", c.name, e)
                    self._plan_restart(c, now)
                    continue
                log.warning("restarting %s (pid %d, restart %d)", c.name, c.proc.pid, len(c.restarts))
            elif not c.ready and not c.exited:
                got = c.poll_ready()
                if got is not None:
                    status, detail = got
                    if status == "ready" and c.added and not c.was_up:
                        c.ready = c.was_up = True
                        log.warning("%s is up (added by the planner; pid %d)", c.name, c.proc.pid)
                        if c.on_up is not None and not c.retiring:  # (one removed while starting is not announced)
                            c.on_up(c)
                    elif status == "ready":
                        c.ready = True
                        log.warning("%s is back (pid %d); %s", c.name, c.proc.pid,
                                    "serving again" if c.role == "frontend" else "its peers reconnect to it")
                        if c.on_back is not None:
                            c.on_back(c)
                    else:
                        log.error("%s failed to restart: %s", c.name, detail)
            elif c.ready and now - c.started_at > HEALTHY_AFTER:
                c.backoff = BACKOFF_FIRST
        return None

    def _plan_restart(self, c: Child, now: float) -> None:
        if self.policy != "always":
            log.error("%s is not restarted (--restart-policy %s)", c.name, self.policy)
            return
        c.restarts = [t for t in c.restarts if now - t < RESTART_WINDOW]
        if len(c.restarts) >= RESTART_BUDGET:
            log.error("%s exited %d times in %.0f s: not restarting it again", c.name, len(c.restarts), RESTART_WINDOW)
            return
        delay = c.backoff if now - c.started_at < HEALTHY_AFTER else BACKOFF_FIRST
        c.backoff = min(BACKOFF_MAX, delay * 2)
        c.restart_at = now + delay
        log.warning("%s restarts in %.0f s", c.name, delay)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        gpus = resolve_gpus(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s launcher %(levelname)s: %(message)s")
    set_child_env()
    from dyn_actor.components.http_edge import is_loopback
    from dyn_actor.transport import ipc_endpoint, make_run_dir

    if not is_loopback(cfg.host) and not cfg.api_key:
        print(f"warning: serving on {cfg.host}:{cfg.port} without --api-key: anyone who can reach this port can "
              "use the server", file=sys.stderr)

    signals = {"count": 0}

    def on_signal(signum, _frame) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("%s: draining (up to %.0f s; again to stop at once)", signal.Signals(signum).name,
                     cfg.drain_timeout)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    wake_r, wake_w = os.pipe()  # a signal wakes the supervision loop at once, not at its next tick
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping = lambda: signals["count"] > 0  # noqa: E731
    ctx = process_context(bool(gpus))
    try:  # the port first: a taken one is an error before anything starts
        socks = listen_sockets(cfg.host, cfg.port, cfg.frontends)
    except OSError as e:
        print(f"error: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    run_dir = make_run_dir()
    children: list[Child] = []
    code = 0
    try:
        n_agg, n_prefill, n_decode = topology_counts(cfg.topology, cfg.workers)
        if cfg.torch_threads is None:
            cfg = with_default_threads(cfg, n_agg + n_prefill + n_decode, bool(gpus))
            log.info("torch threads per engine process: %d, %s for a prefill step (--torch-threads to change)",
                     cfg.torch_threads, cfg.prefill_threads or cfg.torch_threads)
        cd = config_dict(cfg)
        endpoints = {}
        log.info("starting topology %s for %s; run directory %s", cfg.topology, cfg.model, run_dir)

        def spawn(role: str, index: int, target, args) -> Child:
            c = Child(role, index, target, args, ctx)
            if role == "decode":
                c.make_args = decode_args(args)
            c.spawn()
            children.append(c)
            return c

        # the decode workers' thresholds as changed while serving (POST /v1/disagg/policy, the planner): a
        # decode worker that starts later (restarted, or added by the planner) starts with them
        policy_now: dict = {}

        def decode_args(args: tuple):
            def make():
                return (args[0], {**cd, **policy_now}, *args[2:]), ()
            return make

        queue_ep = None
        if n_prefill:
            queue_ep = ipc_endpoint(run_dir, "prefill-queue")
            spawn("prefill-queue", 0, queue_main, (cd, queue_ep))
        engines = [(role, i) for role, count in (("worker", n_agg), ("decode", n_decode), ("prefill", n_prefill))
                   for i in range(count)]
        plan = gpu_plan([f"{r} {i}" for r, i in engines], gpus, cfg.gpu_memory_utilization)
        if gpus:
            log.info("GPUs %s: %s", ",".join(map(str, gpus)),
                     ", ".join(f"{name} on GPU {g} ({share:.2f} of it)" for name, (g, share) in plan.items()))
        for role, i in engines:
            ep = ipc_endpoint(run_dir, f"{role}-{i}")
            if role != "prefill":
                endpoints[f"{role}-{i}"] = ep
            gpu, share = plan.get(f"{role} {i}", (None, cfg.gpu_memory_utilization))
            visible = None if gpu is None else visible_devices(role, gpu, gpus)
            spawn(role, i, worker_entry, (i, cd, ep, role, queue_ep, gpu, share, visible))
        # the frontends start beside the workers (each waits for every worker to answer before it serves)
        planner_eps = planner_endpoints_in(run_dir, cfg.frontends)
        planner = None
        metrics_dir = None
        if cfg.frontends > 1:  # where the frontends keep their metrics, for one another's /metrics
            metrics_dir = os.path.join(run_dir, "metrics")
            os.mkdir(metrics_dir)
        port = socks[0][0].getsockname()[1]  # the one chosen, with --port 0
        first_socks = dict(enumerate(socks))
        draining: dict[str, set[int]] = {}  # a decode worker being retired -> the frontends yet to drain it
        left_on: dict[str, int] = {}  # ... and the requests they reported still running on it

        given: dict[int, set[str]] = {}  # frontend -> the workers it was started with

        def frontend_args(i: int):
            """Frontend i's arguments at each (re)start: sockets on the port (bound again for a
            restart), and the workers it should route to now (added ones in, retiring ones out)."""
            def make():
                group = first_socks.pop(i, None) or frontend_sockets(cfg.host, port, cfg.frontends)
                now = {name: ep for name, ep in endpoints.items() if name not in draining}
                given[i] = set(now)
                return (i, cd, now, queue_ep, planner_eps, group, metrics_dir), group
            return make

        def rejoin(f: Child) -> None:
            """A restarted frontend is ready: what changed in the workers while it was starting
            reaches it now (it was told nothing then)."""
            for msg in catch_up(given.get(f.index, set()), endpoints, draining, cfg.drain_timeout):
                if msg[0] == "retire_worker" and msg[1] in draining:
                    draining[msg[1]].add(f.index)  # the worker waits for this frontend too
                tell(f, msg)

        def workers_now() -> tuple[dict[str, str], int, int, int]:
            """The workers as the planner should follow them now (at its start, or restarted and
            catching up): the aggregated and decode ones serving (not those being retired), the
            prefill workers staying, and the decode and prefill workers added but not up yet."""
            serving = {n: ep for n, ep in endpoints.items() if n not in draining}

            def pending(c: Child) -> bool:
                return c.added and not c.was_up

            prefill = sum(1 for c in children if c.role == "prefill" and not c.retiring and not pending(c))
            pending_decode = sum(1 for c in children if c.role == "decode" and pending(c))
            pending_prefill = sum(1 for c in children if c.role == "prefill" and not c.retiring and pending(c))
            return serving, prefill, pending_decode, pending_prefill

        frontends = []
        for i in range(cfg.frontends):
            c = Child("frontend", i, frontend_entry, (), ctx)
            c.make_args = frontend_args(i)
            c.on_back = rejoin
            c.spawn()
            children.append(c)
            frontends.append(c)
        frontend = frontends[0]
        err = _wait_ready(children, cfg.ready_timeout, stopping)
        if err is None and cfg.planner != "off":
            budget = planner_budget(cfg, n_prefill, n_decode, len(gpus))
            planner = Child("planner", 0, planner_main, (), ctx)
            planner.make_args = lambda: ((cd, queue_ep, planner_eps, budget, *workers_now()), ())
            planner.on_back = lambda p: tell(p, ("sync", *workers_now()))
            planner.spawn()
            children.append(planner)
            err = _wait_ready(children, cfg.ready_timeout, stopping)
        if err is not None:
            if not stopping():
                print(f"error: {err}", file=sys.stderr)
                code = 1
            return code
        print(f"ready: {frontend.detail}", flush=True)

        def child_exited(c: Child) -> None:
            """A frontend died: its gauges of what it had in flight go, and a worker it was draining
            waits for it no more (what it routed there is gone with it)."""
            if c.role != "frontend":
                return
            if metrics_dir is not None:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(c.proc.pid, metrics_dir)
            for name in [n for n, waiting in draining.items() if c.index in waiting]:
                retired(name, c.index)  # as if it had reported: nothing of its own is left there

        supervisor = Supervisor(children, cfg.restart_policy, child_exited)

        def tell(child, msg) -> None:
            if child is not None and child.ready and not child.exited:
                try:
                    child.conn.send(msg)
                except OSError:
                    pass

        def announce(c: Child) -> None:
            """An added decode worker is ready: the frontends route to it, the planner follows its load."""
            ep = ipc_endpoint(run_dir, f"decode-{c.index}")
            endpoints[f"decode-{c.index}"] = ep  # a frontend that restarts routes to it too
            for f in frontends:
                tell(f, ("add_worker", f"decode-{c.index}", ep))
            tell(planner, ("add_worker", f"decode-{c.index}", ep + "-kv"))

        def add(role: str) -> None:
            """A prefill or decode worker more, with the next index (a decode one is announced when ready)."""
            i = max((c.index for c in children if c.role == role), default=-1) + 1
            gpu = gpus[i % len(gpus)] if gpus else None
            visible = None if gpu is None else visible_devices(role, gpu, gpus)
            c = spawn(role, i, worker_entry, (i, cd, ipc_endpoint(run_dir, f"{role}-{i}"), role, queue_ep, gpu,
                                              cfg.gpu_memory_utilization / 2, visible))
            c.added = True
            # a decode worker is announced when it is up; the planner counts either as warming up till then
            c.on_up = announce if role == "decode" else lambda c: tell(planner, ("prefill_up", c.name))
            log.warning("planner: adding %s %d (pid %d)", role, i, c.proc.pid)

        def retire(role: str, then: str | None = None) -> bool:
            """The newest worker of ``role`` goes (never the last one): a prefill worker at once (it
            finishes what it pulled, then exits), a decode worker once every frontend has drained it.
            ``then``: the role to start in its place once it is gone (a role move)."""
            live = [c for c in children if c.role == role and not c.retiring]
            if len(live) < 2:
                return False
            c = max(live, key=lambda c: c.index)
            c.retiring = True  # not restarted when it exits
            if then is not None:
                c.on_gone = lambda: add(then)
            if role == "decode":
                log.warning("planner: removing %s: the frontends drain it first", c.name)
                tell(planner, ("remove_worker", f"decode-{c.index}"))
                name = f"decode-{c.index}"
                draining[name] = {f.index for f in frontends if f.ready and not f.exited}
                left_on[name] = 0
                for f in frontends:
                    tell(f, ("retire_worker", name, cfg.drain_timeout))
                if not draining[name]:  # no frontend to drain it (they are restarting): it goes now
                    retired(name, None)
                return True
            log.warning("planner: removing %s: it finishes what it holds, then exits", c.name)
            try:
                os.kill(c.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return True

        def scale(action: str, numbers: dict) -> None:
            """The planner (active) asks, through its pipe: a worker more or less, or one moved to the
            other role (drained and stopped first, then started in the other role)."""
            if action in ("add_prefill", "add_decode"):
                add(action.removeprefix("add_"))
            elif action in ("remove_prefill", "remove_decode"):
                retire(action.removeprefix("remove_"))
            elif action == "prefill_to_decode":
                retire("prefill", then="decode")
            elif action == "decode_to_prefill":
                retire("decode", then="prefill")
            elif action in ("raise_local_prefill", "lower_local_prefill"):
                value = int(numbers["new_max_local_prefill_length"])
                log.warning("planner: %s to %d", action, value)
                policy_now["max_local_prefill_length"] = value
                # one frontend sets it on every decode worker
                tell(next((f for f in frontends if f.ready and not f.exited), None), ("set_threshold", value))
            else:
                log.warning("planner: %s is not carried out here", action)

        def retired(name: str, frontend_index: int | None, left: int = 0) -> None:
            """Frontend ``frontend_index`` has drained decode worker ``name`` (None: none is left to);
            once every frontend has, the worker stops."""
            waiting = draining.get(name)
            if waiting is None:
                return
            waiting.discard(frontend_index)  # type: ignore[arg-type]
            left_on[name] += left
            if waiting and frontend_index is not None:
                return  # another frontend still has requests on it
            del draining[name]
            endpoints.pop(name, None)
            left = left_on.pop(name)
            role, _, index = name.rpartition("-")
            for c in children:
                if c.role == role and str(c.index) == index and c.retiring and c.proc.is_alive():
                    log.warning("planner: %s drained (%d requests still running); stopping it", c.name, left)
                    try:
                        os.kill(c.proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass

        while not stopping():
            conns = [c.conn for c in children if not c.ready and c.conn is not None and not c.exited]
            planner_conn = [planner.conn] if planner is not None and planner.ready and not planner.exited else []
            frontend_conn = [f.conn for f in frontends if f.ready and not f.exited]
            wait([c.proc.sentinel for c in children if c.proc.is_alive()] + conns + [wake_r] + planner_conn
                 + frontend_conn, timeout=0.5)
            while planner_conn and planner.ready and not planner.exited and planner.conn.poll():
                try:
                    msg = planner.conn.recv()
                except EOFError:
                    break
                if isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "scale":
                    scale(msg[1], msg[2])
            for f in frontends:
                while f.ready and not f.exited and f.conn.poll():
                    try:
                        msg = f.conn.recv()
                    except EOFError:
                        break
                    if isinstance(msg, tuple) and msg[0] == "retired":  # drained there: once all have, it stops
                        retired(msg[1], f.index, msg[2])
                    elif isinstance(msg, tuple) and msg[0] == "policy":  # set on the decode workers there
                        policy_now.update(msg[1])
            reason = supervisor.tick()
            if reason is not None:
                print(f"error: {reason}; stopping", file=sys.stderr)
                code = 1
                break
        return code
    finally:
        _shutdown(children, cfg.drain_timeout, lambda: signals["count"] > 1,
                  GRACE_SECONDS + (VLLM_SHUTDOWN_SECONDS if cfg.engine == "vllm" else 0.0))
        stop_fork_server()
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
