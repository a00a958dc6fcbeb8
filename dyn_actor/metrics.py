"""The frontend's Prometheus metrics, on ``prometheus-client``: a registry of its own (never the
process-global one), counters, gauges and histograms with labels, rendered in the text format.

A thin layer keeps the call sites short (``counter.inc(n, *label_values)``) and the names exactly
as documented in the README; ``_created`` series are left out.

With several frontend processes (``--frontends N``) each keeps its values in files in the folder
``$PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, chosen when that variable is
set before prometheus-client is imported), and ``/metrics`` on any of them renders all of them
together: counters and histograms add up, ``livesum`` gauges (what each process has in flight)
add up over the live processes, and the other gauges (what the workers last reported, which
every frontend follows) take the most recent value.
"""

from __future__ import annotations

import os

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Labeled:
    __slots__ = ("metric", "labeled")

    def __init__(self, metric, labels: tuple[str, ...]) -> None:
        self.metric, self.labeled = metric, bool(labels)

    def _child(self, labels: tuple[str, ...]):
        return self.metric.labels(*labels) if self.labeled else self.metric


class Counter(_Labeled):
    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self._child(labels).inc(amount)


class Gauge(_Labeled):
    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self._child(labels).inc(amount)

    def set(self, value: float, *labels: str) -> None:
        self._child(labels).set(value)


class Histogram(_Labeled):
    def observe(self, value: float) -> None:
        self.metric.observe(value)


class Registry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        # prometheus-client adds "_total" to a counter's name itself
        return Counter(prometheus_client.Counter(name.removesuffix("_total"), help, labels, registry=self.registry),
                       labels)

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = (), across: str = "mostrecent") -> Gauge:
        """``across``: how the frontend processes' values make one (``livesum`` or ``mostrecent``)."""
        return Gauge(prometheus_client.Gauge(name, help, labels, registry=self.registry, multiprocess_mode=across),
                     labels)

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(prometheus_client.Histogram(name, help, buckets=buckets, registry=self.registry), ())

    def render(self) -> str:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry).decode()
        from prometheus_client.multiprocess import MultiProcessCollector

        every = CollectorRegistry()
        MultiProcessCollector(every, path=self.multiprocess_dir)
        return generate_latest(every).decode()


class FrontendMetrics:
    """Every metric the frontend serves on ``/metrics`` (names and labels as in the README)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter("dyn_requests_total", "Requests by outcome", ("outcome",))
        self.ttft = r.histogram("dyn_time_to_first_token_seconds", "Time to first token")
        self.itl = r.histogram("dyn_inter_token_latency_seconds", "Time between streamed tokens")
        self.e2e = r.histogram("dyn_e2e_request_latency_seconds", "Request latency, end to end")
        self.prompt_tokens = r.counter("dyn_prompt_tokens_total", "Prompt tokens of admitted requests")
        self.generation_tokens = r.counter("dyn_generation_tokens_total", "Generated tokens")
        self.lora_requests = r.counter("dyn_lora_requests_total", "Requests served through each LoRA adapter",
                                       ("adapter",))
        self.cache_hits = r.counter("dyn_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache")
        self.local_prefills = r.counter("dyn_local_prefills_total", "Prompts prefilled on their decode/aggregated worker")
        self.remote_prefills = r.counter("dyn_remote_prefills_total", "Prompts prefilled by a prefill worker")
        self.kv_bytes = r.counter("dyn_kv_transfer_bytes_total", "KV bytes moved between workers")
        self.remote_prefill_latency = r.histogram("dyn_remote_prefill_latency_seconds",
                                                  "From queueing a remote prefill to its KV being in the decode pool")
        self.queue_depth = r.gauge("dyn_prefill_queue_depth", "Remote prefills waiting in the prefill queue")
        self.decisions = r.counter("dyn_router_decisions_total", "Requests routed to each worker", ("worker",))
        self.predicted_overlap = r.counter("dyn_router_predicted_overlap_tokens_total",
                                           "Prompt tokens the router expected the chosen worker to have cached",
                                           ("worker",))
        self.worker_cache_hits = r.counter("dyn_worker_prefix_cache_hit_tokens_total",
                                           "Prompt tokens the worker served from its prefix cache", ("worker",))
        self.worker_prompt_tokens = r.counter("dyn_worker_prompt_tokens_total", "Prompt tokens routed to the worker",
                                              ("worker",))
        self.kv_index_blocks = r.gauge("dyn_router_kv_index_blocks", "Distinct cached blocks in the router's index")
        self.kv_worker_blocks = r.gauge("dyn_router_kv_indexed_blocks", "Cached blocks the index holds per worker",
                                        ("worker",))
        self.kv_event_batches = r.gauge("dyn_router_kv_event_batches_total", "KV event batches applied", ("worker",))
        self.kv_resyncs = r.gauge("dyn_router_kv_resyncs_total", "Event-stream gaps that forced a resync",
                                  ("worker",))
        self.kv_errors = r.gauge("dyn_router_kv_errors_total",
                                 "KV-event problems (block_size_mismatch, no_events) per worker", ("worker", "reason"))
        self.router_active_blocks = r.gauge("dyn_router_active_blocks", "Decode blocks the router counts per worker",
                                            ("worker",), across="livesum")
        self.in_flight = r.gauge("dyn_requests_in_flight", "Requests being served", (), across="livesum")
        self.worker_up = r.gauge("dyn_worker_up", "1 while the worker answers heartbeats", ("worker",))
        self.blocks_used = r.gauge("dyn_worker_kv_blocks_used", "KV blocks held by live requests", ("worker",))
        self.blocks_total = r.gauge("dyn_worker_kv_blocks_total", "KV blocks in the worker's pool", ("worker",))
        self.running = r.gauge("dyn_worker_requests_running", "Requests running on the worker", ("worker",))
        self.waiting = r.gauge("dyn_worker_requests_waiting", "Requests waiting on the worker", ("worker",))
        self.preemptions = r.gauge("dyn_worker_preemptions", "Preemptions so far", ("worker",))
        self.remote_timeouts = r.gauge("dyn_worker_remote_prefill_timeouts_total",
                                       "Remote prefills a decode worker gave up on at the deadline", ("worker",))
        self.fenced = r.gauge("dyn_worker_kv_blocks_fenced",
                              "KV blocks held back while a late remote-prefill write may still land", ("worker",))
        self.step_seconds = r.gauge("dyn_worker_engine_step_seconds_total", "Time in engine steps", ("worker",))
        self.steps = r.gauge("dyn_worker_engine_steps_total", "Engine steps run", ("worker",))
        # speculative decoding (vLLM's spec_decode_num_drafts / _num_draft_tokens / _num_accepted_tokens)
        self.spec_drafts = r.gauge("dyn_worker_spec_decode_drafts_total", "Drafts checked (speculative decoding)",
                                   ("worker",))
        self.spec_draft_tokens = r.gauge("dyn_worker_spec_decode_draft_tokens_total", "Draft tokens checked",
                                         ("worker",))
        self.spec_accepted_tokens = r.gauge("dyn_worker_spec_decode_accepted_tokens_total", "Draft tokens kept",
                                            ("worker",))
        self.planner_decisions = r.counter("dyn_planner_decisions_total",
                                           "Planner decisions by action (observe mode: what it would do)",
                                           ("action",))
