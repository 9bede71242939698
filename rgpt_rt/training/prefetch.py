"""Make training batches ahead of use in worker processes, so that drawing scenes (numpy,
single-threaded) overlaps the model's forward and backward passes:

    for batch in prefetched(make_batch, [(step,) for step in range(first, steps)], workers=1):
        ...

`make_batch(*key)` runs in the workers for each key, in order; it is pickled once per worker,
so it must be a picklable callable (a module-level function, a dataclass with __call__, a
functools.partial of them). Results come back in the order of `keys`, so a run sees the same
batches with any number of workers; workers=0 calls make_batch in this process.

Workers are started with "spawn" (a fork of a process that already ran torch's thread pool
can hang), run torch on one thread each, and exit when the process that started them is gone
(a killed training run leaves no worker behind).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

_make_batch: Callable[..., Any] | None = None  # a worker's copy of make_batch


def _install(make_batch: Callable[..., Any]) -> None:
    import torch

    global _make_batch
    torch.set_num_threads(1)
    _make_batch = make_batch
    parent = os.getppid()
    threading.Thread(target=_exit_without, args=(parent,), daemon=True).start()


def _exit_without(parent: int) -> None:
    """A worker's watch: once its parent has died (it is then re-parented), exit at once."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _call(key: tuple) -> Any:
    return _make_batch(*key)


def prefetched(
    make_batch: Callable[..., Any], keys: Iterable[tuple], workers: int = 0, ahead: int = 0
) -> Iterator[Any]:
    """Yield make_batch(*key) for each key in order, with up to `ahead` (default 2 per worker)
    keys in flight in `workers` processes."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0; got {workers}")
    if workers == 0:
        for key in keys:
            yield make_batch(*key)
        return
    ahead = ahead or 2 * workers
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_install, initargs=(make_batch,)
    )
    try:
        keys = iter(keys)
        pending = deque(pool.submit(_call, key) for key in itertools.islice(keys, ahead))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(_call, key) for key in itertools.islice(keys, 1))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
