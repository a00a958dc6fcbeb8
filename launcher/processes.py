"""Entry points of the processes the launcher starts. Each names itself ``dyn-actor <role> <index>``,
reports READY or FAILED (with the reason) over a pipe, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from dataclasses import asdict

from launcher.config import LaunchConfig


def _child_setup(title: str, log_level: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # still visible as the comm name
        pass
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME: shown by top
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the launcher
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us with SIGTERM
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {title} %(levelname)s %(name)s: %(message)s")


def _run(main) -> None:
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def _stop_on_sigterm(stop) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop)


def worker_main(index: int, cfg_dict: dict, endpoint: str, conn) -> None:
    cfg = LaunchConfig(**cfg_dict)
    _child_setup(f"dyn-actor worker {index}", cfg.log_level)
    from dyn_actor.actor import ActorServer
    from dyn_actor.components.worker import Worker
    from dyn_actor.engine.engine import EngineConfig, LLMEngine

    try:
        engine = LLMEngine(EngineConfig(
            model=cfg.model, dtype=cfg.dtype, block_size=cfg.block_size, max_model_len=cfg.max_model_len,
            kv_cache_memory=int(cfg.kv_cache_memory_gb * (1 << 30)), max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, num_threads=cfg.torch_threads))
    except Exception as e:
        conn.send(("failed", f"worker {index}: {e}"))
        sys.exit(1)

    async def main() -> None:
        server = ActorServer(Worker(f"worker-{index}", engine), endpoint)
        _stop_on_sigterm(server.stop)
        await server.serve(ready=lambda: conn.send(("ready", f"worker {index}")))

    _run(main)


def frontend_main(cfg_dict: dict, endpoints: dict[str, str], conn) -> None:
    cfg = LaunchConfig(**cfg_dict)
    _child_setup("dyn-actor frontend 0", cfg.log_level)
    from aiohttp import web

    from dyn_actor.components.frontend import Frontend, connect_workers
    from dyn_actor.engine.loader import load_tokenizer
    from dyn_actor.router import Router

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_sigterm(stop.set)
        try:
            tokenizer = load_tokenizer(cfg.model)
            router = Router(cfg.router)
            info = await connect_workers(endpoints, router, wait=cfg.ready_timeout)
            frontend = Frontend(cfg.served_model_name or cfg.model, tokenizer, router, info, cfg.api_key)
            runner = web.AppRunner(frontend.app(), handler_cancellation=True, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, cfg.host, cfg.port)
            await site.start()
        except OSError as e:
            conn.send(("failed", f"frontend: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}"))
            return
        except Exception as e:
            conn.send(("failed", f"frontend: {e}"))
            return
        port = site._server.sockets[0].getsockname()[1] if cfg.port == 0 else cfg.port  # type: ignore[union-attr]
        conn.send(("ready", f"http://{cfg.host}:{port}"))

        async def poll_stats() -> None:
            while True:
                await asyncio.sleep(1.0)
                await frontend.refresh_worker_stats()

        poller = asyncio.ensure_future(poll_stats())
        await stop.wait()
        poller.cancel()
        await runner.cleanup()

    _run(main)


def config_dict(cfg: LaunchConfig) -> dict:
    return asdict(cfg)


def set_single_thread_env() -> None:
    """Each worker process gets the machine's threads unless told otherwise (torch picks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
