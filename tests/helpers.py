from __future__ import annotations

import random
import threading
import time

import requests

from dyn_actor.engine import LLMEngine, SamplingParams


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], max_steps: int = 10_000):
    """Add every request, step until all finish; return {id: (tokens, finish_reason, outputs)}."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got: dict[str, list] = {rid: [[], None, []] for rid in requests}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            entry = got[out.request_id]
            entry[0].extend(out.new_token_ids)
            entry[2].append(out)
            if out.finished:
                entry[1] = out.finish_reason
    else:
        raise AssertionError("requests did not finish")
    return {rid: (toks, reason, outs) for rid, (toks, reason, outs) in got.items()}


def remote_prefill_matches_local(make_engine, prompt: list[int], params: SamplingParams) -> None:
    """The disaggregation hooks on two engines of one model: a decode engine allocates, a prefill engine
    computes ``prompt`` and its KV is copied into the decode engine's blocks; decoding continues with
    the tokens of a local prefill (a third engine), and no block is left held on either side."""
    dec, pre = make_engine(), make_engine()
    want = run_all(make_engine(), {"r": (prompt, params)})["r"][0]
    alloc = dec.allocate_remote_prefill("r", prompt, params)
    assert alloc is not None
    pre.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    first = [t for _ in range(10) if pre.has_unfinished_requests() for o in pre.step() for t in o.new_token_ids]
    dec.pool.write_blocks(alloc.block_ids, pre.pool.read_blocks(pre.block_ids("r")))
    pre.release_blocks("r")
    got = list(first)
    assert dec.finish_remote_prefill("r", first[0]) is not None
    while dec.has_unfinished_requests():
        got += [t for o in dec.step() for t in o.new_token_ids]
    assert got == want
    assert dec.block_manager.num_used_blocks == 0 and pre.block_manager.num_used_blocks == 0


def served_1p1d_remote_texts_match(model_dir, prompts: dict[str, list[int]], want: dict[str, list[int]],
                                   max_tokens: int) -> None:
    """The launcher on ``model_dir``, 1p1d with every prefill remote: each greedy completion of
    ``prompts`` is the text of the engine's tokens ``want``, the prefills went remote, and the stop
    is clean."""
    from dyn_actor.engine.loader import load_tokenizer
    from tests.server import Server

    tok = load_tokenizer(str(model_dir))
    s = Server("--topology", "1p1d", "--max-local-prefill-length", "0", "--model", str(model_dir),
               "--dtype", "float32", "--kv-cache-memory-gb", "0.1")
    try:
        for k, prompt in prompts.items():
            r = requests.post(s.url + "/v1/completions", timeout=60, json={
                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == tok.decode(want[k]), k
        assert metric(s, "dyn_remote_prefills_total") >= len(prompts)
    finally:
        code, err = s.stop()
    assert code == 0, err[-2000:]


def fail_forward_once(engine: LLMEngine, message: str = "illegal memory access") -> None:
    """Make the engine's next forward pass raise ``RuntimeError(message)``; the one after works again."""
    forward = engine.model.forward

    def broken(*args, **kwargs):
        engine.model.forward = forward
        raise RuntimeError(message)

    engine.model.forward = broken


def random_prompt(rng: random.Random, n: int, vocab: int = 99) -> list[int]:
    return [0] + [rng.randrange(2, vocab) for _ in range(n - 1)]


def metric(server, name: str) -> float:
    """A Prometheus metric from a server's /metrics: the sum over its series (labels)."""
    import requests

    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def eventually(check, timeout: float = 3.0, interval: float = 0.05):
    """``check()`` until it is truthy or ``timeout`` seconds pass; its last value. For what the
    frontend learns from the workers' load reports (a few times a second): /metrics gauges."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Load:
    """``n`` clients posting ``body`` to the /v1/completions of ``s`` (a ``tests.server.Server``) in a
    loop until ``stop()``: the statuses of the requests that completed and of those that failed."""

    def __init__(self, s, body: dict, n: int) -> None:
        self.s, self.body = s, body
        self._stop = threading.Event()
        self.done: list[int] = []
        self.failures: list[int] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r = requests.post(self.s.base_url + "/completions", timeout=60, json=self.body)
            (self.done if r.status_code == 200 else self.failures).append(r.status_code)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)


def wait_threshold_below(s, limit: int, timeout: float, worker: str = "decode-0") -> dict:
    """Poll ``GET /v1/disagg/policy`` of ``s`` until ``worker``'s max_local_prefill_length is under
    ``limit`` or ``timeout`` s have passed; the last answer (decode worker -> its thresholds)."""
    deadline = time.monotonic() + timeout
    while True:
        policy = requests.get(s.base_url + "/disagg/policy", timeout=10).json()["workers"]
        if policy[worker]["max_local_prefill_length"] < limit or time.monotonic() > deadline:
            return policy
        time.sleep(0.5)


def pooling_server(folder, name: str, topology: str):
    """A pooling model (embeddings, a reranker) served in ``topology`` in this process, as ``name``; in
    1p1d every prompt would go remote if it were a generation (the decode worker must keep pooling
    requests local)."""
    from tests.server import InprocServer

    args = ["--model", str(folder), "--served-model-name", name, "--max-model-len", "256",
            "--kv-cache-memory-gb", "0.05", "--topology", topology]
    if topology == "1p1d":
        args += ["--max-local-prefill-length", "0"]
    return InprocServer(*args)
