"""What each part of a topology runs, apart from being a process: a worker's engine and actor, the
frontend's parts (router, KV-event feed, worker refs, HTTP site), the planner.

The launcher's processes (``processes.py``) each run one of these under a pipe to the launcher;
an in-process topology (``inproc.py``) runs them all on one event loop, on ``inproc://``
endpoints. Both build them here, so they are the same objects either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from launcher.config import LaunchConfig

log = logging.getLogger("launcher.services")


def build_engine(cfg: LaunchConfig, role: str, gpu: int | None = None, gpu_share: float = 0.9):
    """The native engine of a worker (``role``: worker, decode or prefill); a decode worker's KV
    pool is shared (prefill workers write into it). On the GPU when ``gpu`` is given (the process
    sees only that card)."""
    from dyn_actor.engine.engine import EngineConfig, LLMEngine
    from dyn_actor.engine.lora import parse_lora_modules
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    kv = None if cfg.kv_cache_memory_gb is None else int(cfg.kv_cache_memory_gb * (1 << 30))
    return LLMEngine(EngineConfig(
        model=cfg.model, dtype=cfg.dtype, block_size=cfg.block_size, max_model_len=cfg.max_model_len,
        kv_cache_memory=kv, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, num_threads=cfg.torch_threads,
        prefill_threads=cfg.prefill_threads,
        shared_kv=role == "decode", device="cuda" if gpu is not None else "cpu",
        gpu_memory_utilization=gpu_share, cuda_graphs="off" if cfg.enforce_eager else "auto",
        async_scheduling=cfg.async_scheduling,
        # (a prefill worker computes prompts only: nothing to draft)
        speculative=SpeculativeConfig.parse(cfg.speculative_config) if role != "prefill" else None,
        lora_modules=parse_lora_modules(cfg.lora_modules) or None, max_lora_rank=cfg.max_lora_rank,
        runner=cfg.runner, pooler_config=cfg.pooler_config,
        hf_overrides=json.loads(cfg.hf_overrides) if cfg.hf_overrides else None, convert=cfg.convert))


def events_endpoint(role: str, endpoint: str) -> str | None:
    """Where an aggregated or decode worker publishes its KV events and load reports: next to its
    own mailbox (``ipc://.../decode-0.sock-kv``, ``inproc://.../decode-0-kv``)."""
    if role in ("worker", "decode") and endpoint.startswith(("ipc://", "inproc://")):
        return endpoint + "-kv"
    return None


def disagg_policy(cfg: LaunchConfig):
    """A decode worker's local/remote prefill policy, from the launch flags (either engine)."""
    from dyn_actor.components.disagg import DisaggPolicy

    return DisaggPolicy(cfg.max_local_prefill_length, cfg.max_prefill_queue_size, cfg.remote_prefill_timeout)


def worker_actor(cfg: LaunchConfig, role: str, index: int, engine, endpoint: str, queue_endpoint: str | None):
    """The actor of a native worker of ``role`` around ``engine``."""
    name = f"{role}-{index}"
    if role == "decode":
        from dyn_actor.components.decode_worker import DecodeWorker

        return DecodeWorker(name, engine, endpoint, queue_endpoint or "", disagg_policy(cfg),
                            events_endpoint=events_endpoint(role, endpoint))
    if role == "prefill":
        from dyn_actor.components.prefill_worker import PrefillWorker

        return PrefillWorker(name, engine, queue_endpoint or "", endpoint)
    from dyn_actor.components.worker import Worker

    return Worker(name, engine, events_endpoint(role, endpoint))


def planner_budget(cfg: LaunchConfig, n_prefill: int, n_decode: int, gpus: int) -> int:
    """--max-workers, else one engine process per GPU (at least as launched), else as launched."""
    return cfg.max_workers or max(n_prefill + n_decode, gpus)


def planner_workers(endpoints: dict[str, str]) -> dict[str, str]:
    """What the planner follows of the workers (by name: aggregated and decode ones): where each
    publishes its load reports."""
    return {name: events_endpoint("decode" if name.startswith("decode") else "worker", ep) or ep
            for name, ep in endpoints.items()}


def make_planner(cfg: LaunchConfig, endpoints: dict[str, str], queue_endpoint: str | None,
                 planner_endpoints: dict, num_prefill: int, budget: int,
                 act: Callable | None = None, pending_decode: int = 0, pending_prefill: int = 0):
    """The planner: follows the workers' loads, the queue's depth and the frontends' histograms;
    ``act`` (active mode) carries a decision out."""
    from dyn_actor.components.planner_process import PlannerProcess
    from dyn_actor.components.prefill_queue import depth_endpoint
    from dyn_actor.planner import PlannerConfig

    pcfg = PlannerConfig(ttft_slo_ms=cfg.ttft_slo_ms, itl_slo_ms=cfg.itl_slo_ms, min_prefill=cfg.min_prefill,
                         min_decode=cfg.min_decode, max_workers=budget,
                         local_prefill_default=cfg.max_local_prefill_length,
                         cooldown_s=cfg.planner_cooldown, warmup_s=cfg.planner_warmup)
    return PlannerProcess(
        pcfg, interval=cfg.planner_interval,
        workers=planner_workers(endpoints),
        depth_endpoint=depth_endpoint(queue_endpoint) if queue_endpoint else None,
        frontend_endpoints=planner_endpoints["frontend"], report_endpoint=planner_endpoints["report"],
        num_prefill=num_prefill, pending_decode=pending_decode, pending_prefill=pending_prefill,
        log_path=cfg.planner_log, act=act)


class FrontendService:
    """The frontend and what it needs, started and stopped together: the tokenizer, the router with
    its KV-event feed, refs to the workers (and the prefill queue), the planner's view, the HTTP
    site, and the once-a-second stats poll. ``notify`` takes what the frontend tells the launcher
    (a decode worker drained: ``("retired", name, requests_left)``).

    With ``--frontends N`` there are N of these, one a process, each with its own router over the
    same KV events; each counts the load it routed itself, publishes its own latency histograms
    for the planner, and serves on sockets of the one port."""

    def __init__(self, cfg: LaunchConfig, endpoints: dict[str, str], queue_endpoint: str | None = None,
                 planner_endpoints: dict | None = None,
                 notify: Callable[[tuple], None] = lambda msg: None, index: int = 0, socks: list | None = None) -> None:
        self.cfg = cfg
        self.index = index  # which of the --frontends processes
        self.socks = socks  # listening sockets the launcher bound (None: bind cfg.host:cfg.port here)
        self.endpoints = endpoints
        self.queue_endpoint = queue_endpoint
        self.planner_endpoints = planner_endpoints
        self.notify = notify
        self.frontend = None
        self.router = None
        self.feed = None
        self.url = ""
        self._runner = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> str:
        """Connect to the workers and open the HTTP site; its URL. ``OSError`` when the port is taken."""
        from aiohttp import web

        from dyn_actor.components.frontend import Frontend
        from dyn_actor.components.http_edge import EdgePolicy, answer_parser_errors_in_json
        from dyn_actor.components.kv_events import KvEventFeed
        from dyn_actor.components.worker_client import connect_workers
        from dyn_actor.engine.loader import default_sampling, load_tokenizer
        from dyn_actor.router import Router

        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)
        if cfg.chat_template is not None:
            tokenizer.set_chat_template(cfg.chat_template)
        defaults = default_sampling(cfg.model, cfg.generation_config)
        if defaults:
            log.info("default sampling from the generation config: %s (--generation-config vllm: the server's own)",
                     ", ".join(f"{k}={v}" for k, v in defaults.items()))
        self.router = Router(cfg.router, block_size=cfg.block_size or 0, overlap_weight=cfg.kv_overlap_weight,
                             temperature=cfg.router_temperature, busy_threshold=cfg.router_busy_threshold)
        self.feed = KvEventFeed(self.router)
        self.feed.start()
        info = await connect_workers(self.endpoints, self.router, wait=cfg.ready_timeout, feed=self.feed)
        edge = EdgePolicy(cfg.host, cfg.api_key, cfg.metrics_require_key, frozenset(cfg.allowed_hosts),
                          cfg.max_request_bytes)
        self.frontend = frontend = Frontend(cfg.served_model_name or cfg.model, tokenizer, self.router, info, edge,
                                             defaults, cfg.reasoning_parser, cfg.tool_call_parser, cfg.chat_template)
        frontend.index = self.index
        frontend.on_policy = lambda fields: self.notify(("policy", fields))
        if self.queue_endpoint:
            from dyn_actor.actor import ActorRef

            frontend.prefill_queue = await ActorRef(self.queue_endpoint, "prefill-queue").start(wait_ready=60)
        if cfg.planner != "off" and self.planner_endpoints:
            # the planner reads our latency histograms; we show its decisions
            from dyn_actor.components.planner_process import PlannerView, publish_frontend_report

            # every frontend shows the decisions; one counts them (the processes' counters add up)
            frontend.planner = PlannerView(cfg.planner, self.planner_endpoints["report"],
                                           frontend.metrics.planner_decisions if self.index == 0 else None)
            frontend.planner.start()
            self._tasks.append(asyncio.ensure_future(
                publish_frontend_report(frontend.metrics, self.planner_endpoints["frontend"][self.index])))
        self._runner = web.AppRunner(frontend.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        answer_parser_errors_in_json(self._runner)
        if self.socks:
            from launcher.listen import BACKLOG

            for sock in self.socks:
                await web.SockSite(self._runner, sock, backlog=BACKLOG).start()
            port = self.socks[0].getsockname()[1]
        else:
            site = web.TCPSite(self._runner, cfg.host, cfg.port)
            await site.start()
            port = site._server.sockets[0].getsockname()[1] if cfg.port == 0 else cfg.port  # type: ignore[union-attr]
        self._tasks.append(asyncio.ensure_future(self._poll_stats()))
        self.url = f"http://{cfg.host}:{port}"
        return self.url

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.frontend.refresh_worker_stats()

    async def stop(self) -> None:
        """Drain (new requests get 503, those in flight get ``--drain-timeout``), then close it all."""
        if self.frontend is not None:
            await self.frontend.drain(self.cfg.drain_timeout)
        for t in self._tasks:
            t.cancel()
        if self.frontend is not None and self.frontend.planner is not None:
            self.frontend.planner.stop()
        if self.feed is not None:
            await self.feed.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ the launcher's requests
    def on_launcher(self, msg) -> None:
        if msg[0] == "set_threshold":
            asyncio.ensure_future(self.set_threshold(msg[1]))
        elif msg[0] == "add_worker":
            asyncio.ensure_future(self.add_worker(msg[1], msg[2]))
        elif msg[0] == "retire_worker":
            asyncio.ensure_future(self.retire_worker(msg[1], msg[2]))

    async def add_worker(self, name: str, endpoint: str) -> None:
        """A worker started while serving (the planner asked): route to it once it answers. One this
        frontend routes to already (told again after a restart) is left as it is."""
        from dyn_actor.components.worker_client import _connect_worker

        if name in self.router.workers:
            return
        try:
            await _connect_worker(name, endpoint, self.router, self.feed, 1.0, self.cfg.ready_timeout)
        except Exception as e:  # noqa: BLE001 - it is not routed to; the launcher's supervision sees it
            log.error("the added worker %s could not be joined: %s", name, e)
            return
        log.info("worker %s added: routing to it", name)

    async def retire_worker(self, name: str, deadline: float) -> None:
        """Route nothing new to ``name``, let what it holds finish (up to ``deadline`` s), then let
        it go and tell the launcher, which stops it; requests still running then end with an error."""
        entry = self.router.drain(name)
        left = 0
        if entry is not None:
            log.info("retiring worker %s: %d requests in flight", name, entry.in_flight)
            loop = asyncio.get_running_loop()
            end = loop.time() + deadline
            while entry.in_flight and loop.time() < end:
                await asyncio.sleep(0.1)
            left = entry.in_flight
            self.router.forget(name)
            self.feed.remove(name)
            await entry.handle.ref.close()
        self.notify(("retired", name, left))

    async def set_threshold(self, value: int) -> None:
        """The planner moves the conditional-disaggregation threshold: every decode worker takes it."""
        from dyn_actor.components.disagg_messages import DisaggPolicyState, SetDisaggPolicy

        for entry in self.router.live_workers():
            try:
                await entry.handle.ref.ask(SetDisaggPolicy(max_local_prefill_length=value), DisaggPolicyState,
                                           timeout=5)
            except Exception as e:  # noqa: BLE001 - the next tick sees what it has and decides again
                log.warning("setting %s's max_local_prefill_length failed: %s", entry.name, e)
        log.info("max_local_prefill_length is now %d on every decode worker", value)
