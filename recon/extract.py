"""The extraction stage, shaped like hloc's extract_features: images in, features.h5 out, resumable.

`extract(options, image_dir, export_path)` writes features.h5 for every image not already in it. `options` is an
`ExtractOptions`, or a backend conf: `{"name": backend, **backend_conf}` or hloc's
`{"model": {"name": ...}, "preprocessing": {...}}`. The backend configuration is recorded in the output file;
resuming with a different one is refused instead of silently mixing two configurations in one file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from feature_backends import registry
from feature_backends.errors import ImageReadError
from feature_backends.images import iter_images, list_images
from feature_backends.store import FeatureWriter

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

    def backend_conf(self) -> dict[str, Any]:
        """`{"name": features, **conf}` with the named flags folded in."""
        conf = dict(self.conf)
        for key in ("max_keypoints", "resize_max", "weights"):
            if getattr(self, key) is not None:
                conf[key] = getattr(self, key)
        return {"name": self.features, **conf}


def extract(
    options: ExtractOptions | Mapping[str, Any] | str,
    image_dir: str | Path,
    export_path: str | Path,
    image_list: Sequence[str] | None = None,
    device: Any = None,
    as_half: bool | None = None,
) -> Path:
    if isinstance(options, ExtractOptions):
        as_half = options.as_half if as_half is None else as_half
        options = options.backend_conf()
    name, backend_conf = registry.split_conf(options)
    model = registry.get_backend("features", name, backend_conf, device=device)
    names = list_images(image_dir, image_list)
    logger.info("Extracting %s features: %s", name, model.conf.to_dict())
    record = {"backend": name, "conf": model.conf.to_dict()}
    with FeatureWriter(export_path, conf=record, as_half=bool(as_half)) as writer:
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
            height, width = image.shape[:2]
            writer.write(image_name, model.extract(image), uncertainty=model.keypoint_uncertainty(width, height))
    if skipped:
        logger.warning("%d unreadable images were skipped: %s", len(skipped), ", ".join(skipped[:10]))
    return Path(export_path)
