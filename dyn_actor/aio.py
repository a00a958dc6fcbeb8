"""asyncio helpers.

``wait_for``: ``asyncio.wait_for`` without its Python 3.11 race. There, a task cancelled in the same
loop iteration as the future it waits on completes gets the result and loses the cancellation
(python/cpython#86296): a loop of asks (a prefill worker's pulls) then runs on after ``cancel()``,
and whoever gathers it (a worker stopping) waits forever. ``asyncio.timeout`` keeps the
cancellation; Python 3.10 has no ``asyncio.timeout``, so there the wait is written out.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """Await ``aw``; ``asyncio.TimeoutError`` (and ``aw`` cancelled) after ``timeout`` seconds (None:
    no limit). A cancellation of the caller always propagates, whether or not ``aw`` finished."""
    if timeout is None:
        return await aw
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await aw
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    if not done:
        fut.cancel()
        try:
            await fut
        except asyncio.CancelledError:
            pass
        raise asyncio.TimeoutError()
    return fut.result()
