"""Retrieval pairs: global descriptors per image (global-feats.h5), then the top-K most similar images.

Matching cost grows as N*K instead of N^2/2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from feature_backends import registry
from feature_backends.errors import ImageReadError, InputError
from feature_backends.images import iter_images, list_images
from feature_backends.store import GlobalWriter, read_global_descriptors

from .io import deduplicate

logger = logging.getLogger(__name__)


def extract_global_descriptors(
    image_dir: str | Path,
    export_path: str | Path,
    backend: str = "vlad",
    conf: Mapping[str, Any] | None = None,
    image_list: Sequence[str] | None = None,
    device: Any = None,
) -> Path:
    """Write `/<name>/global_descriptor` for every image not yet in `export_path`; return the path."""
    names = list_images(image_dir, image_list)
    model = registry.get_backend("global", backend, conf, device=device)
    record = {"backend": backend, "conf": model.conf.to_dict()}
    with GlobalWriter(export_path, conf=record) as writer:
        todo = [name for name in names if name not in writer.names]
        if not todo:
            logger.info("Global descriptors: all %d images already in %s", len(names), export_path)
            return Path(export_path)
        model.prepare(str(image_dir), names)
        for name, image in tqdm(iter_images(image_dir, todo), total=len(todo), desc=f"global {backend}", unit="img"):
            if isinstance(image, ImageReadError):
                logger.warning("Skipping unreadable image %s: %s", name, image)
                continue
            writer.write(name, model.describe(image))
    return Path(export_path)


def top_k_pairs(
    descriptors_path: str | Path,
    num_matched: int,
    query_names: Sequence[str] | None = None,
    database_names: Sequence[str] | None = None,
    min_score: float | None = None,
) -> list[tuple[str, str]]:
    """Each query with its `num_matched` most similar database images (self excluded), de-duplicated."""
    if num_matched < 1:
        raise InputError("--num-matched must be at least 1")
    all_names, _ = read_global_descriptors(descriptors_path)
    queries, query_desc = read_global_descriptors(descriptors_path, query_names or all_names)
    database, db_desc = read_global_descriptors(descriptors_path, database_names or all_names)
    similarity = torch.from_numpy(query_desc) @ torch.from_numpy(db_desc).T
    db_index = {name: i for i, name in enumerate(database)}
    for qi, name in enumerate(queries):
        if name in db_index:
            similarity[qi, db_index[name]] = -float("inf")
    if min_score is not None:
        similarity[similarity < min_score] = -float("inf")
    k = min(num_matched, len(database))
    scores, indices = similarity.topk(k, dim=1)
    pairs = []
    for qi, name in enumerate(queries):
        for score, index in zip(scores[qi].tolist(), indices[qi].tolist()):
            if np.isfinite(score):
                pairs.append((name, database[index]))
    return deduplicate(pairs)


def neighbours(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Pair list → each image's partners, in pair order (used for loop closure candidates)."""
    out: dict[str, list[str]] = {}
    for name0, name1 in pairs:
        out.setdefault(name0, []).append(name1)
    return out
