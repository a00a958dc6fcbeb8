"""The one module that imports ``zmq``: socket factory and typed socket wrappers.

Endpoints are ``ipc://`` files in a private run directory (mode 0700),
``inproc://`` names for actors living in one process (tests), or TCP bound
to 127.0.0.1. Everything above this module sends and receives ``bytes``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import zmq
import zmq.asyncio

Again = zmq.Again


def make_run_dir(prefix: str = "dyn-actor-") -> Path:
    """A private directory (mode 0700) for socket files; the caller removes it."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o700)
    return d


def ipc_endpoint(run_dir: str | Path, name: str) -> str:
    return f"ipc://{Path(run_dir) / name}.sock"


def inproc_endpoint(name: str) -> str:
    return f"inproc://{name}"


_shared_context: zmq.asyncio.Context | None = None


def context() -> zmq.asyncio.Context:
    """The process's asyncio ZeroMQ context (``inproc://`` endpoints need one shared context)."""
    global _shared_context
    if _shared_context is None or _shared_context.closed:
        _shared_context = zmq.asyncio.Context()
    return _shared_context


def _configure(sock: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


class RouterSocket:
    """Bound ROUTER: receives ``(peer, payload)`` from many dealers, replies to a peer by id."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = _configure(context().socket(zmq.ROUTER))
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.bind(endpoint)

    async def recv(self) -> tuple[bytes, bytes]:
        peer, payload = await self._sock.recv_multipart(copy=True)
        return peer, payload

    async def send(self, peer: bytes, payload: bytes) -> bool:
        """False when the peer is gone (its messages are dropped)."""
        try:
            await self._sock.send_multipart([peer, payload])
            return True
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def close(self) -> None:
        self._sock.close(linger=0)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://") :])
            except FileNotFoundError:
                pass


class DealerSocket:
    """Connected DEALER: one conversation with one ROUTER."""

    def __init__(self, endpoint: str, identity: bytes | None = None) -> None:
        self.endpoint = endpoint
        self._sock = _configure(context().socket(zmq.DEALER))
        if identity:
            self._sock.setsockopt(zmq.IDENTITY, identity)
        self._sock.connect(endpoint)

    async def recv(self) -> bytes:
        return await self._sock.recv(copy=True)

    async def send(self, payload: bytes) -> None:
        await self._sock.send(payload)

    def close(self) -> None:
        self._sock.close(linger=0)


class PubSocket:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = _configure(context().socket(zmq.PUB))
        self._sock.bind(endpoint)

    async def send(self, payload: bytes) -> None:
        await self._sock.send(payload)

    def close(self) -> None:
        self._sock.close(linger=0)


class PollingSubSocket:
    """A subscriber read without an event loop: ``drain()`` returns what has arrived, never waits
    (for code that runs on another framework's thread, e.g. inside vLLM's scheduler)."""

    def __init__(self, endpoint: str) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)

    def drain(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self._sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return out

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class SubSocket:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = _configure(context().socket(zmq.SUB))
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)

    async def recv(self) -> bytes:
        return await self._sock.recv(copy=True)

    def close(self) -> None:
        self._sock.close(linger=0)
