"""Disaggregated serving: the policy that decides local vs remote prefill, shared by the decode
worker (``decode_worker.py``) and the prefill worker (``prefill_worker.py``).

Flow of a remote prefill: the decode worker allocates the prompt's blocks in its
shared KV pool and pushes a ``RemotePrefillRequest`` to the prefill queue; a
prefill worker pulls it, computes the prompt, asks the decode worker for the
right to write (``BeginWrite``), writes the KV straight into the decode
worker's blocks, and only then tells it ``RemotePrefillDone`` with the first
token. If nothing comes back in time, the decode worker computes the prompt
itself: a request is never left hanging.

Fencing (no write ever lands in a block that was reused): the decode worker
grants a request's blocks to one writer, and only while it still waits for
them. A remote prefill given up before the grant is refused one later, so the
decode worker computes the prompt in the same blocks at once; one given up
after the grant has its blocks held back (fenced) and is computed in fresh
ones, and the fence is lifted only when the writer reports, says it is not
writing, or its process is gone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dyn_actor.actor import ActorDeadError, ActorError, ActorRef
from dyn_actor.components.disagg_messages import (
    BeginWrite,
    DisaggPolicyState,
    Leave,
    Pull,
    Pulled,
    RemotePrefillRequest,
    SetDisaggPolicy,
    WriteState,
    WriteStatus,
)


@dataclass
class DisaggPolicy:
    max_local_prefill_length: int = 512
    max_prefill_queue_size: int = 8
    remote_prefill_timeout: float = 30.0


def set_policy(policy: DisaggPolicy, m: SetDisaggPolicy) -> DisaggPolicyState:
    """Apply a run-time change (``POST /v1/disagg/policy``, the planner) to ``policy`` in place; fields
    left None stay. Raise ``ValueError`` on a negative value (nothing is changed then)."""
    for value in (m.max_local_prefill_length, m.max_prefill_queue_size):
        if value is not None and value < 0:
            raise ValueError("max_local_prefill_length and max_prefill_queue_size must be >= 0")
    if m.max_local_prefill_length is not None:
        policy.max_local_prefill_length = m.max_local_prefill_length
    if m.max_prefill_queue_size is not None:
        policy.max_prefill_queue_size = m.max_prefill_queue_size
    return DisaggPolicyState(policy.max_local_prefill_length, policy.max_prefill_queue_size)


# ``--engine vllm``: the decode worker's policy travels with each request to our KV connector in vLLM's
# scheduler process, under this key of the request's ``kv_transfer_params``, so a change made while
# serving holds from the next request on (the connector's launch-time policy is the fallback)
POLICY_PARAM = "dyn_actor_policy"


def policy_param(policy: DisaggPolicy) -> dict:
    return {POLICY_PARAM: [policy.max_local_prefill_length, policy.max_prefill_queue_size]}


def policy_of(params: dict | None, default: DisaggPolicy) -> DisaggPolicy:
    """The policy a request carries in its ``kv_transfer_params`` (``policy_param``), else ``default``."""
    value = (params or {}).get(POLICY_PARAM)
    if not value:
        return default
    return DisaggPolicy(int(value[0]), int(value[1]), default.remote_prefill_timeout)


def prefill_remotely(uncached_prompt_tokens: int, queue_depth: int, policy: DisaggPolicy) -> bool:
    """The conditional-disaggregation decision: remote when the uncached part of the prompt is
    longer than ``max_local_prefill_length`` and the queue has room."""
    return uncached_prompt_tokens > policy.max_local_prefill_length and queue_depth < policy.max_prefill_queue_size


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def pull_loop(queue: ActorRef, puller: str, endpoint: str, finished: list[str], draining: Callable[[], bool],
                    serve: Callable[[RemotePrefillRequest], Awaitable[None]], near: list[str] | None = None) -> None:
    """A prefill worker's pull loop: ask the queue for one request at a time (the pull waits up to a
    second for work), serve it, and name it in ``finished`` (shared by the worker's loops; the queue
    forgets what is named in the next pull) until ``draining()``. ``near``: the cards the worker
    writes into directly (``Pull.near``)."""
    while not draining():
        try:
            done = finished[:]
            finished.clear()
            pulled = await queue.ask(Pull(1.0, puller, endpoint, done, near or []), Pulled, timeout=60.0)
        except asyncio.TimeoutError:
            continue
        except ActorDeadError:  # stalled or restarting: the ref knocks until it answers again
            await asyncio.sleep(0.5)
            continue
        if pulled.request is not None:
            try:
                await serve(pulled.request)
            finally:
                finished.append(pulled.request.request_id)


async def leave_queue(queue: ActorRef | None, endpoint: str) -> None:
    """Tell the prefill queue that the puller at ``endpoint`` is draining, so that its idle pulls
    come back now; best effort (a queue not answering ends the pulls at their ``wait``)."""
    if queue is not None:
        await queue.try_tell(Leave(endpoint))


async def writer_idle(refs: dict[str, ActorRef], m: BeginWrite, timeout: float) -> bool | None:
    """Whether the prefill worker granted ``m.request_id`` says it is done with it (None: no answer
    within ``timeout``). ``refs``: the asker's refs to writers, by endpoint (kept: they reconnect)."""
    ref = refs.get(m.writer_endpoint)
    if ref is None:
        ref = refs[m.writer_endpoint] = await ActorRef(m.writer_endpoint, m.writer).start()
    try:
        state = await ref.ask(WriteStatus(m.request_id), WriteState, timeout=timeout)
    except (ActorError, asyncio.TimeoutError):
        return None
    return not state.active
