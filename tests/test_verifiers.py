"""Geometric verifiers (recon.sfm.verifiers): every choice writes verified two-view geometries into the COLMAP
database and the mapper reconstructs the generated scene from them."""

import numpy as np
import pycolmap
import pytest

from feature_backends.errors import ConfigError
from recon.eval import evaluate
from recon.sfm import SfMOptions, reconstruct
from recon.sfm.verifiers import VerifierSettings, verify

CASES = [("colmap", "fundamental"), ("magsac", "fundamental"), ("magsac", "essential"),
         ("poselib", "fundamental"), ("poselib", "essential")]


def _inputs(scene, run):
    out = run.out_dir
    return scene / "images", out / "pairs.txt", out / "features.h5", out / "matches.h5"


@pytest.mark.parametrize(("verifier", "model"), CASES)
def test_verifier_gives_verified_pairs_and_a_full_reconstruction(synthetic_scene, synthetic_run, tmp_path,
                                                                  verifier, model):
    if verifier == "poselib":
        pytest.importorskip("poselib")
    options = SfMOptions(verifier=verifier, verifier_model=model, fresh_process=False)
    result = reconstruct(tmp_path, *_inputs(synthetic_scene, synthetic_run), options=options)
    with pycolmap.Database.open(tmp_path / "sfm" / "database.db") as db:
        _, geometries = db.read_two_view_geometries()
        verified = db.num_verified_image_pairs()
    configs = {geometry.config for geometry in geometries if len(geometry.inlier_matches)}
    # 66 exhaustive pairs of a 12-frame orbit; COLMAP verifies 40-odd of them.
    assert verified >= 30, verified
    if verifier != "colmap":
        Config = pycolmap.TwoViewGeometryConfiguration
        assert configs == {Config.UNCALIBRATED if model == "fundamental" else Config.CALIBRATED}, configs
    assert result.num_registered == 12
    scores = evaluate(result.sparse_dir, synthetic_scene / "gt")
    assert scores.auc_at(3.0) > 70 and scores.auc_at(5.0) > 80, scores


def _epipolar_errors(gt, name0, name1, points0, points1):
    """Distance (px) of each point of image 1 from the epipolar line of its match, with ground-truth geometry."""
    cam0, cam1 = gt[name0], gt[name1]
    R = cam1.R @ cam0.R.T
    t = cam1.t - R @ cam0.t
    cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    F = np.linalg.inv(cam1.K).T @ cross @ R @ np.linalg.inv(cam0.K)
    lines = np.c_[points0, np.ones(len(points0))] @ F.T
    return np.abs(np.sum(lines * np.c_[points1, np.ones(len(points1))], 1)) / np.linalg.norm(lines[:, :2], axis=1)


@pytest.mark.parametrize("verifier", ["magsac", "poselib"])
def test_inliers_are_the_matches_consistent_with_the_ground_truth(synthetic_scene, synthetic_run, tmp_path,
                                                                  verifier):
    """One pair's matches plus 30 % random outliers: the verifier keeps the matches that the ground-truth
    epipolar geometry explains (within 1 px) and drops the rest."""
    if verifier == "poselib":
        pytest.importorskip("poselib")
    from pairs.io import read_pairs
    from recon.sfm.database import import_features, import_matches
    from recon.eval import load_ground_truth

    _, pairs_path, features, matches = _inputs(synthetic_scene, synthetic_run)
    database = tmp_path / "database.db"
    image_ids = import_features(database, synthetic_scene / "images", features)
    counts = import_matches(database, image_ids, read_pairs(pairs_path), matches)
    pair = max(counts, key=counts.get)
    id0, id1 = image_ids[pair[0]], image_ids[pair[1]]
    rng = np.random.default_rng(0)
    with pycolmap.Database.open(database) as db:
        raw = db.read_matches(id0, id1)
        n0, n1 = db.num_keypoints_for_image(id0), db.num_keypoints_for_image(id1)
        fake = np.stack([rng.integers(0, n0, len(raw) * 3 // 10), rng.integers(0, n1, len(raw) * 3 // 10)], 1)
        all_matches = np.concatenate([raw, fake]).astype(np.uint32)
        db.delete_matches(id0, id1)
        db.write_matches(id0, id1, all_matches)
        points0, points1 = db.read_keypoints(id0)[:, :2], db.read_keypoints(id1)[:, :2]
    errors = _epipolar_errors(load_ground_truth(synthetic_scene / "gt"), *pair,
                              points0[all_matches[:, 0]], points1[all_matches[:, 1]])
    good = {tuple(m) for m in all_matches[errors < 1.0]}
    bad = {tuple(m) for m in all_matches[errors > 4.0]}
    assert len(good) > 100 and len(bad) > 30
    assert verify(database, {pair: len(all_matches)}, tmp_path, VerifierSettings(verifier, max_error=2.0)) == 1
    with pycolmap.Database.open(database) as db:
        kept = {tuple(m) for m in db.read_two_view_geometry(id0, id1).inlier_matches}
    assert len(kept & good) >= 0.97 * len(good), (len(kept & good), len(good))
    assert len(kept & bad) == 0, len(kept & bad)


def test_bad_verifier_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown verifier 'ransac'"):
        verify(tmp_path / "none.db", {}, tmp_path, VerifierSettings("ransac"))
    with pytest.raises(ConfigError, match="0 < confidence < 1"):
        verify(tmp_path / "none.db", {}, tmp_path, VerifierSettings("magsac", confidence=1.5))


@pytest.mark.parametrize("verifier", ["magsac", "poselib"])
def test_verification_threads_do_not_change_the_geometries(synthetic_scene, synthetic_run, tmp_path, monkeypatch,
                                                          verifier):
    """Pairs are fitted on several threads (the estimators release the GIL) and written in order by one: one
    thread and four give the same verified pairs with the same inliers."""
    if verifier == "poselib":
        pytest.importorskip("poselib")
    from pairs.io import read_pairs
    from recon.sfm import verifiers
    from recon.sfm.database import import_features, import_matches

    _, pairs_path, features, matches = _inputs(synthetic_scene, synthetic_run)
    results = {}
    for threads in (1, 4):
        monkeypatch.setattr(verifiers, "verification_threads", lambda threads=threads: threads)
        database = tmp_path / f"threads{threads}.db"
        image_ids = import_features(database, synthetic_scene / "images", features)
        counts = import_matches(database, image_ids, read_pairs(pairs_path), matches)
        assert verify(database, counts, tmp_path, VerifierSettings(verifier)) >= 30
        with pycolmap.Database.open(database) as db:
            pair_ids, geometries = db.read_two_view_geometries()
            results[threads] = {int(pair): np.asarray(g.inlier_matches).tolist()
                                for pair, g in zip(pair_ids, geometries)}
    assert results[1] == results[4]
