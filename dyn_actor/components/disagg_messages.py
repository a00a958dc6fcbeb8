"""Messages of disaggregated serving: to the prefill queue, and from a prefill worker to a decode worker."""

from __future__ import annotations

import msgspec

from dyn_actor.kv.descriptor import KvPoolDescriptor
from dyn_actor.protocol import Logprobs, SamplingParams


class RemotePrefillRequest(msgspec.Struct):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    decode_worker: str  # name of the decode worker
    decode_endpoint: str  # where to send RemotePrefillDone
    pool: KvPoolDescriptor  # the decode worker's KV pool
    block_ids: list[int]  # every block of the prompt, allocated on the decode worker
    num_computed_blocks: int  # leading blocks whose KV the decode worker already has
    block_size: int  # tokens per block of the decode worker's pool


# ------------------------------------------------------------- to the prefill queue


class Push(msgspec.Struct, tag="push"):
    request: RemotePrefillRequest


class Pull(msgspec.Struct, tag="pull"):
    """Ask for the next request; answered with ``Pulled`` (``request`` None after ``wait`` seconds).
    ``puller`` / ``puller_endpoint`` name the prefill worker, so that a later ``Drop`` of a request
    it took can be passed on to it as ``CancelPrefill``."""

    wait: float = 1.0
    puller: str = ""
    puller_endpoint: str = ""
    finished: list[str] = []  # request ids this puller is done with since its last pull
    # the GPUs (by id) this puller writes into directly, its own first: the queue hands it the
    # oldest request for one of these before any other (empty: no preference, as on the CPU)
    near: list[str] = []


class Drop(msgspec.Struct, tag="drop"):
    """Forget a request (timed out, aborted): removed if still queued, else the prefill worker that
    pulled it is told to cancel it."""

    request_id: str


class Depth(msgspec.Struct, tag="depth"):
    pass


class Leave(msgspec.Struct, tag="leave"):
    """A draining prefill worker pulls no more: the pulls it has waiting are answered with nothing
    now, rather than at the end of their ``wait`` (so a stop does not wait out an idle pull)."""

    puller_endpoint: str


PrefillQueueMessage = Push | Pull | Drop | Depth | Leave


class Pulled(msgspec.Struct):
    request: RemotePrefillRequest | None


class QueueDepth(msgspec.Struct):
    """The queue's depth: the answer to ``Depth``, and what the queue publishes on every change."""

    depth: int
    tokens: int = 0  # prompt tokens the queued requests still need computed (their cached prefix left out)


# ------------------------------------------------------------- to a prefill worker


class CancelPrefill(msgspec.Struct, tag="cancel_prefill"):
    """Stop computing this request (its decode worker no longer wants it); a tell."""

    request_id: str


class WriteStatus(msgspec.Struct, tag="write_status"):
    """Is a write into the decode worker's blocks of this request possible still? (an ask)"""

    request_id: str


class WriteState(msgspec.Struct):
    active: bool  # granted and not yet finished: the blocks may still change


# ------------------------------------------------------------- to a decode worker


class RemotePrefillDone(msgspec.Struct, tag="prefill_done"):
    """The prompt's KV is in the decode worker's blocks; decoding starts with ``first_token``."""

    request_id: str
    first_token: int
    logprobs: Logprobs | None = None
    kv_bytes: int = 0


class RemotePrefillFailed(msgspec.Struct, tag="prefill_failed"):
    """The prefill worker will not write this request's blocks (it failed, or was not granted)."""

    request_id: str
    reason: str


class PrefillLost(msgspec.Struct, tag="prefill_lost"):
    """From the queue: the prefill worker that pulled this request stopped answering. The decode
    worker takes the request back unless that worker was already granted the blocks."""

    request_id: str


class BeginWrite(msgspec.Struct, tag="begin_write"):
    """Asked by a prefill worker before it writes a request's blocks; answered with ``WriteGrant``.

    The fence against stale writes: a decode worker grants a request's blocks to one writer, only
    while it still waits for them. Once it has given up on a remote prefill it refuses, so nothing
    is written into blocks that may have been reused; if it gives up after granting, it keeps the
    blocks out of circulation until the writer is known to be done (or its process is gone)."""

    request_id: str
    writer: str
    writer_endpoint: str
    writer_pid: int


class WriteGrant(msgspec.Struct):
    ok: bool


class SetDisaggPolicy(msgspec.Struct, tag="set_policy"):
    """Change the local/remote thresholds of a decode worker at run time (fields left None stay)."""

    max_local_prefill_length: int | None = None
    max_prefill_queue_size: int | None = None


class DisaggPolicyState(msgspec.Struct):
    max_local_prefill_length: int
    max_prefill_queue_size: int
