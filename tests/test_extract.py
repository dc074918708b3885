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
        if len(calls) == 5:
            raise Interrupt
        calls.append(1)
        return original(self, image)

    monkeypatch.setattr(SIFT, "extract", failing_after_five)
    with pytest.raises(Interrupt):
        extract("sift", images, tmp_path / "f.h5")
    monkeypatch.setattr(SIFT, "extract", lambda self, image: calls.append(1) or original(self, image))
    calls.clear()
    extract("sift", images, tmp_path / "f.h5")
    assert len(calls) == 12 - 5  # only what was missing
    with FeatureReader(tmp_path / "f.h5") as resumed, FeatureReader(complete) as reference:
        assert resumed.names() == reference.names()
        for name in reference.names():
            np.testing.assert_array_equal(resumed.read(name)["keypoints"], reference.read(name)["keypoints"])


def test_unreadable_image_is_skipped_and_named(synthetic_scene, tmp_path, caplog):
    images = tmp_path / "images"
    shutil.copytree(synthetic_scene / "images", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    extract("sift", images, tmp_path / "f.h5")
    assert "broken.png" in caplog.text
    with FeatureReader(tmp_path / "f.h5") as reader:
        assert len(reader.names()) == 12
