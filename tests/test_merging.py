"""Merging split models that share views (recon.sfm.merging), against a synthesized scene with known poses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest

from recon.sfm.merging import MIN_SHARED_VIEWS, merge_overlapping


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[pycolmap.Reconstruction, Path]:
    """A synthesized scene of 12 views and 600 points, and its database (keypoints and correspondences)."""
    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs, options.num_cameras_per_rig, options.num_frames_per_rig = 1, 1, 12
    options.num_points3D = 600
    database = tmp_path_factory.mktemp("scene") / "database.db"
    with pycolmap.Database.open(database) as db:
        return pycolmap.synthesize_dataset(options, db), database


@pytest.fixture(scope="module")
def truth(scene) -> pycolmap.Reconstruction:
    return scene[0]


def _part(truth, frames: set[int], seed: int, drop: float = 0.3, tmp_path=None) -> pycolmap.Reconstruction:
    """`truth` seen by `frames` only, each observation dropped with probability `drop` (so each part has points
    the other lacks), points left with fewer than two views removed; read back from disk if `tmp_path` (then it
    holds only its registered images, as a model written by the stage does)."""
    model = pycolmap.Reconstruction(truth)
    for frame_id in list(model.reg_frame_ids()):
        if frame_id not in frames:
            model.deregister_frame(frame_id)
    rng = np.random.default_rng(seed)
    for point_id in list(model.point3D_ids()):
        # (ids copied first: the track's elements are views into a vector that deletion shifts)
        for image_id, point2D_idx in [(e.image_id, e.point2D_idx) for e in model.point3D(point_id).track.elements]:
            if model.point3D(point_id).track.length() > 2 and rng.random() < drop:
                model.delete_observation(image_id, point2D_idx)
    for point_id in list(model.point3D_ids()):
        if model.point3D(point_id).track.length() < 2:
            model.delete_point3D(point_id)
    if tmp_path is not None:
        tmp_path.mkdir()
        model.write(tmp_path)
        model = pycolmap.Reconstruction(tmp_path)
    return model


def _moved(model: pycolmap.Reconstruction) -> pycolmap.Reconstruction:
    """`model` in another frame: scale 2.5, a rotation of ~40 degrees, a shift."""
    quaternion = np.array([0.1, -0.3, 0.2, 0.93])
    model.transform(pycolmap.Sim3d(2.5, pycolmap.Rotation3d(quaternion / np.linalg.norm(quaternion)),
                                   np.array([3.0, -1.0, 0.5])))
    return model


@pytest.mark.parametrize("from_disk", [False, True])
def test_models_sharing_views_merge_into_the_known_scene(truth, tmp_path, from_disk):
    first = _part(truth, set(range(1, 9)), seed=1, tmp_path=tmp_path / "a" if from_disk else None)
    second = _moved(_part(truth, set(range(6, 13)), seed=2, tmp_path=tmp_path / "b" if from_disk else None))
    points_first, points_second = first.num_points3D(), second.num_points3D()
    observations = first.compute_num_observations(), second.compute_num_observations()

    models, merges = merge_overlapping([second, first])

    assert len(models) == 1 and len(merges) == 1
    merged = models[0]
    assert (merges[0].shared_views, merges[0].added_views) == (3, 4)
    assert merged.num_reg_images() == 12 and merged.is_valid()
    # the larger model's frame is kept: every camera centre where the truth has it
    errors = [np.linalg.norm(merged.image(i).projection_center() - truth.image(i).projection_center())
              for i in truth.reg_image_ids()]
    assert max(errors) < 1e-6
    assert merged.compute_mean_reprojection_error() < 1e-6
    # tracks that meet in a shared view's keypoint were joined (a track seen by the two parts in no common keypoint
    # stays two points, as in COLMAP's merge), and every point lies where the scene has one
    assert max(points_first, points_second) < merged.num_points3D() < 1.2 * truth.num_points3D()
    assert merged.num_points3D() < 0.75 * (points_first + points_second)
    scene = np.array([p.xyz for p in truth.points3D.values()])
    nearest = [np.min(np.linalg.norm(scene - p.xyz, axis=1)) for p in merged.points3D.values()]
    assert max(nearest) < 1e-6
    # the observations of the merged model are the union of the parts' (the added views' keypoints included)
    assert max(observations) < merged.compute_num_observations() <= sum(observations)


def test_models_sharing_too_few_views_stay_apart(truth):
    first = _part(truth, set(range(1, 8)), seed=1)
    second = _moved(_part(truth, set(range(8 - (MIN_SHARED_VIEWS - 1), 13)), seed=2))  # shares 6 and 7
    models, merges = merge_overlapping([first, second])
    assert len(models) == 2 and not merges
    assert [m.num_reg_images() for m in models] == [7, 7]


def test_tracks_of_merged_models_are_completed_through_the_database(scene):
    """With the database, the tracks the two parts saw in no common keypoint are joined too: the scene's points,
    each seen in every view, as synthesized."""
    truth, database = scene
    first = _part(truth, set(range(1, 9)), seed=1)
    second = _moved(_part(truth, set(range(6, 13)), seed=2))
    models, merges = merge_overlapping([first, second], database)
    merged = models[0]
    assert len(models) == 1 and merged.num_reg_images() == 12
    assert merged.num_points3D() == truth.num_points3D()
    assert merged.compute_num_observations() == truth.compute_num_observations()
    assert merged.compute_mean_reprojection_error() < 1e-6
