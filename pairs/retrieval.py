"""Retrieval pairs: global descriptors per image (global-feats.h5), then the top-K most similar images.

Matching cost grows as N·K instead of N²/2. Similarities are computed in blocks of queries, so memory stays
O(block·N) and 10⁴-10⁵ images need no index library (faiss is not a dependency; an exact matrix product over
4096-D float32 descriptors is a few seconds for 10⁴ images on CPU). Everything here is deterministic: ties are
broken by database order.

Extraction resumes from the images already stored and, for learned backends, batches images of the same size
(on CUDA; one by one on CPU, where batching gains nothing and costs memory). With `--executor ray` the images are
sharded over workers like the extraction stage's (recon.executor); what is fitted on the whole collection
(VLAD's codebook) is fitted once here and shipped to the workers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from feature_backends import registry
from feature_backends.errors import ImageReadError, InputError
from feature_backends.images import iter_images, list_images
from feature_backends.store import GlobalWriter

from recon.executor import ExecutorOptions, run_tasks

from .io import pair_key

logger = logging.getLogger(__name__)

QUERY_BLOCK = 1024

ScoredPair = tuple[str, str, float]


class GlobalWorker:
    """One global backend, loaded once, with the collection's fitted state (`prepared_state` of the driver's
    instance: VLAD's codebook); called with image names, returns (name, descriptor | error text) for each. The
    same code runs in this process and in a Ray actor (recon.executor)."""

    def __init__(self, backend: str, conf: Mapping[str, Any] | None, device: Any, image_dir: str | Path,
                 state: Mapping[str, np.ndarray] | None = None, batch_size: int | None = None, model=None):
        self.model = model or registry.get_backend("global", backend, conf, device=device)
        if state:
            self.model.load_prepared_state(dict(state))
        self.image_dir = Path(image_dir)
        batched = hasattr(self.model, "describe_batch")
        self.batch_size = batch_size or (self.model.preferred_batch_size() if batched else 1)
        if self.batch_size > 1 and not batched:
            raise InputError(f"global backend '{backend}' cannot batch; use batch_size 1")

    def __call__(self, names: Sequence[str]) -> list[tuple[str, np.ndarray | str]]:
        return list(self.describe(names))

    def describe(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray | str]]:
        """Descriptors in batches of same-size images: images wait in one bucket per size until it is full; the
        buckets are bounded in number by the distinct sizes in flight, and all are flushed at the end."""
        buckets: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = defaultdict(list)

        def flush(key: tuple[int, ...]):
            items = buckets.pop(key, [])
            if self.batch_size > 1:
                descriptors = self.model.describe_batch([image for _, image in items]) if items else []
            else:
                descriptors = [self.model.describe(image) for _, image in items]
            yield from ((name, descriptor) for (name, _), descriptor in zip(items, descriptors))

        for name, image in iter_images(self.image_dir, names):
            if isinstance(image, ImageReadError):
                yield name, str(image)
                continue
            buckets[image.shape].append((name, image))
            if len(buckets[image.shape]) >= self.batch_size:
                yield from flush(image.shape)
            elif sum(len(b) for b in buckets.values()) >= 4 * self.batch_size:
                yield from flush(max(buckets, key=lambda k: len(buckets[k])))
        for key in list(buckets):
            yield from flush(key)


def extract_global_descriptors(
    image_dir: str | Path,
    export_path: str | Path,
    backend: str = "vlad",
    conf: Mapping[str, Any] | None = None,
    image_list: Sequence[str] | None = None,
    device: Any = None,
    batch_size: int | None = None,
    executor: ExecutorOptions | None = None,
) -> Path:
    """Write `/<name>/global_descriptor` for every image not yet in `export_path`; return the path.

    `batch_size` None picks the backend's preference (8 on CUDA for learned models, else 1). `executor`
    (recon.executor): with Ray, the collection-dependent state is fitted here (VLAD's codebook: `prepare`), the
    per-image descriptors are computed on the workers (images sharded as in extraction) and written here.
    """
    names = list_images(image_dir, image_list)
    distributed = executor is not None and executor.executor != "local"
    # With Ray workers, the driver's model only fits the state and records the configuration: keep it on CPU.
    model = registry.get_backend("global", backend, conf, device="cpu" if distributed else device)
    record = {"backend": backend, "conf": model.conf.to_dict()}
    local = GlobalWorker(backend, conf, device, image_dir, batch_size=batch_size, model=model)
    with GlobalWriter(export_path, conf=record) as writer:
        todo = [name for name in names if name not in writer.names]
        if not todo:
            logger.info("Global descriptors: all %d images already in %s", len(names), export_path)
            return Path(export_path)
        logger.info("Global descriptors (%s): %d to compute, %d already stored", backend, len(todo),
                    len(names) - len(todo))
        model.prepare(str(image_dir), names)
        if distributed:
            state = model.prepared_state()
            tasks = (todo[start:start + executor.images_per_task]
                     for start in range(0, len(todo), executor.images_per_task))
            chunks = run_tasks(executor, GlobalWorker, (backend, conf, device, image_dir, state, batch_size), tasks)
            results = (item for chunk in chunks for item in chunk)
        else:
            results = local.describe(todo)
        for name, descriptor in tqdm(results, total=len(todo), desc=f"global {backend}", unit="img"):
            if isinstance(descriptor, str):
                logger.warning("Skipping unreadable image %s: %s", name, descriptor)
                continue
            writer.write(name, descriptor)
    return Path(export_path)


def retrieve(
    query_names: Sequence[str],
    query_descriptors: np.ndarray,
    database_names: Sequence[str],
    database_descriptors: np.ndarray,
    num_matched: int,
    min_score: float | None = None,
    allowed: Mapping[str, Iterable[str]] | None = None,
    always_allowed: Iterable[str] = (),
) -> list[ScoredPair]:
    """For each query, its `num_matched` most similar database images (never itself), with their scores.

    `allowed[query]`, when present, restricts that query's candidates to those names plus `always_allowed`
    (e.g. its GPS neighbours plus the images without GPS); queries absent from `allowed` are unrestricted.
    """
    if num_matched < 1:
        raise InputError("--num-matched must be at least 1")
    if len(query_names) == 0 or len(database_names) == 0:
        return []
    if query_descriptors.shape[1] != database_descriptors.shape[1]:
        raise InputError(
            f"query and database descriptors differ in size ({query_descriptors.shape[1]} vs "
            f"{database_descriptors.shape[1]}): they come from different backends"
        )
    db_index = {name: i for i, name in enumerate(database_names)}
    database = torch.from_numpy(np.ascontiguousarray(database_descriptors, dtype=np.float32))
    k = min(num_matched, len(database_names))
    base_mask = torch.zeros(len(database_names), dtype=torch.bool)
    base_mask[[db_index[name] for name in always_allowed if name in db_index]] = True
    results: list[ScoredPair] = []
    for start in range(0, len(query_names), QUERY_BLOCK):
        block_names = query_names[start:start + QUERY_BLOCK]
        block = torch.from_numpy(np.ascontiguousarray(query_descriptors[start:start + QUERY_BLOCK], dtype=np.float32))
        similarity = block @ database.T
        for row, name in enumerate(block_names):
            if name in db_index:
                similarity[row, db_index[name]] = -torch.inf
            if allowed is not None and name in allowed:
                keep = base_mask.clone()
                keep[[db_index[other] for other in allowed[name] if other in db_index]] = True
                similarity[row, ~keep] = -torch.inf
        if min_score is not None:
            similarity[similarity < min_score] = -torch.inf
        scores, indices = similarity.topk(k, dim=1, sorted=True)
        for row, name in enumerate(block_names):
            for score, index in zip(scores[row].tolist(), indices[row].tolist()):
                if np.isfinite(score):
                    results.append((name, database_names[index], float(score)))
    return results


def cap_per_image(scored: Sequence[ScoredPair], max_pairs_per_image: int | None) -> list[ScoredPair]:
    """Symmetric de-duplication, then at most `max_pairs_per_image` pairs touching any one image.

    Pairs are admitted greedily from the most similar down, so each image keeps its strongest links; a pair is
    dropped when either image is already full. The cap bounds the matching load of "hub" images that look like
    everything (sky, façades) and would otherwise be in hundreds of pairs.
    """
    if max_pairs_per_image is not None and max_pairs_per_image < 1:
        raise InputError("--max-pairs-per-image must be at least 1")
    best: dict[tuple[str, str], ScoredPair] = {}
    for name0, name1, score in scored:
        if name0 == name1:
            continue
        key = pair_key(name0, name1)
        if key not in best:
            best[key] = (name0, name1, score)
        elif score > best[key][2]:
            best[key] = (best[key][0], best[key][1], score)
    if not max_pairs_per_image:
        return list(best.values())
    pairs = sorted(best.values(), key=lambda pair: -pair[2])
    count: dict[str, int] = defaultdict(int)
    kept = []
    for name0, name1, score in pairs:
        if count[name0] < max_pairs_per_image and count[name1] < max_pairs_per_image:
            count[name0] += 1
            count[name1] += 1
            kept.append((name0, name1, score))
    return kept
