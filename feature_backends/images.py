"""Image ingestion: one policy for every stage.

Every backend, the COLMAP import and the exports see an image the same way: EXIF orientation applied (hloc
ignores it, COLMAP 4 applies it, nerfstudio does either depending on the path; mixing them rotates the same photo
differently in matching and SfM), grayscale / RGBA / 16-bit PNG and TIFF converted to float RGB in [0, 1],
names taken relative to the image folder with '/' separators so nested folders and non-ASCII names survive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".pgm", ".ppm", ".pnm"})

# PIL's EXIF orientation values → the numpy operation that undoes them.
_EXIF_ORIENTATION_TAG = 0x0112


def list_images(image_dir: str | Path, image_list: Sequence[str] | None = None) -> list[str]:
    """Relative '/'-separated names of all images below `image_dir` (recursive, sorted).

    With `image_list`, those names are checked to exist and returned in the given order.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise InputError(f"image folder '{image_dir}' does not exist or is not a folder")
    if image_list is not None:
        missing = [name for name in image_list if not (image_dir / name).is_file()]
        if missing:
            raise InputError(f"{len(missing)} listed images are not in '{image_dir}', e.g. {missing[:3]}")
        return list(image_list)
    names = []
    for root, dirs, files in os.walk(image_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in files:
            if not file.startswith(".") and Path(file).suffix.lower() in IMAGE_EXTENSIONS:
                names.append((Path(root) / file).relative_to(image_dir).as_posix())
    if not names:
        raise InputError(
            f"no images found in '{image_dir}' (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return sorted(names)


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag (1 = upright) or 1 when absent or unreadable."""
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except (OSError, UnidentifiedImageError, ValueError):
        return 1


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    # EXIF orientations 2-8: mirror and/or rotate so that the image appears upright.
    operations = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = operations.get(orientation)
    return np.ascontiguousarray(op(array)) if op else array


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        # 32-bit integer images from PIL's "I" mode: 16-bit data in practice.
        scale = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array.astype(np.float32) / scale, 0, 1)
    array = array.astype(np.float32)
    peak = float(array.max(initial=0.0))
    return np.clip(array / peak, 0, 1) if peak > 1 else np.clip(array, 0, 1)


def _read_with_pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return _to_unit_float(np.asarray(image))[..., None]
        if image.mode in ("L", "1"):
            return _to_unit_float(np.asarray(image.convert("L")))[..., None]
        if image.mode == "LA":
            return _to_unit_float(np.asarray(image.convert("L")))[..., None]
        return _to_unit_float(np.asarray(image.convert("RGB")))


def _read_with_opencv(path: Path) -> np.ndarray:
    # Fallback for what PIL cannot decode, e.g. 16-bit RGB TIFF. imdecode from bytes handles non-ASCII paths.
    data = np.fromfile(path, dtype=np.uint8)
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if array is None:
        raise ImageReadError(f"cannot decode image '{path}'")
    if array.ndim == 2:
        array = array[..., None]
    elif array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    else:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if array.ndim == 2:
        array = array[..., None]
    return _apply_orientation(_to_unit_float(array), exif_orientation(path))


def read_image(path: str | Path, grayscale: bool = False) -> np.ndarray:
    """Decode `path` to float32 (H,W,C) in [0,1], upright per EXIF; C is 1 if `grayscale` else 3."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image '{path}' does not exist")
    try:
        array = _read_with_pil(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as pil_error:
        try:
            array = _read_with_opencv(path)
        except ImageReadError:
            raise ImageReadError(f"cannot read image '{path}': {pil_error}") from pil_error
    if array.size == 0:
        raise ImageReadError(f"image '{path}' is empty")
    if grayscale and array.shape[2] == 3:
        array = (array @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    elif not grayscale and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array, dtype=np.float32)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        height, width = read_image(path).shape[:2]
        return width, height
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def resized_size(width: int, height: int, resize_max: int | None, force: bool = False,
                 multiple: int = 1) -> tuple[int, int]:
    """(width, height) after `resize_image`'s rule."""
    factor = 1.0
    if resize_max and (force or max(height, width) > resize_max):
        factor = resize_max / max(height, width)
    return (max(multiple, int(round(width * factor)) // multiple * multiple),
            max(multiple, int(round(height * factor)) // multiple * multiple))


def resize_image(
    image: np.ndarray, resize_max: int | None, force: bool = False, multiple: int = 1
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize so the longer side is `resize_max` (only down unless `force`); sides floored to `multiple`.

    Returns the image and the per-axis scale (new / old) as (sx, sy).
    """
    height, width = image.shape[:2]
    new_w, new_h = resized_size(width, height, resize_max, force, multiple)
    if (new_w, new_h) == (width, height):
        return image, (1.0, 1.0)
    interpolation = cv2.INTER_AREA if new_w * new_h < width * height else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if resized.ndim == 2:
        resized = resized[..., None]
    return resized, (new_w / width, new_h / height)


def iter_images(
    image_dir: str | Path, names: Iterable[str], grayscale: bool = False, prefetch: int = 4
) -> Iterator[tuple[str, np.ndarray | ImageReadError]]:
    """Yield (name, image) in order, decoding ahead on a thread; a bad image yields its error instead."""
    image_dir = Path(image_dir)

    def load(name: str) -> np.ndarray | ImageReadError:
        try:
            return read_image(image_dir / name, grayscale=grayscale)
        except ImageReadError as error:
            return error

    names = list(names)
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = [pool.submit(load, name) for name in names[:prefetch]]
        for index, name in enumerate(names):
            if index + prefetch < len(names):
                futures.append(pool.submit(load, names[index + prefetch]))
            yield name, futures[index].result()
            futures[index] = None  # release the decoded image
