"""Principal-point self-calibration after mapping (recon.calibration): recovered where the views determine it,
left at COLMAP's centre where they do not."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from recon.sfm.calibration import refine_principal_points

WIDTH, HEIGHT, FOCAL = 640, 480, 800.0


def mapped_with_centred_principal_point(true_cx: float, true_cy: float, num_frames: int = 12, seed: int = 3):
    """A synthetic scene seen through an off-centre principal point, adjusted as COLMAP's mapper would
    (principal point held at the image centre); returns (model, ground truth)."""
    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs = 1
    options.num_cameras_per_rig = 1
    options.num_frames_per_rig = num_frames
    options.num_points3D = 300
    options.camera_width, options.camera_height = WIDTH, HEIGHT
    options.camera_model_id = pycolmap.CameraModelId.SIMPLE_RADIAL
    options.camera_params = [FOCAL, true_cx, true_cy, 0.0]
    options.num_points2D_without_point3D = 0
    pycolmap.set_random_seed(seed)
    truth = pycolmap.synthesize_dataset(options)
    model = pycolmap.Reconstruction(truth)
    rng = np.random.default_rng(seed)
    for image in model.images.values():
        for point in image.points2D:
            point.xy = point.xy + rng.normal(0.0, 0.3, 2)  # SIFT-like keypoint noise
    camera = model.cameras[1]
    camera.params = [FOCAL, WIDTH / 2, HEIGHT / 2, 0.0]
    adjust = pycolmap.BundleAdjustmentOptions()
    adjust.print_summary = False
    pycolmap.bundle_adjustment(model, adjust)
    model.update_point_3d_errors()
    return model, truth


def principal_point(model: pycolmap.Reconstruction) -> np.ndarray:
    return np.asarray(model.cameras[1].params)[[1, 2]]


def test_off_centre_principal_point_is_recovered():
    true_pp = np.array([WIDTH / 2 + 22.0, HEIGHT / 2 - 14.0])
    model, _ = mapped_with_centred_principal_point(*true_pp)
    before_error = model.compute_mean_reprojection_error()

    refined, decisions = refine_principal_points(model)

    assert [d.kept for d in decisions] == [True]
    print(f"sigma {decisions[0].sigma_px:.2f} px, shift {decisions[0].shift_px:.1f} px, "
          f"pp {principal_point(refined)} (true {true_pp})")
    assert np.abs(principal_point(refined) - true_pp).max() < 1.5
    assert decisions[0].sigma_px < 0.01 * WIDTH
    # 0.3 px of Gaussian noise per axis has a mean norm of 0.38 px: the refined model reaches it, the centred one cannot
    assert refined.compute_mean_reprojection_error() < 0.38 < 0.9 * before_error
    # the input model is left as the mapper wrote it
    np.testing.assert_allclose(principal_point(model), [WIDTH / 2, HEIGHT / 2])


def test_centred_principal_point_stays_centred():
    model, _ = mapped_with_centred_principal_point(WIDTH / 2, HEIGHT / 2)
    refined, decisions = refine_principal_points(model)
    # the free estimate moves by noise only; a shift the views cannot tell from noise is not taken
    assert [d.kept for d in decisions] == [False] and "not significant" in decisions[0].reason
    assert refined is model


def test_undetermined_principal_point_keeps_the_model_unchanged():
    model, _ = mapped_with_centred_principal_point(WIDTH / 2 + 22.0, HEIGHT / 2 - 14.0)
    refined, decisions = refine_principal_points(model, max_sigma_fraction=1e-6)
    assert [d.kept for d in decisions] == [False]
    assert "not determined" in decisions[0].reason
    assert refined is model
    np.testing.assert_allclose(principal_point(refined), [WIDTH / 2, HEIGHT / 2])


def test_cameras_with_few_images_are_not_touched():
    model, _ = mapped_with_centred_principal_point(WIDTH / 2 + 22.0, HEIGHT / 2, num_frames=6)
    refined, decisions = refine_principal_points(model, min_images=8)
    assert decisions == [] and refined is model


def test_models_above_the_covariance_limit_keep_the_centre_unless_forced():
    """Above `max_images` the covariance (dense in the poses: 97 s of a 600-view model) is not computed and the
    mapper's model stands; `force` (--refine-principal-point always) still frees the principal point, without it."""
    true_pp = np.array([WIDTH / 2 + 22.0, HEIGHT / 2 - 14.0])
    model, _ = mapped_with_centred_principal_point(*true_pp)
    refined, decisions = refine_principal_points(model, max_images=11)
    assert decisions == [] and refined is model

    forced, decisions = refine_principal_points(model, max_images=11, force=True)
    assert [(d.kept, d.reason, d.num_images) for d in decisions] == [(True, "forced", 12)]
    assert np.isnan(decisions[0].sigma_px)
    assert np.abs(principal_point(forced) - true_pp).max() < 1.5
    assert decisions[0].shift_px == pytest.approx(np.linalg.norm(principal_point(forced) - [WIDTH / 2, HEIGHT / 2]))
    np.testing.assert_allclose(principal_point(model), [WIDTH / 2, HEIGHT / 2])


@pytest.mark.shared_data
def test_temple_ring_principal_point_is_rejected_and_full_ring_recovered(shared_data, tmp_path):
    """Middlebury's true principal point is (302.3, 246.9): the 47-view ring determines it, the 19-view subset
    does not (freed, it drifts by >100 px and pose AUC@1 collapses from 32 to 0.3)."""
    from recon.export import ExportOptions
    from recon.pipeline import RunConfig, run

    for scene in ("temple_ring", "temple_ring_full"):
        if not (shared_data / scene).is_dir():
            pytest.skip(f"{scene} absent")
    sparse = run(shared_data / "temple_ring", tmp_path / "ring", RunConfig(export=ExportOptions(formats=()))).sfm.sparse_dir
    np.testing.assert_allclose(principal_point(pycolmap.Reconstruction(sparse)), [WIDTH / 2, HEIGHT / 2])
    sparse = run(shared_data / "temple_ring_full", tmp_path / "full", RunConfig(export=ExportOptions(formats=()))).sfm.sparse_dir
    assert np.abs(principal_point(pycolmap.Reconstruction(sparse)) - [302.3, 246.9]).max() < 8


@pytest.mark.parametrize("record, size, expected", [
    ({"backend": "sift", "conf": {"resize_max": 1600}}, (640, 480), 2.0),  # detected at full resolution
    ({"backend": "sift", "conf": {"resize_max": 1600}}, (3200, 2400), 4.0),  # detected at half resolution
    (None, (640, 480), 4.0),  # e.g. a file written by hloc: COLMAP's threshold
])
def test_verification_threshold_follows_the_detection_resolution(tmp_path, record, size, expected):
    from feature_backends.store import FeatureWriter
    from recon.sfm.verification import verification_error

    path = tmp_path / "features.h5"
    with FeatureWriter(path, conf=record) as writer:
        for name in ("a.png", "b.png"):
            writer.write(name, {"keypoints": np.zeros((3, 2), np.float32), "descriptors": np.zeros((128, 3), np.float32),
                                "scores": np.ones(3, np.float32), "image_size": np.array(size)})
    assert verification_error(path) == pytest.approx(expected)
