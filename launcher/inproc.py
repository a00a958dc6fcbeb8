"""A whole topology in one process, on one event loop: the launcher's actors without its processes.

``InprocTopology(cfg)`` builds what the launcher's processes run (``services.py``): the prefill
queue, the aggregated, decode and prefill workers with their engines, the frontend with its HTTP
site, and the planner (observe mode), each actor on an ``inproc://`` endpoint of its own. The
messages are the same ``msgspec`` structs over the same ZeroMQ sockets; the KV pools are the same
shared-memory segments. Only the processes, their pipes and their supervision are missing. So
tests of routing, disaggregation, bad input and HTTP contracts run without a process start-up
(and a debugger or a profiler sees every actor at once); tests of what happens to a process
(kills, stalls, restarts, signals, placement) start the launcher.

    topo = InprocTopology(parse_args(["--topology", "1p1d", "--port", "0"]))
    url = await topo.start()
    ...
    await topo.stop()

CPU only (CUDA IPC cannot open a handle in the process that exported it); ``--planner active``
needs the launcher to carry its decisions out and is refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from launcher.config import ConfigError, LaunchConfig, topology_counts, with_default_threads
from launcher.services import FrontendService, build_engine, make_planner, planner_budget, worker_actor

log = logging.getLogger("launcher.inproc")
_ids = itertools.count()


class InprocTopology:
    def __init__(self, cfg: LaunchConfig) -> None:
        if cfg.device == "cuda" or cfg.gpus:
            raise ConfigError("an in-process topology runs on the CPU (--device cpu)")
        if cfg.planner == "active":
            raise ConfigError("--planner active needs the launcher's processes; in-process: off or observe")
        if cfg.engine != "native":
            raise ConfigError("an in-process topology runs the native engine")
        self.n_agg, self.n_prefill, self.n_decode = topology_counts(cfg.topology, cfg.workers)
        # the engines share this process's threads as the launcher's processes share the cores
        self.cfg = cfg = with_default_threads(cfg, self.n_agg + self.n_prefill + self.n_decode, False)
        self.prefix = f"inproc://dyn-actor-{os.getpid()}-{next(_ids)}"
        self.servers: dict[str, object] = {}  # "decode-0" -> its ActorServer
        self.engines: dict[str, object] = {}
        self.frontend: FrontendService | None = None
        self.planner = None
        self.url = ""
        self._tasks: list[asyncio.Task] = []

    def endpoint(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    async def _serve(self, name: str, actor) -> None:
        """Open ``actor``'s mailbox at its endpoint; return once it is serving."""
        from dyn_actor.actor import ActorServer

        server = ActorServer(actor, self.endpoint(name))
        ready = asyncio.Event()
        task = asyncio.ensure_future(server.serve(ready=ready.set))
        self.servers[name], self._tasks = server, [*self._tasks, task]
        ready_wait = asyncio.ensure_future(ready.wait())
        await asyncio.wait({ready_wait, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready_wait.cancel()
            task.result()  # raises what stopped it
            raise RuntimeError(f"{name} stopped while starting")

    async def start(self) -> str:
        """Start every part in the launcher's order; the frontend's URL."""
        from dyn_actor.components.prefill_queue import PrefillQueue, depth_endpoint

        cfg = self.cfg
        try:
            queue_ep = None
            if self.n_prefill:
                queue_ep = self.endpoint("prefill-queue")
                await self._serve("prefill-queue", PrefillQueue(depth_endpoint(queue_ep)))
            endpoints = {}
            for role, count in (("worker", self.n_agg), ("decode", self.n_decode), ("prefill", self.n_prefill)):
                for i in range(count):
                    name = f"{role}-{i}"
                    engine = self.engines[name] = build_engine(cfg, role)
                    await self._serve(name, worker_actor(cfg, role, i, engine, self.endpoint(name), queue_ep))
                    if role != "prefill":
                        endpoints[name] = self.endpoint(name)
            planner_eps = {"frontend": [self.endpoint("frontend-0-load")], "report": self.endpoint("planner-0")}
            self.frontend = FrontendService(cfg, endpoints, queue_ep, planner_eps)
            self.url = await self.frontend.start()
            if cfg.planner != "off":
                budget = planner_budget(cfg, self.n_prefill, self.n_decode, 0)
                self.planner = make_planner(cfg, endpoints, queue_ep, planner_eps, self.n_prefill, budget)
                self.planner.start()
        except BaseException:
            await self.stop()
            raise
        log.info("in-process topology %s ready: %s", cfg.topology, self.url)
        return self.url

    async def stop(self) -> None:
        """Stop in the launcher's order: the planner, the frontend (it drains), the workers, the
        queue; every engine closed (a decode worker's shared KV segment removed)."""
        if self.planner is not None:
            self.planner.stop()
            self.planner = None
        if self.frontend is not None:
            await self.frontend.stop()
            self.frontend = None
        queue = self.servers.pop("prefill-queue", None)
        for server in self.servers.values():  # the workers, then the queue
            server.stop()
        self.servers = {}
        await asyncio.gather(*self._tasks[1:] if queue is not None else self._tasks, return_exceptions=True)
        if queue is not None:
            queue.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for engine in self.engines.values():
            engine.close()
        self.engines = {}
