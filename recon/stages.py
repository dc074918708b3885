"""The feature stages, shaped like hloc's: paths in, path out, resumable.

- `extract(conf, image_dir, export_path)` writes features.h5 for every image not already in it.
- `match(conf, pairs_path, features_path, matches_path)` writes matches.h5 for every pair not already in it.

`conf` is `{"name": backend, **backend_conf}` (or hloc's `{"model": {"name": ...}, "preprocessing": {...}}`).
The backend configuration is recorded in the output file; resuming with a different one is refused instead of
silently mixing two configurations in one file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from feature_backends import registry
from feature_backends.errors import ConfigError, ImageReadError
from feature_backends.images import iter_images, list_images
from feature_backends.store import FeatureReader, FeatureWriter, MatchWriter, read_stored_conf
from pairs.io import check_names, read_pairs

from .memo import ByteBudgetCache

logger = logging.getLogger(__name__)


def split_conf(conf: Mapping[str, Any] | str) -> tuple[str, dict[str, Any]]:
    """`{"name": ..., **rest}` or hloc's `{"model": {...}, "preprocessing": {...}}` → (name, backend conf)."""
    if isinstance(conf, str):
        return conf, {}
    conf = dict(conf)
    if "model" in conf:
        model = dict(conf.pop("model"))
        preprocessing = dict(conf.pop("preprocessing", {}) or {})
        conf.pop("output", None)
        conf = {**model, **{k: v for k, v in preprocessing.items() if k in ("resize_max", "resize_force", "grayscale")}, **conf}
    if "name" not in conf:
        raise ConfigError("a stage configuration needs a backend 'name'")
    name = conf.pop("name")
    return name, conf


def extract(
    conf: Mapping[str, Any] | str,
    image_dir: str | Path,
    export_path: str | Path,
    image_list: Sequence[str] | None = None,
    device: Any = None,
    as_half: bool = False,
) -> Path:
    name, backend_conf = split_conf(conf)
    model = registry.get_backend("features", name, backend_conf, device=device)
    names = list_images(image_dir, image_list)
    logger.info("Extracting %s features: %s", name, model.conf.to_dict())
    record = {"backend": name, "conf": model.conf.to_dict()}
    with FeatureWriter(export_path, conf=record, as_half=as_half) as writer:
        todo = [n for n in names if n not in writer.names]
        if len(todo) < len(names):
            logger.info("Resuming: %d of %d images already in %s", len(names) - len(todo), len(names), export_path)
        skipped = []
        progress = tqdm(iter_images(image_dir, todo, grayscale=model.conf.grayscale), total=len(todo),
                        desc=f"extract {name}", unit="img")
        for image_name, image in progress:
            if isinstance(image, ImageReadError):
                logger.warning("Skipping %s: %s", image_name, image)
                skipped.append(image_name)
                continue
            writer.write(image_name, model.extract(image))
    if skipped:
        logger.warning("%d unreadable images were skipped: %s", len(skipped), ", ".join(skipped[:10]))
    return Path(export_path)


def match(
    conf: Mapping[str, Any] | str,
    pairs_path: str | Path,
    features_path: str | Path,
    matches_path: str | Path,
    device: Any = None,
) -> Path:
    name, backend_conf = split_conf(conf)
    pairs = read_pairs(pairs_path)
    matcher_class, _ = registry.resolve("matcher", name)
    implied = matcher_class.conf_for_features(read_stored_conf(features_path))
    model = registry.get_backend("matcher", name, {**implied, **backend_conf}, device=device)
    logger.info("Matching %d pairs with %s: %s", len(pairs), name, model.conf.to_dict())
    record = {"backend": name, "conf": model.conf.to_dict()}
    with FeatureReader(features_path) as reader:
        check_names(pairs, reader.names(), f"pairs file '{pairs_path}'")
        cache = ByteBudgetCache(reader.read, max_bytes=1 << 30)  # pairs revisit the same images
        with MatchWriter(matches_path, conf=record) as writer:
            todo = pending_pairs(writer, pairs, matches_path)
            progress = tqdm(total=len(todo), desc=f"match {name}", unit="pair")
            for name0, partners in _batches_by_first_image(todo, cache):
                results = model.match_many(cache[name0], [cache[name1] for name1 in partners])
                for name1, result in zip(partners, results):
                    writer.write(name0, name1, result)
                progress.update(len(partners))
            progress.close()
    return Path(matches_path)


def pending_pairs(writer, pairs, matches_path) -> list[tuple[str, str]]:
    """The pairs a match stage still has to compute (in the given order), saying so when it resumes."""
    todo = [pair for pair in pairs if not writer.has(*pair)]
    if len(todo) < len(pairs):
        logger.info("Resuming: %d of %d pairs already in %s", len(pairs) - len(todo), len(pairs), matches_path)
    return todo


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
