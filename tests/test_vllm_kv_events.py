"""vLLM's KV events translated to ours (no vLLM needed: the batches are encoded here in vLLM 0.32's
wire format; tests/test_vllm_engine.py checks the format against vLLM's own classes)."""

from __future__ import annotations

import msgspec

from dyn_actor.components.vllm_kv_events import KvEventTranslator
from dyn_actor.kv.block_hash import hash_blocks
from dyn_actor.kv.events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


# vLLM 0.32's event structs, as its publisher encodes them (tagged by class name, all fields)
class _Event(msgspec.Struct, omit_defaults=True, tag=True):
    pass


class BlockStoredV(_Event, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: list | None = None
    group_idx: int | None = 0


class BlockRemovedV(_Event, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None = "GPU"
    group_idx: int | None = 0


class AllBlocksClearedV(_Event, tag="AllBlocksCleared"):
    pass


class BatchV(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list
    data_parallel_rank: int | None = None


def _payload(*events) -> bytes:
    return msgspec.msgpack.encode(BatchV(1.0, list(events), 0))


def test_stored_chains_with_our_hash_and_removed_maps_back():
    t = KvEventTranslator()
    toks = list(range(10, 22))  # three blocks
    assert t.expects(0)
    out = t.apply(0, _payload(BlockStoredV([b"a1", b"a2"], None, toks[:8], BS)))
    ours = hash_blocks(toks, BS)
    assert out == [BlockStored(ours[:2], None, toks[:8], BS)]
    # the next block follows vLLM's hash of its parent: ours chains from ours
    out = t.apply(1, _payload(BlockStoredV([b"a3"], b"a2", toks[8:], BS)))
    assert out == [BlockStored(ours[2:], ours[1], toks[8:], BS)]
    assert sorted(t.snapshot()) == sorted(ours)
    out = t.apply(2, _payload(BlockRemovedV([b"a3", b"unknown"]), BlockRemovedV([b"a1"])))
    assert out == [BlockRemoved([ours[2]]), BlockRemoved([ours[0]])]
    assert t.snapshot() == [ours[1]]
    assert t.apply(3, _payload(AllBlocksClearedV())) == [AllBlocksCleared()] and t.snapshot() == []
    assert t.seq == 3 and t.expects(4) and not t.expects(6)


def test_an_adapters_blocks_hash_on_its_root():
    """vLLM names the LoRA adapter of stored blocks (``lora_name``): ours hash from that adapter's root,
    as the router hashes that adapter's requests; a child block chains from its parent as usual."""
    from dyn_actor.kv.block_hash import lora_root

    t = KvEventTranslator()
    toks = list(range(30, 42))
    out = t.apply(0, _payload(BlockStoredV([b"l1", b"l2"], None, toks[:8], BS, lora_id=1, lora_name="sql")))
    ours = hash_blocks(toks, BS, lora_root("sql"))
    assert out == [BlockStored(ours[:2], lora_root("sql"), toks[:8], BS)]
    assert ours[0] != hash_blocks(toks, BS)[0]
    out = t.apply(1, _payload(BlockStoredV([b"l3"], b"l2", toks[8:], BS, lora_id=1, lora_name="sql")))
    assert out == [BlockStored(ours[2:], ours[1], toks[8:], BS)]


def test_int_hashes_other_media_orphans_and_loss():
    t = KvEventTranslator()
    toks = list(range(40, 48))
    # an offloading tier's copy is not what the router matches; a parent never seen cannot be hashed
    out = t.apply(0, _payload(BlockStoredV([7], None, toks[:4], BS, medium="CPU"),
                              BlockStoredV([9], 12345, toks[4:], BS),
                              BlockStoredV([1 << 63, 5], None, toks, BS)))
    ours = hash_blocks(toks, BS)
    assert out == [BlockStored(ours, None, toks, BS)] and t.orphans == 1
    assert t.apply(1, _payload(BlockRemovedV([5], medium="CPU"))) == []
    assert t.lost(9) == [AllBlocksCleared()] and t.snapshot() == [] and t.expects(9)


def test_worker_relays_in_order_and_replays_a_gap(tmp_path):
    """The worker's relay against a stand-in for vLLM's publisher (PUB + replay ROUTER, vLLM's
    framing): a missed batch is fetched from the replay socket and applied in order; a batch the
    replay no longer has makes the router forget the worker's cache."""
    import asyncio
    from types import SimpleNamespace

    import zmq
    import zmq.asyncio

    from dyn_actor.components.messages import WorkerInfo
    from dyn_actor.components.vllm_worker import VllmWorker
    from dyn_actor.kv.events import KvEventBatch

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        pub_ep, replay_ep, ours_ep = (f"ipc://{tmp_path}/{n}" for n in ("vpub", "vreplay", "ours"))
        vpub = ctx.socket(zmq.PUB)
        vpub.bind(pub_ep)
        vreplay = ctx.socket(zmq.ROUTER)
        vreplay.bind(replay_ep)
        llm = SimpleNamespace(vllm_config=SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=64)),
                              shutdown=lambda: None)
        w = VllmWorker("worker-0", llm, WorkerInfo("worker-0", "m", 512, 99, BS, [1], ours_ep), (pub_ep, replay_ep))
        await w.on_start()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ours_ep)
        await asyncio.sleep(0.3)  # both subscriptions settle

        async def our_batches(n: int) -> list[KvEventBatch]:
            """The next ``n`` event batches the worker publishes (its load reports skipped)."""
            out = []
            while len(out) < n:
                msg = msgspec.msgpack.decode(await asyncio.wait_for(sub.recv(), 5))
                if msg["type"] == "kv_events":
                    out.append(msgspec.convert(msg, KvEventBatch))
            return out

        toks = list(range(20, 32))
        batches = [_payload(BlockStoredV([b"x1"], None, toks[:4], BS)),
                   _payload(BlockStoredV([b"x2"], b"x1", toks[4:8], BS)),
                   _payload(BlockStoredV([b"x3"], b"x2", toks[8:], BS))]
        await vpub.send_multipart([b"", (0).to_bytes(8, "big"), batches[0]])
        # batch 1 is lost on the way; batch 2 arrives and the worker asks the replay socket from 1
        await vpub.send_multipart([b"", (2).to_bytes(8, "big"), batches[2]])
        client, empty, start = await asyncio.wait_for(vreplay.recv_multipart(), 5)
        assert int.from_bytes(start, "big") == 1
        for seq in (1, 2):
            await vreplay.send_multipart([client, b"", b"", seq.to_bytes(8, "big"), batches[seq]])
        await vreplay.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])
        got = await our_batches(3)
        assert [b.seq for b in got] == [1, 2, 3]
        ours = hash_blocks(toks, BS)
        assert [e.block_hashes for b in got for e in b.events] == [[h] for h in ours]
        snap = await w.kv_snapshot(None)
        assert snap.seq == 3 and sorted(snap.block_hashes) == sorted(ours)
        # a gap the replay cannot fill: everything is forgotten, then the stream goes on
        await vpub.send_multipart([b"", (9).to_bytes(8, "big"), _payload(BlockStoredV([b"y"], None, toks[:4], BS))])
        client, _, start = await asyncio.wait_for(vreplay.recv_multipart(), 5)
        await vreplay.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])
        rest = await our_batches(2)
        assert rest[0].events == [AllBlocksCleared()] and rest[1].events[0].block_hashes == ours[:1]
        await w.on_stop()
        for s in (vpub, vreplay, sub):
            s.close(linger=0)
        ctx.term()

    asyncio.run(main())
