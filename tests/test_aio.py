"""``dyn_actor.aio.wait_for``: a cancelled waiter stays cancelled, whatever its future did meanwhile."""

import asyncio

import pytest

from dyn_actor.aio import wait_for


async def _loop_of_asks(fut: asyncio.Future, answers: list) -> None:
    """A loop like a prefill worker's pulls: one wait after another, until cancelled."""
    answers.append(await wait_for(fut, 10))
    while True:
        answers.append(await wait_for(asyncio.sleep(0.01, "next"), 10))


def test_a_cancel_that_lands_with_the_reply_is_kept():
    async def main():
        fut = asyncio.get_running_loop().create_future()
        answers: list = []
        task = asyncio.ensure_future(_loop_of_asks(fut, answers))
        await asyncio.sleep(0)  # the task waits on fut
        fut.set_result("reply")  # the reply and the cancel in one loop iteration
        task.cancel()
        await asyncio.wait({task}, timeout=2)
        ran_on = not task.done()  # with asyncio.wait_for of 3.11, the loop got "reply" and runs on
        if ran_on:
            task.cancel()  # once more: a cancel that lands during a sleep is kept
            await asyncio.wait({task}, timeout=2)
        return ran_on, task.cancelled(), answers

    assert asyncio.run(main()) == (False, True, [])


def test_timeout_and_result():
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(asyncio.sleep(5), 0.05)
        inner = asyncio.ensure_future(asyncio.sleep(5))
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(inner, 0.05)
        await asyncio.sleep(0)
        assert inner.cancelled()  # what timed out is cancelled, as asyncio.wait_for does
        assert await wait_for(asyncio.sleep(0.01, "done"), 5) == "done"
        assert await wait_for(asyncio.sleep(0.01, "no limit"), None) == "no limit"

    asyncio.run(main())
