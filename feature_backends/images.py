"""Image ingestion: one policy for every stage.

Every backend, the COLMAP import and the exports see an image the same way: EXIF orientation applied (hloc
ignores it, COLMAP 4 applies it, nerfstudio does either depending on the path; mixing them rotates the same photo
differently in matching and SfM), grayscale / RGBA / 16-bit PNG and TIFF converted to float RGB in [0, 1],
names taken relative to the image folder with '/' separators so nested folders and non-ASCII names survive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, InputError
from .threads import ordered_map

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".pgm", ".ppm", ".pnm"})

# PIL's EXIF orientation values → the numpy operation that undoes them.
_EXIF_ORIENTATION_TAG = 0x0112


def list_images(image_dir: str | Path, image_list: Sequence[str] | None = None) -> list[str]:
    """Relative '/'-separated names of all images below `image_dir` (recursive, sorted).

    With `image_list`, those names are checked to exist and returned in the given order. Symbolic links are
    followed, but each real folder and file is listed once: a link loop (or a second link to the same folder)
    is named in one warning and not entered again. Two names that map to the same hloc pair key ('/' becomes
    '-', so 'a/x.png' and 'a-x.png') are refused with both names, since one would overwrite the other's matches.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise InputError(f"image folder '{image_dir}' does not exist or is not a folder")
    if image_list is not None:
        missing = [name for name in image_list if not (image_dir / name).is_file()]
        if missing:
            raise InputError(f"{len(missing)} listed images are not in '{image_dir}', e.g. {missing[:3]}")
        check_pair_keys(image_list)
        return list(image_list)
    names = _walk_once(image_dir)
    if not names:
        raise InputError(
            f"no images found in '{image_dir}' (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    check_pair_keys(names)
    return names


def _walk_once(image_dir: Path) -> list[str]:
    """Image names below `image_dir`, following links but entering each real folder and real file once."""
    seen_dirs = {os.path.realpath(image_dir)}
    seen_files: set[str] = set()
    loops: list[str] = []
    names = []
    for root, dirs, files in os.walk(image_dir, followlinks=True):
        kept = []
        # Real folders and files before links to them, so that the names kept are the real ones.
        for d in sorted((d for d in dirs if not d.startswith(".")), key=lambda d: (_is_link(root, d), d)):
            real = os.path.realpath(os.path.join(root, d))
            if real in seen_dirs:
                loops.append((Path(root) / d).relative_to(image_dir).as_posix())
                continue
            seen_dirs.add(real)
            kept.append(d)
        dirs[:] = kept
        for file in sorted(files, key=lambda f: (_is_link(root, f), f)):
            if file.startswith(".") or Path(file).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(root) / file
            real = os.path.realpath(path)
            if real in seen_files and path.exists():
                continue  # a second link to a file already listed
            seen_files.add(real)
            names.append(path.relative_to(image_dir).as_posix())
    if loops:
        logger.warning("Not following %d linked folder(s) already listed (a symlink loop?): %s", len(loops),
                       ", ".join(loops[:5]))
    return sorted(names)


def _is_link(root: str, name: str) -> bool:
    return os.path.islink(os.path.join(root, name))


def check_pair_keys(names: Iterable[str]) -> None:
    """Refuse two images whose hloc pair keys collide ('/' -> '-'): one would silently overwrite the other."""
    owners: dict[str, str] = {}
    for name in names:
        key = name.replace("/", "-")
        if key in owners and owners[key] != name:
            raise InputError(f"images '{owners[key]}' and '{name}' have the same key in hloc's matches.h5 "
                             f"('{key}'); rename one of them (or leave one out with --image-list)")
        owners[key] = name


# Pillow's own guard warns above ~89 Mpx and only raises at twice that; recon sets its limit explicitly and
# skips an image whose header declares more pixels (a decompression bomb, or a panorama no detector needs).
MAX_IMAGE_PIXELS = 250_000_000
Image.MAX_IMAGE_PIXELS = None  # recon's own check below replaces Pillow's warning path


def screen_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, decode: bool = False) -> str | None:
    """Why `path` cannot be used, from its header alone (None if it looks usable): a dangling link, an empty
    file, a file that is no image, or a declared size above `max_pixels`. Truncated files pass the header check
    and are caught when decoded: by extraction, or here with `decode` (for stages that decode no earlier)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"dangling symbolic link to '{os.readlink(path)}'"
    if not path.is_file():
        return "not a file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        # What PIL cannot open (16-bit RGB TIFF, …) may still decode with OpenCV, as in read_image.
        if cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED) is None:
            return "not a readable image"
        return None
    if width * height > max_pixels:
        return f"declared size {width}x{height} is above the {max_pixels // 1_000_000} Mpx limit"
    if width < 1 or height < 1:
        return "image has no pixels"
    if decode:
        try:
            read_image(path)
        except ImageReadError as error:
            return str(error)
    return None


def screen_images(image_dir: str | Path, names: Sequence[str],
                  decode: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """(usable names, [{"file", "reason"}] for the others), in one warning line for all that are skipped."""
    image_dir = Path(image_dir)
    usable, skipped = [], []
    for name in names:
        reason = screen_image(image_dir / name, decode=decode)
        if reason is None:
            usable.append(name)
        else:
            skipped.append({"file": name, "reason": reason})
    if skipped:
        logger.warning("Skipping %d image(s): %s", len(skipped), describe_skipped(skipped))
    return usable, skipped


def describe_skipped(skipped: Sequence[Mapping[str, str]], limit: int = 10) -> str:
    text = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:limit])
    return text + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")


def header_exif(image: Image.Image) -> Image.Exif:
    """`image.getexif()` without decoding the pixels when the file has no EXIF.

    PIL's PNG reader decodes the whole image to look for an eXIf chunk after the pixel data when none came before
    it; on temple_ring_full (47 PNGs, 640x480) that was 0.8 s of the SfM import, which only wants the focal length
    and GPS. A walk over the chunk headers (no pixel data read) tells whether there is an eXIf chunk at all."""
    if image.format == "PNG" and "exif" not in image.info and not _png_has_exif(image.fp):
        return Image.Exif()
    return image.getexif()


def _png_has_exif(stream) -> bool:
    position = stream.tell()
    try:
        stream.seek(8)  # the PNG signature
        while True:
            header = stream.read(8)
            if len(header) < 8 or header[4:] == b"IEND":
                return False
            if header[4:] == b"eXIf":
                return True
            stream.seek(int.from_bytes(header[:4], "big") + 4, os.SEEK_CUR)  # data and CRC
    finally:
        stream.seek(position)


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag (1 = upright) or 1 when absent or unreadable."""
    try:
        with Image.open(path) as image:
            return int(header_exif(image).get(_EXIF_ORIENTATION_TAG, 1))
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
        if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
            raise ImageReadError(f"image '{path}' declares {image.size[0]}x{image.size[1]} pixels, above the "
                                 f"{MAX_IMAGE_PIXELS // 1_000_000} Mpx limit")
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
    try:  # OpenCV asserts (cv2.error) on an empty buffer instead of returning None
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH) if data.size else None
    except cv2.error:
        array = None
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
            orientation = int(header_exif(image).get(_EXIF_ORIENTATION_TAG, 1))
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
    return map_images(lambda name, image: (name, image), image_dir, names, grayscale, workers=1, ahead=prefetch)


def map_images(
    function: Callable[[str, np.ndarray | ImageReadError], Any], image_dir: str | Path, names: Iterable[str],
    grayscale: bool = False, workers: int = 2, ahead: int | None = None,
) -> Iterator[Any]:
    """`function(name, image)` for every image, decoded and processed on `workers` threads, yielded in order. At
    most `ahead` (default 2 x `workers`) images are in flight, so memory stays flat whatever the number of images;
    a bad image is passed as its ImageReadError."""
    image_dir = Path(image_dir)

    def task(name: str) -> Any:
        try:
            image = read_image(image_dir / name, grayscale=grayscale)
        except ImageReadError as error:
            image = error
        return function(name, image)

    return ordered_map(task, names, workers, ahead)
