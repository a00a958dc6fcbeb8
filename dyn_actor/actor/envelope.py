"""What travels between an ``ActorRef`` and an actor: a small tagged union around typed bodies.

A body is the msgpack encoding of the actor's own ``msgspec`` message types,
carried as ``msgspec.Raw`` so the envelope is decoded without knowing them.
Nothing is ever unpickled.
"""

from __future__ import annotations

import msgspec

TELL, ASK, STREAM = 0, 1, 2


class Call(msgspec.Struct, tag="call", array_like=True):
    cid: int
    mode: int
    body: msgspec.Raw


_NIL = msgspec.Raw(b"\xc0")  # msgpack nil


class Reply(msgspec.Struct, tag="reply", array_like=True):
    cid: int
    body: msgspec.Raw = _NIL  # msgpack nil when the reply carries no item (end of stream, error)
    has_body: bool = False
    error: str | None = None
    error_type: str | None = None
    end: bool = True


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    cid: int


class Ping(msgspec.Struct, tag="ping", array_like=True):
    seq: int


class Pong(msgspec.Struct, tag="pong", array_like=True):
    seq: int
    # which run of the actor answers: a new one for each start of its server, so a ref can tell a
    # peer that was restarted quickly (between two heartbeats) from one that never went away
    incarnation: int = 0


Envelope = Call | Reply | Cancel | Ping | Pong

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_envelope(data: bytes) -> Call | Reply | Cancel | Ping | Pong:
    return _decoder.decode(data)


def raw(body: msgspec.Struct) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(body))
