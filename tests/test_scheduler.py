from __future__ import annotations

from dyn_actor.engine.request import Request, RequestStatus
from dyn_actor.engine.sampling import SamplingParams
from dyn_actor.engine.scheduler import Scheduler, SchedulerConfig
from dyn_actor.kv.block_manager import BlockManager

BS = 4


def _req(rid: str, n: int, max_tokens: int = 8) -> Request:
    return Request(rid, [10 + (i % 50) + int(rid.strip("r") or 0) * 100 for i in range(n)], SamplingParams(max_tokens=max_tokens), (1,), max_tokens)


def _run_step(s: Scheduler, out, sample_token: int = 7) -> list[Request]:
    """What the engine does after a forward pass: advance progress, sample where a request is caught up."""
    sampled = []
    for req, n in out.scheduled:
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(sample_token)
            sampled.append(req)
            if req.check_stop(10_000):
                s.finish(req)
        if not req.finished:
            s.bm.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
    return sampled


def test_token_budget_and_chunked_prefill():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, BS))
    long, short = _req("r1", 23), _req("r2", 5)
    s.add(long)
    s.add(short)
    out = s.schedule()
    assert out.scheduled == [(long, 10)]  # the budget caps the first chunk
    assert _run_step(s, out) == []  # a partial prefill samples nothing
    out = s.schedule()
    assert out.scheduled == [(long, 10)]
    _run_step(s, out)
    out = s.schedule()
    assert out.scheduled == [(long, 3), (short, 5)]  # remaining chunk, then the next request fits
    assert out.num_tokens <= 10
    assert _run_step(s, out) == [long, short]
    out = s.schedule()
    assert out.scheduled == [(long, 1), (short, 1)]  # both decoding


def test_long_prefill_threshold_caps_a_chunk():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, long_prefill_token_threshold=8), BlockManager(64, BS))
    r = _req("r1", 30)
    s.add(r)
    assert s.schedule().scheduled == [(r, 8)]


def test_max_num_seqs():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(64, BS))
    reqs = [_req(f"r{i}", 3) for i in range(1, 4)]
    for r in reqs:
        s.add(r)
    out = s.schedule()
    assert [r for r, _ in out.scheduled] == reqs[:2]
    assert len(s.waiting) == 1


def test_preemption_frees_blocks_and_requeues_last_admitted():
    bm = BlockManager(6, BS)  # 24 token slots
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100), bm)
    a, b = _req("r1", 8, max_tokens=12), _req("r2", 8, max_tokens=12)
    s.add(a)
    s.add(b)
    _run_step(s, s.schedule())  # 2 + 2 blocks held; each has 9 tokens now
    preempted = 0
    for _ in range(40):
        if not s.running and not s.waiting:
            break
        out = s.schedule()
        preempted += len(out.preempted)
        if out.preempted and preempted == len(out.preempted):  # the first preemption
            assert out.preempted == [b]  # the last admitted goes first
            assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
            assert s.waiting[0] is b and bm.block_ids("r2") == []
        _run_step(s, out)
    assert preempted >= 1
    assert a.finished and b.finished
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert bm.num_used_blocks == 0


def test_abort_anywhere_returns_blocks():
    bm = BlockManager(64, BS)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8), bm)
    running, waiting = _req("r1", 6), _req("r2", 30)
    s.add(running)
    s.add(waiting)
    _run_step(s, s.schedule())  # r1 prefilled (6) and r2 got a 2-token chunk
    assert bm.num_used_blocks > 0
    s.finish(running)
    s.finish(waiting)
    assert bm.num_used_blocks == 0 and not s.running and not s.waiting
    remote = _req("r3", 12)
    assert s.allocate_remote(remote)
    assert bm.num_used_blocks == 3
    s.finish(remote)
    assert bm.num_used_blocks == 0 and not s.remote


def test_prefix_hit_skips_cached_blocks():
    bm = BlockManager(64, BS)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100), bm)
    a = _req("r1", 13)
    s.add(a)
    _run_step(s, s.schedule())
    s.finish(a)
    b = Request("b", list(a.prompt_token_ids), SamplingParams(), (1,), 4)
    s.add(b)
    out = s.schedule()
    assert out.scheduled == [(b, 1)]  # 12 of 13 tokens cached
    assert b.num_cached_tokens == 12


def test_heavy_decode_steps_take_the_prefill_threads(monkeypatch):
    """On the CPU a decode step runs with ``num_threads`` (a core kept for the frontend) unless it is
    heavy: at least ``WIDE_DECODE_CORE_MS`` of core time and ``WIDE_DECODE_CORE_MS_PER_ROW`` per
    sampled row; then the next ones take ``prefill_threads`` too, until a step falls under half."""
    import torch

    from dyn_actor.engine import EngineConfig, LLMEngine
    from dyn_actor.engine import engine as engine_mod

    eng = LLMEngine(EngineConfig(num_kv_blocks=64, num_threads=1, prefill_threads=2))
    note = eng._note_decode_cost
    note(0.003, 1, 1)  # 3 core-ms: light
    assert not eng._wide_decode
    note(0.010, 1, 4)  # 10 core-ms, 2.5 a row: heavy
    assert eng._wide_decode
    note(0.0018, 2, 1)  # 3.6 core-ms with both threads: still above half
    assert eng._wide_decode
    note(0.010, 2, 64)  # 0.31 core-ms a row: the frontend's share matters again
    assert not eng._wide_decode
    # the step itself: a heavy decode runs with the prefill threads, and the engine's own count after
    seen = []
    real = eng.model.forward

    def forward(batch, pool):
        seen.append(torch.get_num_threads())
        return real(batch, pool)

    monkeypatch.setattr(eng.model, "forward", forward)
    monkeypatch.setattr(engine_mod, "WIDE_DECODE_CORE_MS", 0.0)
    monkeypatch.setattr(engine_mod, "WIDE_DECODE_CORE_MS_PER_ROW", 0.0)
    # (no back-off here: on a loaded host a wide step may well be slower than a narrow one)
    monkeypatch.setattr(engine_mod, "WIDE_DECODE_SLOWER", float("inf"))
    eng.add_request("a", [0, 5, 6], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert seen[0] == 1 and seen[1:] == [2] * (len(seen) - 1), seen
    assert torch.get_num_threads() == 1


def test_wide_decode_backs_off_when_the_other_core_is_taken():
    """A wide decode step 1.5x as slow a row as the last narrow step of about its size (another process
    on the extra core: each parallel region waits for it) sends decode and prefill steps back to
    ``num_threads`` for ``WIDE_DECODE_BACKOFF_S``; then they may widen again. Steps of other sizes are
    not compared (a row's cost falls as a step grows)."""
    from dyn_actor.engine import EngineConfig, LLMEngine
    from dyn_actor.engine import engine as engine_mod

    clock = [100.0]
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, num_threads=1, prefill_threads=2))
    eng._clock = lambda: clock[0]
    note = eng._note_decode_cost
    note(0.010, 1, 1)  # heavy: widen
    assert eng._wide_decode
    note(0.006, 2, 1)  # faster on two threads: stays wide
    assert eng._wide_decode
    note(0.200, 2, 4)  # slow, but four times the rows of the narrow step: not compared
    assert eng._wide_decode
    note(0.016, 2, 1)  # 1.6x the narrow step's time for as many rows: the other core is taken
    assert not eng._wide_decode and eng._wide_blocked_until == 100.0 + engine_mod.WIDE_DECODE_BACKOFF_S
    clock[0] += 1
    note(0.010, 1, 1)  # heavy, but within the back-off
    assert not eng._wide_decode
    clock[0] += engine_mod.WIDE_DECODE_BACKOFF_S
    note(0.010, 1, 1)
    assert eng._wide_decode
