"""End to end on a generated scene with known poses, resume after interruption, and the CLI's handling of bad
input (messages and exit codes)."""

import json

import numpy as np
import pycolmap
import pytest

from feature_backends.sift import SIFT
from recon.cli import main
from recon.eval import evaluate
from recon.pipeline import run
from recon.extract import extract


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

def test_rerun_recomputes_nothing(synthetic_scene, synthetic_run, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(SIFT, "extract", forbidden)
    monkeypatch.setattr("recon.sfm.reconstruct_here", forbidden)
    monkeypatch.setattr("recon.sfm.process.reconstruct_in_fresh_process", forbidden)
    again = run(synthetic_scene / "images", synthetic_run.out_dir)
    assert again.sfm.num_registered == synthetic_run.sfm.num_registered
    assert again.sfm.num_points == synthetic_run.sfm.num_points


def test_cli_bad_input_exit_codes(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no images found" in capsys.readouterr().err


def test_unknown_backend_and_conf_key_are_clear_errors(tmp_path, capsys):
    from feature_backends.errors import ConfigError

    with pytest.raises(ConfigError, match="known: .*sift"):
        extract("siftt", tmp_path, tmp_path / "f.h5")
    with pytest.raises(ConfigError, match="unknown configuration key 'SIFT.max_keypoint'"):
        SIFT({"max_keypoint": 10})
