"""The extraction stage, shaped like hloc's extract_features: images in, features.h5 out, resumable.

`extract(options, image_dir, export_path)` writes features.h5 for every image not already in it. `options` is an
`ExtractOptions`, or a backend conf: `{"name": backend, **backend_conf}` or hloc's
`{"model": {"name": ...}, "preprocessing": {...}}`. The backend configuration is recorded in the output file;
resuming with a different one is refused instead of silently mixing two configurations in one file.

Masks (`mask_dir`, COLMAP's convention): `<mask_dir>/<image name>.png`, same size as the upright image, zero =
ignore. Keypoints on a zero pixel are dropped here, once for every backend; an image without a mask file keeps
all of its keypoints (as COLMAP does). The dense stage samples no match on a masked pixel (recon.dense).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from feature_backends import registry
from feature_backends.errors import ImageReadError, InputError
from feature_backends.images import describe_skipped, iter_images, list_images, map_images
from feature_backends.store import FeatureWriter

from .executor import ExecutorOptions, run_tasks
from .options import option

logger = logging.getLogger(__name__)


@dataclass
class ExtractOptions:
    features: str = option(
        "sift", flags=("--features",),
        help=lambda: f"local features: {', '.join(registry.names('features'))}, or package.module:Class")
    conf: dict = option(default_factory=dict, flags=("--conf",),
                        help="feature backend option (repeatable; JSON values, dotted keys), e.g. nfeatures=8000")
    max_keypoints: int | None = option(None, flags=("--max-keypoints",), help="keypoints per image (backend default)")
    resize_max: int | None = option(None, flags=("--resize-max",),
                                    help="longer image side the detector sees, in px (backend default)")
    weights: str | None = option(None, flags=("--weights",), help="explicit weight file for the feature backend")
    as_half: bool = option(False, flags=("--as-half",), help="store descriptors as float16 (keypoints stay float32)")
    mask_dir: Path | None = option(None, flags=("--masks",),
                                   help="folder of masks <image name>.png (COLMAP's convention: zero = ignore); "
                                        "no keypoint or dense match is kept on a masked pixel")

    def backend_conf(self) -> dict[str, Any]:
        """`{"name": features, **conf}` with the named flags folded in."""
        conf = dict(self.conf)
        for key in ("max_keypoints", "resize_max", "weights"):
            if getattr(self, key) is not None:
                conf[key] = getattr(self, key)
        return {"name": self.features, **conf}


def mask_path(mask_dir: str | Path, name: str) -> Path:
    return Path(mask_dir) / f"{name}.png"


def load_mask(mask_dir: str | Path | None, name: str, size: tuple[int, int]) -> np.ndarray | None:
    """The boolean keep-mask (H,W) of image `name` of (width, height) `size`, or None without a mask file."""
    if mask_dir is None:
        return None
    path = mask_path(mask_dir, name)
    if not path.is_file():
        return None
    mask = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InputError(f"cannot read mask '{path}'; masks are 8-bit PNGs, zero = ignore")
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise InputError(f"mask '{path}' is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}; "
                         "a mask must have the size of the upright image")
    return mask > 0


def inside_mask(points: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Which points (N,2), hloc convention (pixel centres at integers), lie on a kept pixel of `mask`."""
    if mask is None:
        return np.ones(len(points), bool)
    height, width = mask.shape
    x = np.clip(np.round(points[:, 0]).astype(np.int64), 0, width - 1)
    y = np.clip(np.round(points[:, 1]).astype(np.int64), 0, height - 1)
    return mask[y, x]


def drop_masked(features: dict[str, np.ndarray], mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """The features without the keypoints on masked pixels (descriptors are (D,N), other arrays (N,...))."""
    if mask is None:
        return features
    keep = inside_mask(features["keypoints"], mask)
    count = len(keep)
    out = {}
    for key, value in features.items():
        if key == "descriptors":
            out[key] = value[:, keep]
        elif key != "image_size" and getattr(value, "shape", ()) and value.shape[0] == count:
            out[key] = value[keep]
        else:
            out[key] = value
    return out


class ExtractWorker:
    """One model, loaded once; called with a few image names, returns (name, features | error text, uncertainty)
    for each. The same code runs in this process and in a Ray actor (recon.executor)."""

    def __init__(self, backend_conf: Mapping[str, Any], device: Any, image_dir: str | Path,
                 mask_dir: str | Path | None):
        name, conf = registry.split_conf(backend_conf)
        self.model = registry.get_backend("features", name, conf, device=device)
        self.image_dir, self.mask_dir = Path(image_dir), mask_dir

    def __call__(self, names: Sequence[str]) -> list[tuple[str, dict[str, np.ndarray] | str, float | None]]:
        grayscale = self.model.conf.grayscale
        return [self.one(name, image) for name, image in iter_images(self.image_dir, names, grayscale, prefetch=1)]

    def one(self, name: str, image: np.ndarray | ImageReadError):
        if isinstance(image, ImageReadError):
            return name, str(image), None
        height, width = image.shape[:2]
        features = drop_masked(self.model.extract(image), load_mask(self.mask_dir, name, (width, height)))
        return name, features, self.model.keypoint_uncertainty(width, height)


@contextlib.contextmanager
def _opencv_threads(count: int | None):
    """OpenCV's thread count set to `count` (None: unchanged) while the block runs, then restored."""
    if count is None:
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _chunks(names: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(names), size):
        yield list(names[start:start + size])


def extract(
    options: ExtractOptions | Mapping[str, Any] | str,
    image_dir: str | Path,
    export_path: str | Path,
    image_list: Sequence[str] | None = None,
    device: Any = None,
    as_half: bool | None = None,
    mask_dir: str | Path | None = None,
    executor: ExecutorOptions | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> Path:
    """Write features.h5 for every image not in it yet. `executor`: where the model runs (recon.executor); with
    Ray, images are sharded over workers and the results written here, by the one writer. An image that cannot be
    decoded is named in one warning and skipped (appended to `skipped` as {"file", "reason"})."""
    skipped = [] if skipped is None else skipped
    if isinstance(options, ExtractOptions):
        as_half = options.as_half if as_half is None else as_half
        mask_dir = options.mask_dir if mask_dir is None else mask_dir
        options = options.backend_conf()
    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise InputError(f"mask folder '{mask_dir}' does not exist")
    distributed = executor is not None and executor.executor != "local"
    name, backend_conf = registry.split_conf(options)
    # The driver's own model only records the configuration when workers elsewhere do the work: keep it on CPU.
    worker = ExtractWorker(options, "cpu" if distributed else device, image_dir, mask_dir)
    names = list_images(image_dir, image_list)
    logger.info("Extracting %s features: %s", name, worker.model.conf.to_dict())
    record = {"backend": name, "conf": worker.model.conf.to_dict()}
    if mask_dir is not None:
        record["masks"] = str(Path(mask_dir).resolve())
    with FeatureWriter(export_path, conf=record, as_half=bool(as_half)) as writer:
        todo = [n for n in names if n not in writer.names]
        if len(todo) < len(names):
            logger.info("Resuming: %d of %d images already in %s", len(names) - len(todo), len(names), export_path)
        threads = 1 if distributed or len(todo) < 2 else worker.model.parallel_images()
        if distributed:
            chunks = run_tasks(executor, ExtractWorker, (options, device, image_dir, mask_dir),
                               _chunks(todo, executor.images_per_task))
            results = (item for chunk in chunks for item in chunk)
        elif threads > 1:
            results = map_images(worker.one, image_dir, todo, worker.model.conf.grayscale, workers=threads)
        else:
            images = iter_images(image_dir, todo, grayscale=worker.model.conf.grayscale)
            results = (worker.one(image_name, image) for image_name, image in images)
        with _opencv_threads(1 if threads > 1 else None):
            for image_name, features, uncertainty in tqdm(results, total=len(todo), desc=f"extract {name}",
                                                          unit="img"):
                if isinstance(features, str):
                    skipped.append({"file": image_name, "reason": features})
                    continue
                writer.write(image_name, features, uncertainty=uncertainty)
    if skipped:
        logger.warning("Skipped %d image(s) that cannot be decoded: %s", len(skipped), describe_skipped(skipped))
    return Path(export_path)
