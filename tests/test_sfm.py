"""The SfM stage (recon.sfm): the fresh process equals the in-process run and returns its errors; camera modes
and EXIF focal lengths in the COLMAP import."""

import numpy as np
import pycolmap
import pytest
from PIL import Image


def test_sfm_in_a_fresh_process_equals_sfm_here_and_returns_its_errors(synthetic_scene, synthetic_run, tmp_path):
    from feature_backends.errors import ConfigError
    from recon.sfm import SfMOptions, reconstruct

    out = synthetic_run.out_dir
    inputs = (synthetic_scene / "images", out / "pairs.txt", out / "features.h5", out / "matches.h5")
    here = reconstruct(tmp_path / "here", *inputs, options=SfMOptions(fresh_process=False))
    assert synthetic_run.sfm.timings["map"] > 0  # the run mapped in a fresh process and reported its stage times
    assert (here.num_registered, here.num_points) == (synthetic_run.sfm.num_registered, synthetic_run.sfm.num_points)
    model_here, model_there = pycolmap.Reconstruction(here.sparse_dir), pycolmap.Reconstruction(out / "sparse" / "0")
    for image in model_here.images.values():
        twin = model_there.find_image_with_name(image.name)
        np.testing.assert_allclose(image.projection_center(), twin.projection_center(), atol=1e-6)
    # An error raised inside the child reaches the caller with its class and message.
    with pytest.raises(ConfigError, match="unknown pycolmap option 'no_such_option'"):
        reconstruct(tmp_path / "bad", *inputs, options=SfMOptions(mapper_options={"no_such_option": 1}))


def test_camera_modes_and_exif_focal(tmp_path):
    from recon.sfm.database import exif_focal_pixels, import_features
    from feature_backends.store import FeatureWriter

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28  # 28 mm equivalent
    for name in ["a/1.jpg", "a/2.jpg", "b/3.jpg"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (120, 80)).save(tmp_path / name, exif=exif)
    assert exif_focal_pixels(tmp_path / "a/1.jpg", 120, 80) == pytest.approx(28 / 36 * 120)
    with FeatureWriter(tmp_path / "f.h5") as writer:
        for name in ["a/1.jpg", "a/2.jpg", "b/3.jpg"]:
            writer.write(name, {"keypoints": np.zeros((3, 2), np.float32), "image_size": np.array([120, 80])})
    expected = {"single": 1, "per-folder": 2, "per-image": 3}
    for mode, count in expected.items():
        import_features(tmp_path / f"{mode}.db", tmp_path, tmp_path / "f.h5", camera_mode=mode)
        with pycolmap.Database.open(tmp_path / f"{mode}.db") as db:
            cameras = db.read_all_cameras()
            assert len(cameras) == count
            assert all(c.has_prior_focal_length and c.focal_length == pytest.approx(28 / 36 * 120) for c in cameras)
            keypoints = db.read_keypoints(1)
            np.testing.assert_allclose(keypoints[:, :2], 0.5)  # hloc → COLMAP pixel convention


def test_features_of_images_outside_the_pairs_are_not_mapped(synthetic_scene, synthetic_run, tmp_path):
    """A features file kept from an earlier run in the same folder holds images this run does not pair: they are
    not imported, so they do not count as views left out (which would send `auto` to the global mapper too)."""
    import shutil

    from feature_backends.store import FeatureReader, FeatureWriter
    from recon.sfm import SfMOptions, reconstruct

    out = synthetic_run.out_dir
    features = tmp_path / "features.h5"
    shutil.copyfile(out / "features.h5", features)
    with FeatureReader(features) as reader:
        first = reader.names()[0]
        stored = reader.read(first)
    with FeatureWriter(features) as writer:
        writer.write("earlier-run/other.png", stored)
    with FeatureReader(features) as reader:
        assert len(reader.names()) == 13

    result = reconstruct(tmp_path / "sfm", synthetic_scene / "images", out / "pairs.txt", features,
                         out / "matches.h5", options=SfMOptions(fresh_process=False))
    assert (result.num_images, result.num_registered) == (12, 12)
    assert list(result.engine_runs) == ["incremental"]  # every paired view registered: no global run
    with pycolmap.Database.open(tmp_path / "sfm" / "sfm" / "database.db") as db:
        assert db.num_images() == 12
