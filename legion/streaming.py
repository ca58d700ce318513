"""Turn work that reports progress through a callback into an async stream of its progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

E = TypeVar("E")
R = TypeVar("R")

_END = object()


async def relay(work: Callable[[Callable[[E], None]], Awaitable[R]]) -> AsyncIterator[E | R]:
    """Run ``work(emit)``; yield what it emits as it emits it, then what it returns (last).

    An error of ``work`` is raised after the items already yielded. Closing the iterator
    before the end (the consumer went away) cancels ``work``.
    """
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(work(queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(_END))  # after the work's last item
    try:
        while (item := await queue.get()) is not _END:
            yield item
        yield task.result()
    finally:
        task.cancel()
