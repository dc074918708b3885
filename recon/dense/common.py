"""What both dense keypoint modes share: the per-image encoding cache and the pair order that keeps it useful."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from feature_backends.images import read_image

from ..cache import ByteBudgetCache

# Per-image encodings (e.g. RoMa's encoder features, ~0.5 GB per image at 560/864 in float32) kept for the
# pairs that revisit an image; the two images of the current pair are always kept whatever their size.
ENCODED_CACHE_BYTES = 2 << 30


def encoded_images(model, image_dir: Path, max_bytes: int = ENCODED_CACHE_BYTES) -> ByteBudgetCache:
    """Image name → the backend's per-image encoding (`DenseMatcher.encode`: the decoded image by default)."""
    return ByteBudgetCache(lambda name: model.encode(read_image(Path(image_dir) / name)), max_bytes=max_bytes)


def grouped_by_first_image(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs reordered so that those sharing their first image are consecutive (first appearance order): with
    an LRU cache of encodings, the first image of a group is encoded once for all its partners."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        groups.setdefault(pair[0], []).append(pair)
    return [pair for group in groups.values() for pair in group]
