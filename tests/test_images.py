"""Image ingestion: EXIF orientation, grayscale / RGBA / 16-bit PNG and TIFF, nested and non-ASCII names, and
clear errors for unreadable input."""

import numpy as np
import pytest
from PIL import Image

from feature_backends.errors import ImageReadError, InputError
from feature_backends.images import image_size, iter_images, list_images, read_image, resize_image


def gradient(height=40, width=60):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).astype(np.uint8)


def test_list_images_recursive_sorted_non_ascii(tmp_path):
    for name in ["b.JPG", "a/ç 1.png", "a/z/x.tif", ".hidden.png", "notes.txt", ".cache/y.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == ["a/z/x.tif", "a/ç 1.png", "b.JPG"]


def test_missing_and_empty_folders_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(InputError, match="no images found"):
        list_images(tmp_path)


@pytest.mark.parametrize("orientation, expected_shape", [(1, (40, 60)), (3, (40, 60)), (6, (60, 40)), (8, (60, 40))])
def test_exif_orientation_is_applied(tmp_path, orientation, expected_shape):
    pixels = gradient()
    path = tmp_path / "o.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    image = read_image(path)
    assert image.shape[:2] == expected_shape
    assert image_size(path) == expected_shape[::-1]
    reference = {1: pixels, 3: pixels[::-1, ::-1], 6: np.rot90(pixels, -1), 8: np.rot90(pixels, 1)}[orientation]
    assert np.abs(image * 255 - reference).mean() < 3  # JPEG noise only


def test_grayscale_rgba_and_16bit(tmp_path):
    gray = gradient()[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgba = np.dstack([gradient(), np.full((40, 60), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    sixteen = (gray.astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    Image.fromarray(sixteen).save(tmp_path / "g16.tif")
    import cv2

    rgb16 = (gradient().astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "rgb16.tif"), rgb16[..., ::-1])  # PIL cannot decode 16-bit RGB TIFF

    g = read_image(tmp_path / "g.png")
    assert g.shape == (40, 60, 3) and np.allclose(g[..., 0], gray / 255, atol=1e-6)
    assert read_image(tmp_path / "g.png", grayscale=True).shape == (40, 60, 1)
    assert np.allclose(read_image(tmp_path / "rgba.png"), gradient() / 255, atol=1e-6)
    for name in ("g16.png", "g16.tif"):
        assert np.allclose(read_image(tmp_path / name)[..., 0], gray / 255, atol=1e-4), name
    assert np.allclose(read_image(tmp_path / "rgb16.tif"), gradient() / 255, atol=1e-4)


def test_unreadable_and_truncated_images_are_reported_by_name(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    Image.fromarray(gradient(200, 200)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    for name in ("garbage.jpg", "truncated.jpg"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)
    results = dict(iter_images(tmp_path, ["full.jpg", "garbage.jpg", "truncated.jpg"]))
    assert results["full.jpg"].shape == (200, 200, 3)
    assert isinstance(results["garbage.jpg"], ImageReadError)
    assert isinstance(results["truncated.jpg"], ImageReadError)


def test_resize_keeps_aspect_and_reports_scale():
    image = np.zeros((480, 640, 3), np.float32)
    resized, (sx, sy) = resize_image(image, 320)
    assert resized.shape == (240, 320, 3) and (sx, sy) == (0.5, 0.5)
    resized, (sx, sy) = resize_image(image, 1000, multiple=14)
    assert resized.shape == (476, 630, 3)  # not upscaled, floored to multiples of 14
    assert resize_image(image, 1000)[0] is image


def test_header_exif_reads_png_exif_without_decoding(tmp_path, monkeypatch):
    """No eXIf chunk: empty EXIF and the pixels stay undecoded; eXIf before or after the pixel data: read."""
    import zlib

    from PIL import Image

    from feature_backends.images import header_exif

    from PIL import ImageFile

    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 48)).save(plain)
    with monkeypatch.context() as patch, Image.open(plain) as image:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded the pixels"))
        assert len(header_exif(image)) == 0
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation
    before = tmp_path / "before.png"
    Image.new("RGB", (64, 48)).save(before, exif=exif)
    data = before.read_bytes()  # move the eXIf chunk behind the image data (allowed by older writers)
    start = data.index(b"eXIf") - 4
    chunk = data[start:start + 12 + int.from_bytes(data[start:start + 4], "big")]
    rest = data[:start] + data[start + len(chunk):]
    end = rest.index(b"IEND") - 4
    after = tmp_path / "after.png"
    after.write_bytes(rest[:end] + chunk + rest[end:])
    assert zlib.crc32(chunk[4:-4]) == int.from_bytes(chunk[-4:], "big")
    for path in (before, after):
        with Image.open(path) as image:
            assert header_exif(image)[0x0112] == 6


def test_ordered_map_keeps_order_and_bounds_the_items_in_flight():
    import threading
    import time

    from feature_backends.threads import ordered_map

    started, lock = [], threading.Lock()

    def work(item):
        with lock:
            started.append(item)
        time.sleep(0.002 * (item % 3))  # out-of-order completion
        return item * item

    results = []
    for result in ordered_map(work, range(40), workers=3, ahead=5):
        with lock:  # never more than `ahead` items submitted beyond those already yielded
            assert len(started) <= len(results) + 5
        results.append(result)
    assert results == [i * i for i in range(40)]
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(lambda item: 1 / item, [2, 1, 0, 3], workers=2))
