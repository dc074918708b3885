"""An ordered, bounded map over threads, for work whose native calls release the GIL (image decoding, OpenCV,
PoseLib's RANSAC): `function(item)` for every item on `workers` threads, results yielded in the items' order, at
most `ahead` items in flight so memory stays flat whatever the number of items. concurrent.futures'
`Executor.map` submits every item at once, which holds every input (and result) in memory for a long stream.
The same map runs on a given executor (recon.executor's process pool)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any


def ordered_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int = 2,
                ahead: int | None = None, executor: Executor | None = None) -> Iterator[Any]:
    """`function(item)` for every item, computed on `workers` threads (or by `executor`, which has `workers`
    workers) and yielded in order; `ahead` (default 2 x `workers`) bounds the items in flight. An exception from
    `function` is raised when its result is due."""
    ahead = max(1, 2 * workers if ahead is None else ahead)
    items = iter(items)
    with nullcontext(executor) if executor is not None else ThreadPoolExecutor(max_workers=workers) as pool:
        window: list[Future] = []
        for item in items:
            window.append(pool.submit(function, item))
            if len(window) >= ahead:
                break
        position = 0
        while position < len(window):
            result = window[position].result()
            window[position] = None  # release the result
            position += 1
            following = next(items, _END)
            if following is not _END:
                window.append(pool.submit(function, following))
            yield result


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_END = object()
