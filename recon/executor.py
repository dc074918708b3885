"""Where a stage's work runs: in this process (`local`) or sharded over Ray actors (`ray`).

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
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from feature_backends.errors import ConfigError

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
             "--cpus-per-worker CPUs)")
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
