"""The extraction stage (recon.extract): resume after an interruption without recomputing, unreadable images
skipped and named."""

import shutil

import numpy as np
import pytest

from feature_backends.sift import SIFT
from feature_backends.store import FeatureReader
from recon.extract import extract


class Interrupt(Exception):
    pass


def test_extract_resumes_after_interruption_without_recomputing(synthetic_scene, tmp_path, monkeypatch):
    images = synthetic_scene / "images"
    complete = extract("sift", images, tmp_path / "complete.h5")
    calls = []
    original = SIFT.extract

    def failing_after_five(self, image):
        if len(calls) >= 5:  # images are extracted on several threads: two may both pass at 4
            raise Interrupt
        calls.append(1)
        return original(self, image)

    monkeypatch.setattr(SIFT, "extract", failing_after_five)
    with pytest.raises(Interrupt):
        extract("sift", images, tmp_path / "f.h5")
    with FeatureReader(tmp_path / "f.h5") as interrupted:
        stored = len(interrupted.names())
    assert 0 < stored < 12
    monkeypatch.setattr(SIFT, "extract", lambda self, image: calls.append(1) or original(self, image))
    calls.clear()
    extract("sift", images, tmp_path / "f.h5")
    assert len(calls) == 12 - stored  # only what was missing
    with FeatureReader(tmp_path / "f.h5") as resumed, FeatureReader(complete) as reference:
        assert resumed.names() == reference.names()
        for name in reference.names():
            np.testing.assert_array_equal(resumed.read(name)["keypoints"], reference.read(name)["keypoints"])


def test_images_on_threads_give_the_serial_features(synthetic_scene, tmp_path):
    """SIFT runs one image per core on threads (recon.extract, SIFT.parallel_images): same file as one image at a
    time, and OpenCV's thread count is restored afterwards."""
    import cv2

    before = cv2.getNumThreads()
    serial = extract({"name": "sift", "num_threads": 1}, synthetic_scene / "images", tmp_path / "serial.h5")
    threaded = extract({"name": "sift", "num_threads": 3}, synthetic_scene / "images", tmp_path / "threads.h5")
    assert cv2.getNumThreads() == before
    with FeatureReader(serial) as one, FeatureReader(threaded) as three:
        assert one.names() == three.names() and len(one.names()) == 12
        for name in one.names():
            a, b = one.read(name), three.read(name)
            assert len(a["keypoints"]) > 100
            np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
            np.testing.assert_array_equal(a["descriptors"], b["descriptors"])


def test_unreadable_image_is_skipped_and_named(synthetic_scene, tmp_path, caplog):
    images = tmp_path / "images"
    shutil.copytree(synthetic_scene / "images", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    extract("sift", images, tmp_path / "f.h5")
    assert "broken.png" in caplog.text
    with FeatureReader(tmp_path / "f.h5") as reader:
        assert len(reader.names()) == 12


def test_sift_image_threads_are_capped_by_default(monkeypatch):
    """One image per core, but at most MAX_IMAGE_THREADS by default (~0.25 GB per 1600 px image in flight);
    num_threads overrides it."""
    import os

    from feature_backends.sift import MAX_IMAGE_THREADS

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert SIFT({}).parallel_images() == MAX_IMAGE_THREADS == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert SIFT({}).parallel_images() == 2
    assert SIFT({"num_threads": 16}).parallel_images() == 16
