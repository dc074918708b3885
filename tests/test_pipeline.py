"""End to end on a generated scene with known poses, resume after interruption, and the CLI's handling of bad
input (messages and exit codes)."""

import json
import shutil

import numpy as np
import pycolmap
import pytest
from PIL import Image

from feature_backends.sift import SIFT
from feature_backends.store import FeatureReader, MatchReader
from pairs.io import read_pairs, write_pairs
from recon.cli import main
from recon.eval import evaluate
from recon.pipeline import RunConfig, run
from recon.extract import extract
from recon.match import match


def test_run_registers_every_image_with_accurate_poses(synthetic_scene, synthetic_run):
    result = synthetic_run
    assert result.num_images == 12 and result.sfm.num_registered == 12
    assert result.pairs_method == "exhaustive" and result.num_pairs == 66
    assert result.sfm.mean_reprojection_error < 1.5
    scores = evaluate(result.sfm.sparse_dir, synthetic_scene / "gt")
    assert scores.num_registered == 12
    # Noise-free renderings: every relative pose within 3 degrees, most within 1.
    assert scores.auc_at(3.0) > 70 and scores.auc_at(5.0) > 80, scores


def test_run_writes_every_export(synthetic_run):
    out = synthetic_run.out_dir
    for path in ["sparse/0/cameras.bin", "sparse/0/images.txt", "points3D.ply", "undistorted/images",
                 "undistorted/sparse/0/cameras.bin", "undistorted/transforms.json", "run.json"]:
        assert (out / path).exists(), path
    undistorted = pycolmap.Reconstruction(out / "undistorted" / "sparse" / "0")
    assert {c.model.name for c in undistorted.cameras.values()} == {"PINHOLE"}
    assert len(list((out / "undistorted" / "images").iterdir())) == 12
    transforms = json.loads((out / "undistorted" / "transforms.json").read_text())
    assert len(transforms["frames"]) == 12 and transforms["camera_model"] == "OPENCV"
    # nerfstudio's camera centre = the COLMAP centre with the world axes permuted (x, z, -y).
    image = next(im for im in undistorted.images.values() if im.name in transforms["frames"][0]["file_path"])
    centre = image.projection_center()
    np.testing.assert_allclose(np.array(transforms["frames"][0]["transform_matrix"])[:3, 3],
                               [centre[0], centre[2], -centre[1]], atol=1e-6)
    ply_header = (out / "points3D.ply").read_bytes()[:300]
    assert b"property uchar red" in ply_header


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


def test_match_resumes_after_interruption(synthetic_scene, synthetic_run, tmp_path, monkeypatch):
    from feature_backends.nearest_neighbor import MutualNearestNeighbor

    out = synthetic_run.out_dir
    matched = []
    original = MutualNearestNeighbor.match_many
    state = {"interrupt": True}

    def counting(self, features0, others):
        if state["interrupt"] and len(matched) + len(others) > 20:
            raise Interrupt
        matched.extend(others)
        return original(self, features0, others)

    monkeypatch.setattr(MutualNearestNeighbor, "match_many", counting)
    with pytest.raises(Interrupt):
        match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m.h5")
    written = len(matched)
    assert 0 < written <= 20
    state["interrupt"], matched[:] = False, []
    match("mnn", out / "pairs.txt", out / "features.h5", tmp_path / "m.h5")
    assert len(matched) == 66 - written  # only the missing pairs
    with MatchReader(tmp_path / "m.h5") as again, MatchReader(out / "matches.h5") as reference:
        for pair in read_pairs(out / "pairs.txt"):
            np.testing.assert_array_equal(again.read(*pair)[0], reference.read(*pair)[0])


def test_rerun_recomputes_nothing(synthetic_scene, synthetic_run, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(SIFT, "extract", forbidden)
    monkeypatch.setattr("recon.sfm.reconstruct_here", forbidden)
    monkeypatch.setattr("recon.sfm.process.reconstruct_in_fresh_process", forbidden)
    again = run(synthetic_scene / "images", synthetic_run.out_dir)
    assert again.sfm.num_registered == synthetic_run.sfm.num_registered
    assert again.sfm.num_points == synthetic_run.sfm.num_points


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
    with pytest.raises(ConfigError, match="unknown pycolmap option 'incremental.no_such_option'"):
        reconstruct(tmp_path / "bad", *inputs, options=SfMOptions(mapper_options={"incremental.no_such_option": 1}))


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


def test_cli_bad_input_exit_codes(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no images found" in capsys.readouterr().err


def test_unreadable_image_is_skipped_and_named(synthetic_scene, tmp_path, caplog):
    images = tmp_path / "images"
    shutil.copytree(synthetic_scene / "images", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    extract("sift", images, tmp_path / "f.h5")
    assert "broken.png" in caplog.text
    with FeatureReader(tmp_path / "f.h5") as reader:
        assert len(reader.names()) == 12


def test_pairs_naming_unknown_image_is_a_clear_error(synthetic_scene, synthetic_run, tmp_path, capsys):
    out = synthetic_run.out_dir
    write_pairs(tmp_path / "pairs.txt", [("camera000001_frame000000.png", "nope.png")])
    code = main(["match", str(tmp_path / "pairs.txt"), str(out / "features.h5"), str(tmp_path / "m.h5")])
    assert code == 2 and "nope.png" in capsys.readouterr().err


def test_unknown_backend_and_conf_key_are_clear_errors(tmp_path, capsys):
    from feature_backends.errors import ConfigError

    with pytest.raises(ConfigError, match="known: .*sift"):
        extract("siftt", tmp_path, tmp_path / "f.h5")
    with pytest.raises(ConfigError, match="unknown configuration key 'SIFT.max_keypoint'"):
        SIFT({"max_keypoint": 10})
