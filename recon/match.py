"""The sparse matching stage, shaped like hloc's match_features: pairs + features.h5 in, matches.h5 out.

`match(options, pairs_path, features_path, matches_path)` writes matches.h5 for every pair not already in it.
`options` is a `MatchOptions` or a backend conf (`{"name": "mnn", **conf}`). The matcher's conf starts from what
the features imply (`SparseMatcher.conf_for_features`, read from the record in features.h5: LightGlue's weights,
DeDoDe's steerer), and the configuration is recorded in matches.h5 so a resume with another one is refused.
Dense matchers (`roma`, `sift+roma`) have their own stage, recon.dense.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from feature_backends import registry
from feature_backends.store import FeatureReader, MatchWriter, read_stored_conf
from pairs.io import check_names, read_pairs

from .cache import ByteBudgetCache
from .executor import ExecutorOptions, ProcessPool, local_processes, run_tasks
from .options import option

logger = logging.getLogger(__name__)


def _matcher_help() -> str:
    return (f"sparse ({', '.join(registry.names('matcher'))}), dense ({', '.join(registry.names('dense'))}), "
            "or anchored dense FEATURES+DENSE (e.g. sift+roma, dad+roma)")


@dataclass
class MatchOptions:
    matcher: str = option("mnn", flags=("--matcher",), help=_matcher_help)
    conf: dict = option(default_factory=dict, flags=("--conf",), run_flags=("--matcher-conf",),
                        help="matcher option (repeatable; JSON values), e.g. ratio_threshold=0.9")
    ratio: float | None = option(None, flags=("--ratio",), help="mnn: Lowe ratio threshold")

    def backend_conf(self) -> dict[str, Any]:
        conf = dict(self.conf)
        if self.ratio is not None:
            conf["ratio_threshold"] = self.ratio
        return {"name": self.matcher, **conf}


class MatchWorker:
    """One matcher, loaded once; called with (name0, features0, [(name1, features1), ...]), returns
    (name0, [(name1, result), ...]). The same code runs in this process and in a Ray actor (recon.executor)."""

    def __init__(self, name: str, conf: Mapping[str, Any], device: Any):
        self.model = registry.get_backend("matcher", name, conf, device=device)

    def __call__(self, task):
        name0, features0, others = task
        results = self.model.match_many(features0, [features1 for _, features1 in others])
        return name0, [(name1, result) for (name1, _), result in zip(others, results)]


#: Pairs per task of a local process pool: large enough to batch the products (and amortise the pipe), small
#: enough to spread an image's partners over the processes.
PAIRS_PER_TASK = 8

#: Decoded features the driver and each local process keep in memory, together.
CACHE_BYTES = 1 << 30


class StoredFeaturesMatchWorker:
    """A MatchWorker in a local process: it reads the features from features.h5 itself (through the store), so a
    task is (name0, [name1, ...]) and only names and matches cross the pipe."""

    def __init__(self, name: str, conf: Mapping[str, Any], features_path: Path, max_bytes: int):
        self.worker = MatchWorker(name, conf, "cpu")
        self.reader = FeatureReader(features_path)
        self.cache = ByteBudgetCache(self.reader.read, max_bytes=max_bytes)

    def __call__(self, task):
        name0, partners = task
        return self.worker((name0, self.cache[name0], [(name1, self.cache[name1]) for name1 in partners]))


def match(
    options: MatchOptions | Mapping[str, Any] | str,
    pairs_path: str | Path,
    features_path: str | Path,
    matches_path: str | Path,
    device: Any = None,
    executor: ExecutorOptions | None = None,
) -> Path:
    """Write matches.h5 for every pair not in it yet. `executor`: where the matcher runs (recon.executor); with Ray,
    the groups of pairs sharing a first image are sharded over workers, which get the features from here (no
    shared file system needed) and return the matches, written here by the one writer. Locally on the CPU, the
    pairs go to one forked process per core (`--workers`), which read the features themselves."""
    if isinstance(options, MatchOptions):
        options = options.backend_conf()
    distributed = executor is not None and executor.executor != "local"
    name, backend_conf = registry.split_conf(options)
    pairs = read_pairs(pairs_path)
    matcher_class, _ = registry.resolve("matcher", name)
    implied = matcher_class.conf_for_features(read_stored_conf(features_path))
    conf = {**implied, **backend_conf}
    worker = MatchWorker(name, conf, "cpu" if distributed else device)
    record = {"backend": name, "conf": worker.model.conf.to_dict()}
    processes = 1 if distributed or worker.model.device.type != "cpu" or len(pairs) <= PAIRS_PER_TASK else \
        local_processes(executor)
    cache_bytes = CACHE_BYTES // (processes + 1) if processes > 1 else CACHE_BYTES
    pool = _process_pool(processes, (name, conf, Path(features_path), cache_bytes))
    logger.info("Matching %d pairs with %s%s: %s", len(pairs), name,
                f" on {processes} processes" if pool is not None else "", record["conf"])
    with pool or nullcontext(), FeatureReader(features_path) as reader:
        check_names(pairs, reader.names(), f"pairs file '{pairs_path}'")
        # Pairs revisit the same images. With matching processes, which read their own features, the driver only
        # needs the keypoint counts (batches, featureless images).
        load = reader.read if pool is None else functools.partial(reader.read, keys=["keypoints"])
        cache = ByteBudgetCache(load, max_bytes=cache_bytes)
        with MatchWriter(matches_path, conf=record) as writer:
            current = {name: reader.fingerprint(name) for name in sorted({n for pair in pairs for n in pair})}
            stale = writer.adopt_features(current)
            if stale:
                logger.warning("Recomputing the stored pairs of %d image(s) whose features changed since %s was "
                               "written: %s", len(stale), matches_path, ", ".join(sorted(stale)[:5]))
            todo = _write_featureless(writer, pending_pairs(writer, pairs, matches_path), cache)
            batches = _batches_by_first_image(todo, cache)
            if pool is not None:
                results = pool.map((name0, partners[start:start + PAIRS_PER_TASK]) for name0, partners in batches
                                   for start in range(0, len(partners), PAIRS_PER_TASK))
            else:
                tasks = ((name0, cache[name0], [(name1, cache[name1]) for name1 in partners])
                         for name0, partners in batches)
                results = run_tasks(executor, MatchWorker, (name, conf, device), tasks) if distributed else \
                    map(worker, tasks)
            progress = tqdm(total=len(todo), desc=f"match {name}", unit="pair")
            for name0, matched in results:
                for name1, result in matched:
                    writer.write(name0, name1, result)
                progress.update(len(matched))
            progress.close()
    return Path(matches_path)


def _process_pool(processes: int, worker_args: tuple) -> ProcessPool | None:
    """The local processes that match, or None to match here (one process asked for, or none can be forked:
    e.g. a container without /dev/shm for the pool's semaphores)."""
    if processes <= 1:
        return None
    try:
        return ProcessPool(StoredFeaturesMatchWorker, worker_args, processes, "matching")
    except OSError as error:
        logger.warning("Matching in this process: cannot start %d matching processes (%s)", processes, error)
        return None


def pending_pairs(writer, pairs, matches_path) -> list[tuple[str, str]]:
    """The pairs a match stage still has to compute (in the given order), saying so when it resumes."""
    todo = [pair for pair in pairs if not writer.has(*pair)]
    if len(todo) < len(pairs):
        logger.info("Resuming: %d of %d pairs already in %s", len(pairs) - len(todo), len(pairs), matches_path)
    return todo


def _write_featureless(writer, pairs, cache: ByteBudgetCache) -> list[tuple[str, str]]:
    """Write the (empty) matches of pairs where an image has no keypoints; return the other pairs."""
    rest = []
    for name0, name1 in pairs:
        if len(cache[name0]["keypoints"]) and len(cache[name1]["keypoints"]):
            rest.append((name0, name1))
        else:
            count = len(cache[name0]["keypoints"])
            writer.write(name0, name1, {"matches0": np.full(count, -1, np.int32),
                                        "matching_scores0": np.zeros(count, np.float32)})
    return rest


def _batches_by_first_image(pairs, cache: ByteBudgetCache, max_elements: int = 1 << 25):
    """(name0, [name1, ...]) groups in pair order, each small enough that one batched similarity matrix
    (keypoints of name0 x partners x their largest keypoint count) stays under `max_elements`."""
    groups: dict[str, list[str]] = {}
    for name0, name1 in pairs:
        groups.setdefault(name0, []).append(name1)
    for name0, partners in groups.items():
        rows = max(1, len(cache[name0]["keypoints"]))
        batch: list[str] = []
        widest = 0
        for name1 in partners:
            width = max(widest, len(cache[name1]["keypoints"]))
            if batch and rows * width * (len(batch) + 1) > max_elements:
                yield name0, batch
                batch, width = [], len(cache[name1]["keypoints"])
            batch.append(name1)
            widest = width
        if batch:
            yield name0, batch
