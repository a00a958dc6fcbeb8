"""Messages of disaggregated serving: to the prefill queue, and from a prefill worker to a decode worker."""

from __future__ import annotations

import msgspec

from dyn_actor.engine.sampling import Logprobs, SamplingParams
from dyn_actor.kv.transfer import KvPoolDescriptor


class RemotePrefillRequest(msgspec.Struct):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    decode_worker: str  # name of the decode worker
    decode_endpoint: str  # where to send RemotePrefillDone
    pool: KvPoolDescriptor  # the decode worker's KV pool
    block_ids: list[int]  # every block of the prompt, allocated on the decode worker
    num_computed_blocks: int  # leading blocks whose KV the decode worker already has


# ------------------------------------------------------------- to the prefill queue


class Push(msgspec.Struct, tag="push"):
    request: RemotePrefillRequest


class Pull(msgspec.Struct, tag="pull"):
    """Ask for the next request; answered with ``Pulled`` (``request`` None after ``wait`` seconds)."""

    wait: float = 1.0


class Drop(msgspec.Struct, tag="drop"):
    """Forget a queued request (aborted, or its decode worker is gone)."""

    request_id: str


class Depth(msgspec.Struct, tag="depth"):
    pass


PrefillQueueMessage = Push | Pull | Drop | Depth


class Pulled(msgspec.Struct):
    request: RemotePrefillRequest | None


class QueueDepth(msgspec.Struct):
    depth: int


# ------------------------------------------------------------- to a decode worker


class RemotePrefillDone(msgspec.Struct, tag="prefill_done"):
    """The prompt's KV is in the decode worker's blocks; decoding starts with ``first_token``."""

    request_id: str
    first_token: int
    logprobs: Logprobs | None = None
    kv_bytes: int = 0


class RemotePrefillFailed(msgspec.Struct, tag="prefill_failed"):
    request_id: str
    reason: str


class SetDisaggPolicy(msgspec.Struct, tag="set_policy"):
    """Change the local/remote thresholds of a decode worker at run time (fields left None stay)."""

    max_local_prefill_length: int | None = None
    max_prefill_queue_size: int | None = None


class DisaggPolicyState(msgspec.Struct):
    max_local_prefill_length: int
    max_prefill_queue_size: int
