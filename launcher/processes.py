"""Entry points of the processes the launcher starts. Each names itself ``dyn-actor <role> <index>``,
reports READY or FAILED (with the reason) over a pipe, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import signal
import sys
import traceback
from dataclasses import asdict

from launcher.config import LaunchConfig


def name_process(title: str, die_with_parent: bool = True) -> None:
    """Show this process as ``title`` in ``ps`` and ``top``; with ``die_with_parent``, have the kernel
    send it SIGTERM when its parent exits (the launcher, or the launcher's fork server, which exits
    with the launcher)."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # still visible as the comm name
        pass
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME: shown by top
        if die_with_parent:
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def launched_processes(launcher_pid: int) -> dict[str, int]:
    """``role index`` -> pid of the processes a launcher started, by their titles: its children,
    and the children of its fork server (on the CPU the children start from there)."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                titles[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
    servers = {pid for pid, ppid in parents.items() if ppid == launcher_pid
               and titles.get(pid, "").startswith("dyn-actor fork server")}
    found = {}
    for pid, ppid in parents.items():
        m = re.match(r"dyn-actor (\w[\w-]*) (\d+)", titles.get(pid, ""))
        if m and (ppid == launcher_pid or ppid in servers):
            found[f"{m.group(1)} {m.group(2)}"] = pid
    return found


def _child_setup(title: str, log_level: str) -> None:
    name_process(title)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us with SIGTERM
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {title} %(levelname)s %(name)s: %(message)s")


async def read_pipe(conn, on_message) -> None:
    """The launcher's messages on this child's pipe while it serves, each to ``on_message`` (on the
    event loop; the pipe is read only when it has data). Ends when the launcher's end closes."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(conn.fileno(), readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            while conn.poll():
                try:
                    msg = conn.recv()
                except EOFError:
                    return
                on_message(msg)
    finally:
        loop.remove_reader(conn.fileno())


def _run(main) -> None:
    """Run the process's main coroutine, then exit at once (non-zero if it raised). A process whose
    work is over must not hang on the way out: tasks still pending (a stream nobody reads any more,
    a ref's reader) are not waited for, nor is ZeroMQ's teardown of sockets left open."""

    async def main_then_exit() -> None:
        code = 0
        try:
            await main()
        except BaseException:  # noqa: BLE001 - reported, and the exit code says so
            traceback.print_exc()
            code = 1
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    run(main_then_exit())


def _stop_on_sigterm(stop) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop)


def worker_main(index: int, cfg_dict: dict, endpoint: str, conn, role: str = "worker",
                queue_endpoint: str | None = None, gpu: int | None = None, gpu_share: float = 0.9,
                visible: list[int] | None = None) -> None:
    """An aggregated worker (role ``worker``), a decode worker or a prefill worker; on GPU ``gpu``
    with ``gpu_share`` of its memory, when given. It sees the cards ``visible`` (its own first;
    only its own when not given)."""
    if gpu is not None:  # before CUDA starts in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, visible or [gpu]))
    cfg = LaunchConfig(**cfg_dict)
    _child_setup(f"dyn-actor {role} {index}", cfg.log_level)
    if cfg.engine == "vllm":
        vllm_worker_main(index, cfg, endpoint, conn, role, gpu is not None, gpu_share, queue_endpoint)
        return
    from dyn_actor.actor import ActorServer
    from launcher.services import build_engine, worker_actor

    try:
        engine = build_engine(cfg, role, gpu, gpu_share)
    except Exception as e:
        conn.send(("failed", f"{role} {index}: {e}"))
        sys.exit(1)
    device = engine.device_name if gpu is None else f"GPU {gpu}, {engine.device_name}"

    async def main() -> None:
        actor = worker_actor(cfg, role, index, engine, endpoint, queue_endpoint)
        server = ActorServer(actor, endpoint)
        if role == "prefill":  # finish what was pulled first (the planner may be removing this worker)
            _stop_on_sigterm(lambda: asyncio.ensure_future(actor.drain(cfg.drain_timeout)))
        else:
            _stop_on_sigterm(server.stop)
        try:
            await server.serve(ready=lambda: conn.send(("ready", f"{role} {index} on {device}")))
        finally:
            engine.close()

    _run(main)


def vllm_worker_main(index: int, cfg: LaunchConfig, endpoint: str, conn, role: str, on_gpu: bool,
                     gpu_share: float, queue_endpoint: str | None = None) -> None:
    """``--engine vllm``: an aggregated, decode or prefill worker driving vLLM's AsyncLLM (its engine
    core runs in a process of vLLM's own, a child of this one; disaggregated workers load our KV
    connector into it)."""
    from dyn_actor.actor import ActorServer
    from dyn_actor.components.messages import WorkerInfo
    from dyn_actor.components.vllm_worker import (
        VllmPrefillWorker,
        VllmWorker,
        cpu_memory_share,
        engine_args,
        patch_vllm_version,
    )

    # vLLM's engine core and model runner are children of this process that do not die with it: in a
    # process group of ours, the launcher kills what is left of the group when this process is gone
    os.setpgid(0, 0)
    cores = sorted(os.sched_getaffinity(0))
    if not on_gpu and index > 0 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM binds its CPU threads to the first core by default: spread the other workers' cores
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[index % len(cores)])
    if cfg.kv_cache_memory_gb is not None:  # vLLM's CPU backend sizes its KV cache from this (GiB)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_memory_gb))))
    patch_vllm_version()

    async def main() -> None:
        name = f"{role}-{index}"
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            from dyn_actor.engine.loader import load_tokenizer
            from dyn_actor.engine.lora import parse_lora_modules

            loras = parse_lora_modules(cfg.lora_modules)
            util = gpu_share if on_gpu else cpu_memory_share(cfg.kv_cache_memory_gb or 1.0)
            # vLLM's KV events (its own sockets, next to ours) -> this worker -> ours, for the kv router
            ours = endpoint + "-kv" if endpoint.startswith("ipc://") and role != "prefill" else ""
            theirs = (endpoint + "-vllm-kv", endpoint + "-vllm-replay") if ours else None
            transfer = None
            if role in ("decode", "prefill"):
                from dyn_actor.components.vllm_connector import kv_transfer_config

                assert queue_endpoint is not None
                transfer = kv_transfer_config(role, {
                    "worker_name": name, "agent_endpoint": endpoint + "-kvc", "owner_endpoint": endpoint,
                    "log_level": cfg.log_level,
                    "owner_pid": os.getpid(), "queue_endpoint": queue_endpoint,
                    "max_local_prefill_length": cfg.max_local_prefill_length,
                    "max_prefill_queue_size": cfg.max_prefill_queue_size,
                    "remote_prefill_timeout": cfg.remote_prefill_timeout})
            llm = AsyncLLM.from_engine_args(engine_args(cfg.model, cfg.dtype, cfg.max_model_len, cfg.enforce_eager,
                                                        util, cfg.vllm_args, cfg.block_size, theirs, transfer,
                                                        cfg.reasoning_parser, cfg.speculative_config, loras,
                                                        cfg.max_lora_rank, cfg.runner, cfg.pooler_config,
                                                        cfg.hf_overrides, cfg.convert))
            mc = llm.model_config
            tok = load_tokenizer(cfg.model)
            eos = getattr(mc.hf_config, "eos_token_id", None)
            eos_ids = [*(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                       *([] if tok.eos_token_id is None else [tok.eos_token_id])]
            labels, sep = [], True
            if mc.runner_type == "pooling" and mc.score_type == "cross-encoder":  # a classifier, as vLLM reads it
                n = int(getattr(mc.hf_config, "num_labels", 0) or 1)
                names = getattr(mc.hf_config, "id2label", None) or {}
                labels = [str(names.get(i, names.get(str(i), f"LABEL_{i}"))) for i in range(n)]
                sep = bool(mc.use_sep_token)
            info = WorkerInfo(name, cfg.model, mc.max_model_len, mc.get_vocab_size(),
                              llm.vllm_config.cache_config.block_size, list(dict.fromkeys(eos_ids)), ours,
                              device=str(llm.vllm_config.device_config.device_type), lora_modules=loras,
                              runner=mc.runner_type, labels=labels, use_sep_token=sep)
        except Exception as e:  # noqa: BLE001 - any start-up failure is a one-line error in the launcher
            conn.send(("failed", f"{role} {index}: vLLM did not start: {type(e).__name__}: {e}"))
            return
        if role == "prefill":
            assert queue_endpoint is not None
            actor: VllmWorker = VllmPrefillWorker(name, llm, info, queue_endpoint, endpoint)
        else:
            from launcher.services import disagg_policy

            actor = VllmWorker(name, llm, info, theirs, disagg_policy(cfg) if role == "decode" else None)
        server = ActorServer(actor, endpoint)
        if isinstance(actor, VllmPrefillWorker):
            prefill = actor
            _stop_on_sigterm(lambda: asyncio.ensure_future(prefill.drain(cfg.drain_timeout)))
        else:
            _stop_on_sigterm(server.stop)
        await server.serve(ready=lambda: conn.send(("ready", f"{role} {index} on vLLM ({info.device})")))

    _run(main)


def frontend_entry(index: int, cd: dict, endpoints: dict[str, str], queue_ep: str | None, planner_eps: dict | None,
                   socks: list, metrics_dir: str | None, conn) -> None:
    frontend_main(cd, endpoints, conn, queue_ep, planner_eps, index, socks, metrics_dir)


def worker_entry(index: int, cd: dict, ep: str, role: str, queue_ep: str | None, gpu: int | None,
                 gpu_share: float, visible: list[int] | None, conn) -> None:
    """``worker_main`` with the pipe last, as the launcher's spawn helper passes it."""
    worker_main(index, cd, ep, conn, role, queue_ep, gpu, gpu_share, visible)


def queue_main(cfg_dict: dict, endpoint: str, conn) -> None:
    cfg = LaunchConfig(**cfg_dict)
    _child_setup("dyn-actor prefill-queue 0", cfg.log_level)
    from dyn_actor.actor import ActorServer
    from dyn_actor.components.prefill_queue import PrefillQueue, depth_endpoint

    async def main() -> None:
        server = ActorServer(PrefillQueue(depth_endpoint(endpoint)), endpoint)
        _stop_on_sigterm(server.stop)
        await server.serve(ready=lambda: conn.send(("ready", "prefill-queue 0")))

    _run(main)


def planner_endpoints_in(run_dir, frontends: int = 1) -> dict:
    """Where each frontend publishes its latency histograms and the planner its decisions."""
    from dyn_actor.transport import ipc_endpoint

    return {"frontend": [ipc_endpoint(run_dir, f"frontend-{i}-load") for i in range(frontends)],
            "report": ipc_endpoint(run_dir, "planner-0")}


def frontend_main(cfg_dict: dict, endpoints: dict[str, str], conn, queue_endpoint: str | None = None,
                  planner_endpoints: dict | None = None, index: int = 0, socks: list | None = None,
                  metrics_dir: str | None = None) -> None:
    """Frontend ``index``, serving on ``socks`` (bound by the launcher). With several frontends,
    ``metrics_dir`` is where they keep their metrics for one another's ``/metrics``."""
    cfg = LaunchConfig(**cfg_dict)
    _child_setup(f"dyn-actor frontend {index}", cfg.log_level)
    if metrics_dir is not None:  # before prometheus-client is imported: it picks its value store then
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from launcher.services import FrontendService

    async def main() -> None:
        stop = asyncio.Event()
        service = FrontendService(cfg, endpoints, queue_endpoint, planner_endpoints, notify=conn.send, index=index,
                                  socks=socks)
        starting = asyncio.ensure_future(service.start())

        def on_sigterm() -> None:  # the launcher's SIGTERM: drain, then stop; while starting, stop at once
            stop.set()
            starting.cancel()

        _stop_on_sigterm(on_sigterm)
        try:
            url = await starting
        except asyncio.CancelledError:  # the launcher gave up on the start (a worker failed)
            await service.stop()
            return
        except OSError as e:
            conn.send(("failed", f"frontend {index}: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}"))
            return
        except Exception as e:
            conn.send(("failed", f"frontend {index}: {e}"))
            return
        conn.send(("ready", url))
        control = asyncio.ensure_future(read_pipe(conn, service.on_launcher))
        await stop.wait()
        control.cancel()
        await service.stop()

    _run(main)


def planner_main(cfg_dict: dict, queue_endpoint: str | None, planner_endpoints: dict[str, str], budget: int,
                 endpoints: dict[str, str], num_prefill: int, pending_decode: int, pending_prefill: int,
                 conn) -> None:
    """The planner process: listens to the workers', the queue's and the frontend's publications,
    decides each tick, reports to the frontend; in active mode asks the launcher to carry it out.
    ``endpoints`` (the aggregated and decode workers', by name), ``num_prefill`` (prefill workers up),
    ``pending_decode`` and ``pending_prefill`` (workers asked for and not up yet): the workers as they
    are when it (re)starts; a ``("sync", endpoints, num_prefill, pending_decode, pending_prefill)`` down
    the pipe gives them as they are later, ``("prefill_up", name)`` says that an added prefill worker is
    up."""
    cfg = LaunchConfig(**cfg_dict)
    _child_setup("dyn-actor planner 0", cfg.log_level)
    from launcher.services import make_planner, planner_workers

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_sigterm(stop.set)
        act = (lambda d: conn.send(("scale", d.action, d.numbers))) if cfg.planner == "active" else None
        planner = make_planner(cfg, endpoints, queue_endpoint, planner_endpoints, num_prefill, budget, act,
                               pending_decode, pending_prefill)
        planner.start()
        conn.send(("ready", f"planner 0 ({cfg.planner})"))

        def on_launcher(msg) -> None:
            if msg[0] == "sync":  # all the workers as they are now: a restarted planner catches up
                planner.sync(planner_workers(msg[1]), msg[2], msg[3], msg[4])
            else:  # a worker added, up or removed
                planner.on_launcher(msg)

        control = asyncio.ensure_future(read_pipe(conn, on_launcher))
        await stop.wait()
        control.cancel()
        planner.stop()

    _run(main)


def config_dict(cfg: LaunchConfig) -> dict:
    return asdict(cfg)


def set_child_env() -> None:
    """Environment the spawned processes inherit: no tokenizer thread pool (it would fight torch's)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
