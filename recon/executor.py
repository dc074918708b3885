"""Where a stage's work runs: in this process (`local`) or sharded over Ray actors (`ray`).

`local` matching on the CPU forks one process per core (`ProcessPool`, `--workers`), each with one torch
thread: matching is many small products and searches with Python between them, which torch's threads inside
one process do not keep busy. temple_ring_full's 1081 pairs (SIFT, 2,000-2,400 keypoints per image, 2 cores):
the match stage took 14.0-15.1 s in this process on two torch threads and 10.7-11.7 s on two forked processes
(the matcher alone: 12.3 / 12.6 against 9.8 / 9.8 s), the same 113,079 matches; 3 processes: 11.4 s. Forked,
the workers start in milliseconds with torch already imported (a spawned one imports it again, ~2.7 s here) and
read the features from the shared file themselves, so only image names and matches cross the pipes. Fork is
used on Linux only (macOS' system libraries are not fork-safe); elsewhere the work stays here.

A stage hands the executor a worker class (built once per worker: it loads the model once) and a stream of
tasks (a few images, or one first image with its partners); the executor yields the workers' results, which are
plain arrays, and the stage's driver writes them through feature_backends/store.py. HDF5 takes one writer, so
there is one: the `.partial`-then-rename publishing and the resume from the published file are the local ones.

Why Ray rather than our own scheduler: it already places actors on a cluster's nodes, gives each its CPU and
(fractional) GPU share, restarts a dead actor and retries its tasks (`max_restarts`, `max_task_retries`), and
connects to an existing cluster by address. Ray is an optional extra (`pip install recon[distributed]`); it is
imported only when `--executor ray` is asked for.

Back-pressure: at most `workers x tasks_per_worker` tasks are in flight (`ray.wait` on the oldest), and tasks are
generated lazily, so the driver's memory does not grow with the number of images or pairs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal

from feature_backends.errors import ConfigError, ReconError
from feature_backends.threads import available_cores, ordered_map

from .options import option

logger = logging.getLogger(__name__)

#: Called as hook(pool, results_so_far, result) after every result of a Ray pool: a seam for fault-injection
#: tests and the benchmark's timings.
result_hooks: list[Callable[[Any, int, Any], None]] = []


@dataclass
class ExecutorOptions:
    executor: Literal["local", "ray"] = option(
        "local", flags=("--executor",),
        help="where extraction, retrieval descriptors and matching run: this process, or Ray actors "
             "(pip install recon[distributed])")
    workers: int | None = option(
        None, flags=("--workers",),
        help="ray: worker actors, each loading the model once (default: one per GPU of the cluster, else one per "
             "--cpus-per-worker CPUs); local: processes that match pairs on the CPU (default: one per core, at most "
             "16; 1: match in this process)")
    ray_address: str | None = option(
        None, flags=("--ray-address",),
        help="ray: address of an existing cluster (default: $RAY_ADDRESS, else a local instance sized to the "
             "machine)")
    cpus_per_worker: float = option(1.0, flags=("--cpus-per-worker",),
                                    help="ray: CPUs (and torch threads) per worker")
    gpus_per_worker: float | None = option(
        None, flags=("--gpus-per-worker",),
        help="ray: GPU share per worker, e.g. 0.5 for two workers per GPU (default: the cluster's GPUs spread over "
             "the workers, at most 1 each; 0 without GPUs)")
    tasks_per_worker: int = option(2, flags=("--tasks-per-worker",),
                                   help="ray: tasks queued per worker (bounds the driver's memory)")
    images_per_task: int = option(4, flags=("--images-per-task",),
                                  help="ray: images per extraction or retrieval-descriptor task")

    def check(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.tasks_per_worker < 1 or self.images_per_task < 1:
            raise ConfigError("--tasks-per-worker and --images-per-task must be at least 1")
        if self.executor == "ray":
            require_ray()


def require_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ConfigError("--executor ray needs Ray: pip install 'recon[distributed]' (or pip install ray)") \
            from error
    return ray


def run_tasks(options: ExecutorOptions | None, worker_class: type, worker_args: tuple,
              tasks: Iterable[Any], ordered: bool = False) -> Iterator[Any]:
    """`worker_class(*worker_args)(task)` for every task: in order here (local), in completion order on Ray, or
    in task order on Ray with `ordered` (for a driver whose result depends on the order: anchored dense)."""
    if options is None or options.executor == "local":
        worker = worker_class(*worker_args)
        for task in tasks:
            yield worker(task)
        return
    pool = RayPool(options, worker_class, worker_args)
    try:
        yield from pool.map_ordered(tasks) if ordered else pool.map(tasks)
    finally:
        pool.close()


#: Default ceiling of local processes (as verification's threads): each holds its own torch state and share of
#: the feature cache; --workers goes beyond.
MAX_LOCAL_PROCESSES = 16


def local_processes(options: ExecutorOptions | None) -> int:
    """How many processes local CPU work may fork: --workers, else one per core (at most MAX_LOCAL_PROCESSES); 1
    where fork is not used."""
    asked = options.workers if options is not None else None
    if not sys.platform.startswith("linux"):
        if asked is not None and asked > 1:
            logger.warning("--workers %d: local worker processes are forked, which recon does on Linux only; "
                           "running in this process", asked)
        return 1
    if asked is not None:
        return asked
    return min(available_cores(), MAX_LOCAL_PROCESSES)


class ProcessPool:
    """`worker_class(*worker_args)` built once in each of `count` forked processes (one torch thread each, Ctrl-C
    left to this process); `map` yields `worker(task)` for every task in task order, at most 2 x `count` tasks in
    flight. The processes fork when the pool is made: make it before opening HDF5 files here, so that no worker
    inherits an open one. A worker that dies (the out-of-memory killer, a crash in native code) ends the map with
    a one-line ReconError; what the driver wrote before stays."""

    def __init__(self, worker_class: type, worker_args: tuple, count: int, what: str = "work"):
        self.count, self.what = count, what
        self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_start_process_worker, initargs=(worker_class, worker_args))
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork in a process with threads; the workers only run torch on one
            # thread and read their own files, so no lock another thread holds is taken in them.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            try:
                self._broken_is_error(lambda: [self.pool.submit(os.getpid).result() for _ in range(count)])
            except BaseException:
                self.pool.shutdown(wait=False, cancel_futures=True)
                raise

    def map(self, tasks: Iterable[Any]) -> Iterator[Any]:
        results = ordered_map(_run_process_worker, tasks, self.count, executor=self.pool)
        while True:
            result = self._broken_is_error(lambda: next(results, _END))
            if result is _END:
                return
            yield result

    def _broken_is_error(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except BrokenProcessPool:
            raise ReconError(f"a {self.what} process died (out of memory? see dmesg); what was written is kept and a "
                             f"rerun resumes from it; --workers 1 runs it in this process") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_process_worker: Any = None
_process_error: BaseException | None = None


def _start_process_worker(worker_class: type, worker_args: tuple) -> None:
    global _process_worker, _process_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)
    try:
        _process_worker = worker_class(*worker_args)
    except Exception as error:  # raised with the first task, as itself rather than as a broken pool
        _process_error = error


def _run_process_worker(task: Any) -> Any:
    if _process_error is not None:
        raise _process_error
    return _process_worker(task)


def connect(options: ExecutorOptions):
    """Ray, initialised: the running instance, else the one at --ray-address / $RAY_ADDRESS, else a new local one
    (Ray sizes it to the machine). Kept for the rest of the process, so later stages reuse it."""
    ray = require_ray()
    if not ray.is_initialized():
        address = options.ray_address or os.environ.get("RAY_ADDRESS") or None
        logger.info("Starting Ray (%s)", address or "local instance")
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    return ray


def _host_class(ray):
    """The Ray actor class that hosts one worker object (defined here so the core never imports Ray)."""

    class Host:
        def __init__(self, worker_class, worker_args, threads):
            import torch

            torch.set_num_threads(max(1, int(threads)))
            self.worker = worker_class(*worker_args)

        def run(self, task):
            return self.worker(task)

        def pid(self) -> int:
            return os.getpid()

    return ray.remote(Host)


class RayPool:
    """A fixed set of worker actors fed with a bounded number of tasks in flight."""

    def __init__(self, options: ExecutorOptions, worker_class: type, worker_args: tuple):
        options.check()
        self.ray = connect(options)
        resources = self.ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        count = options.workers or (int(gpus) if gpus >= 1 else
                                    max(1, int(resources.get("CPU", 1) // options.cpus_per_worker)))
        share = options.gpus_per_worker
        if share is None:
            share = min(1.0, gpus / count) if gpus else 0.0
        host = _host_class(self.ray).options(num_cpus=options.cpus_per_worker, num_gpus=share,
                                             max_restarts=3, max_task_retries=3)
        self.actors = [host.remote(worker_class, worker_args, options.cpus_per_worker) for _ in range(count)]
        self.limit = count * options.tasks_per_worker
        logger.info("Ray: %d workers x %.3g CPU, %.3g GPU each", count, options.cpus_per_worker, share)

    def map(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """Results in completion order; each new task goes to the worker with the fewest in flight."""
        pending: dict[Any, int] = {}
        load = [0] * len(self.actors)
        queue = iter(tasks)
        exhausted, done_count = False, 0
        while True:
            while not exhausted and len(pending) < self.limit:
                task = next(queue, _END)
                if task is _END:
                    exhausted = True
                    break
                index = min(range(len(load)), key=load.__getitem__)
                pending[self.actors[index].run.remote(task)] = index
                load[index] += 1
            if not pending:
                return
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            load[pending.pop(ready[0])] -= 1
            result = self.ray.get(ready[0])
            done_count += 1
            for hook in result_hooks:
                hook(self, done_count, result)
            yield result

    def map_ordered(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """Results in task order. The bound counts finished results still waiting for an older one (they stay in
        Ray's object store until their turn), so the driver's memory stays bounded as in `map`; the price is
        that a slow task holds its window slots until it finishes."""
        window: deque[tuple[Any, int]] = deque()
        load = [0] * len(self.actors)
        queue = iter(tasks)
        done_count = 0
        while True:
            while len(window) < self.limit:
                task = next(queue, _END)
                if task is _END:
                    break
                index = min(range(len(load)), key=load.__getitem__)
                window.append((self.actors[index].run.remote(task), index))
                load[index] += 1
            if not window:
                return
            reference, index = window.popleft()
            result = self.ray.get(reference)
            load[index] -= 1
            done_count += 1
            for hook in result_hooks:
                hook(self, done_count, result)
            yield result

    def pids(self) -> list[int]:
        return self.ray.get([actor.pid.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


_END = object()
