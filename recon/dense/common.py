"""What both dense keypoint modes share: the per-image encoding cache and the pair order that keeps it useful."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from feature_backends.images import read_image

from ..cache import SpillCache

# Per-image encodings (e.g. RoMa's encoder features, ~0.5 GB per image at 560/864 in float32) kept in host memory
# for the pairs that revisit an image; the two images of the current pair are always kept whatever their size.
ENCODED_CACHE_BYTES = 2 << 30
#: Share of the GPU's free memory (measured when the stage starts, after the model is loaded) given to cached
#: encodings; the rest is left to the decoder's activations for one pair and to other processes on the GPU.
DEVICE_CACHE_FRACTION = 0.5


def device_budget(device: torch.device) -> int | None:
    """Bytes of encodings to keep on `device`: DEVICE_CACHE_FRACTION of its free memory now
    (torch.cuda.mem_get_info), so the budget follows the card and what else runs on it instead of a constant.
    None for the CPU, where the device is host memory."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_CACHE_FRACTION)


def _moved(value: dict, device) -> dict:
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in value.items()}


def encoded_images(model, image_dir: Path, max_bytes: int = ENCODED_CACHE_BYTES) -> SpillCache:
    """Image name → the backend's per-image encoding (`DenseMatcher.encode`: the decoded image by default).

    On a GPU, encodings stay on the device within `device_budget` and spill over to host memory within
    `max_bytes` (tensors moved, arrays as they are); on the CPU there is one tier of `max_bytes`."""
    device = getattr(model, "device", torch.device("cpu"))
    budget = device_budget(device)
    load = lambda name: model.encode(read_image(Path(image_dir) / name))  # noqa: E731
    if budget is None:
        return SpillCache(load, max_bytes, 0, spill=lambda value: value, unspill=lambda value: value)
    return SpillCache(load, budget, max_bytes, spill=lambda value: _moved(value, "cpu"),
                      unspill=lambda value: _moved(value, device))


def grouped_by_first_image(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs reordered so that those sharing their first image are consecutive (first appearance order): with
    an LRU cache of encodings, the first image of a group is encoded once for all its partners."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        groups.setdefault(pair[0], []).append(pair)
    return [pair for group in groups.values() for pair in group]
