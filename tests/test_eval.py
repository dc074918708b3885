"""Ground-truth readers, pose AUC and `evaluate()` on models with known, hand-computed errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pycolmap
import pytest
from scipy.spatial.transform import Rotation

from feature_backends.errors import InputError
from recon.eval import (
    CameraGT,
    eval_main,
    evaluate,
    format_eval,
    load_ground_truth,
    pose_auc,
    read_middlebury_par,
    read_strecha_camera,
    relative_pose_error_deg,
    rotation_angle_deg,
)
from recon.synthetic import SceneSpec, make_scene

K_TEST = np.array([[1520.4, 0.0, 302.32], [0.0, 1525.9, 246.87], [0.0, 0.0, 1.0]])


def _random_cameras(count: int, seed: int = 0) -> dict[str, CameraGT]:
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(count, random_state=seed).as_matrix()
    return {f"view{i:02d}.png": CameraGT(K=K_TEST, R=rotations[i], t=rng.normal(size=3)) for i in range(count)}


def _par_text(cameras: dict[str, CameraGT]) -> str:
    lines = [str(len(cameras))]
    for name, cam in cameras.items():
        numbers = np.concatenate([cam.K.ravel(), cam.R.ravel(), cam.t])
        lines.append(name + " " + " ".join(f"{v:.17g}" for v in numbers))
    return "\n".join(lines) + "\n"


def _strecha_text(cam: CameraGT, width: int = 3072, height: int = 2048) -> str:
    rows = [*cam.K, [0.0, 0.0, 0.0], *cam.R.T, cam.center]
    return "\n".join(" ".join(f"{v:.17g}" for v in row) for row in rows) + f"\n{width} {height}\n"


def _project(cam: CameraGT, point: np.ndarray) -> np.ndarray:
    x = cam.K @ (cam.R @ point + cam.t)
    return x[:2] / x[2]


# ------------------------------------------------------------------------------------------------ readers


def test_middlebury_par_roundtrip(tmp_path):
    cameras = _random_cameras(3)
    path = tmp_path / "scene_par.txt"
    path.write_text(_par_text(cameras))
    loaded = read_middlebury_par(path)
    assert list(loaded) == list(cameras)
    for name, cam in cameras.items():
        np.testing.assert_allclose(loaded[name].K, cam.K)
        np.testing.assert_allclose(loaded[name].R, cam.R, atol=1e-15)
        np.testing.assert_allclose(loaded[name].t, cam.t, atol=1e-15)


def test_middlebury_par_restricted_to_images_present(tmp_path):
    cameras = _random_cameras(3)
    (tmp_path / "scene_par.txt").write_text(_par_text(cameras))
    (tmp_path / "view00.png").write_bytes(b"")
    (tmp_path / "view02.png").write_bytes(b"")
    assert sorted(load_ground_truth(tmp_path)) == ["view00.png", "view02.png"]
    assert sorted(load_ground_truth(tmp_path / "scene_par.txt")) == ["view00.png", "view02.png"]


def test_strecha_camera_converts_to_world_to_camera(tmp_path):
    cam = _random_cameras(1, seed=3)["view00.png"]
    (tmp_path / "0007.jpg.camera").write_text(_strecha_text(cam))
    loaded = read_strecha_camera(tmp_path / "0007.jpg.camera")
    np.testing.assert_allclose(loaded.R, cam.R, atol=1e-12)
    np.testing.assert_allclose(loaded.t, cam.t, atol=1e-12)
    point = np.array([0.3, -0.2, 4.0])
    np.testing.assert_allclose(_project(loaded, point), _project(cam, point), atol=1e-9)
    gt = load_ground_truth(tmp_path)
    assert list(gt) == ["0007.jpg"]


def test_colmap_model_as_ground_truth(tmp_path):
    scene = make_scene(tmp_path / "scene", SceneSpec(num_frames=4, num_points=20))
    gt = load_ground_truth(scene / "gt")
    reconstruction = pycolmap.Reconstruction(scene / "gt")
    assert len(gt) == 4
    for image in reconstruction.images.values():
        point = np.array([0.1, 0.2, 0.3])
        expected = image.project_point(point)
        np.testing.assert_allclose(_project(gt[image.name], point), expected, atol=1e-9)
    # the scene root is searched one level down
    assert sorted(load_ground_truth(scene)) == sorted(gt)


@pytest.mark.parametrize(
    "content, message",
    [
        ("3\nview.png 1 2 3\n", "announces 3"),
        ("1\nview.png " + " ".join(["1"] * 20) + "\n", "21 numbers"),
        ("1\nview.png " + " ".join(["2"] * 21) + "\n", "proper rotation"),
        ("nope\n", "starts with the number"),
    ],
)
def test_middlebury_par_errors(tmp_path, content, message):
    path = tmp_path / "bad_par.txt"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_middlebury_par(path)


def test_missing_or_unknown_ground_truth(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_ground_truth(tmp_path / "missing")
    with pytest.raises(InputError, match="no ground truth"):
        load_ground_truth(tmp_path)
    (tmp_path / "poses.csv").write_text("x")
    with pytest.raises(InputError, match="unknown ground-truth file"):
        load_ground_truth(tmp_path / "poses.csv")


def _axes_convergence(gt: dict[str, CameraGT]) -> tuple[np.ndarray, np.ndarray]:
    """Depth along each optical axis of the point closest to all axes, and each axis' distance to it."""
    centers = np.array([c.center for c in gt.values()])
    axes = np.array([c.R[2] for c in gt.values()])  # viewing direction in world coordinates
    projectors = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    focus = np.linalg.solve(projectors.sum(0), np.einsum("nij,nj->i", projectors, centers))
    depth = np.einsum("ni,ni->n", focus - centers, axes)
    miss = np.linalg.norm(np.einsum("nij,nj->ni", projectors, focus - centers), axis=1)
    return depth, miss


def test_shared_temple_ground_truth(shared_data):
    if not (shared_data / "temple_ring").is_dir() or not (shared_data / "temple_ring_full").is_dir():
        pytest.skip("temple_ring scenes absent")
    subset = load_ground_truth(shared_data / "temple_ring")
    full = load_ground_truth(shared_data / "temple_ring_full" / "templeR_par.txt")
    assert len(subset) == 19 and sorted(subset)[0] == "templeR0013.png"
    assert len(full) == 47
    np.testing.assert_allclose(full["templeR0001.png"].K, K_TEST)
    # the ring's cameras all look at the temple: their optical axes meet within ~1 cm, 0.56 m ahead
    depth, miss = _axes_convergence(full)
    assert np.all((depth > 0.5) & (depth < 0.6))
    assert miss.max() < 0.02


def test_shared_fountain_ground_truth(shared_data):
    scene = shared_data / "fountain_p11"
    if not scene.is_dir():
        pytest.skip("fountain_p11 absent")
    gt = load_ground_truth(scene)
    assert sorted(gt) == [f"{i:04d}.jpg" for i in range(11)]
    K_file = np.loadtxt(scene / "images" / "K.txt")
    for cam in gt.values():
        np.testing.assert_allclose(cam.K, K_file)
    np.testing.assert_allclose(gt["0000.jpg"].center, [-7.28137, -7.57667, 0.204446], atol=1e-4)
    steps = np.linalg.norm(np.diff([gt[n].center for n in sorted(gt)], axis=0), axis=1)
    assert np.all((steps > 1.3) & (steps < 2.2))  # SOURCE.md: consecutive centres 1.4-2.1 m apart
    depth, miss = _axes_convergence(gt)
    assert np.all(depth > 5) and np.all(miss < 0.1 * depth)


# ------------------------------------------------------------------------------------------------ metrics


def test_pose_auc_hand_computed():
    # sorted errors 0.5, 2, 4, inf -> recall 1/4 steps; trapezoids from (0, 0), closed flat at the threshold
    # @1: 0.5*0.25/2 + 0.5*0.25                       = 0.1875
    # @3: 0.0625 + 1.5*(0.25+0.5)/2 + 1*0.5           = 1.125 / 3
    # @5: 0.0625 + 0.5625 + 2*(0.5+0.75)/2 + 1*0.75   = 2.625 / 5
    assert pose_auc([4.0, math.inf, 0.5, 2.0], [1, 3, 5]) == pytest.approx([18.75, 37.5, 52.5])
    assert pose_auc([0.0, 0.0], [1, 3]) == pytest.approx([100.0, 100.0])
    assert pose_auc([math.inf] * 3, [1, 5]) == pytest.approx([0.0, 0.0])
    assert pose_auc([], [1]) == [0.0]


def test_rotation_angle_precise_near_zero_and_180():
    for degrees in (1e-4, 0.01, 2.0, 90.0, 179.9, 180.0):
        R = Rotation.from_rotvec(np.deg2rad(degrees) * np.array([0.6, 0.0, 0.8])).as_matrix()
        assert rotation_angle_deg(R) == pytest.approx(degrees, rel=1e-9)


def test_relative_pose_error_is_sign_sensitive_and_takes_the_max():
    I, zero = np.eye(3), np.zeros(3)
    t1 = np.array([1.0, 0.0, 0.0])
    assert relative_pose_error_deg(I, zero, I, -t1, I, zero, I, t1) == pytest.approx(180.0)
    # rotation of 3 deg about the baseline leaves the translation direction, error = 3
    R3 = Rotation.from_rotvec(np.deg2rad(3.0) * t1).as_matrix()
    assert relative_pose_error_deg(I, zero, R3, t1, I, zero, I, t1) == pytest.approx(3.0)
    # translation direction off by 10 deg with an exact rotation, error = 10
    t_off = Rotation.from_rotvec(np.deg2rad(10.0) * np.array([0, 0, 1.0])).apply(t1)
    assert relative_pose_error_deg(I, zero, I, 5 * t_off, I, zero, I, t1) == pytest.approx(10.0)


# ------------------------------------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("eval") / "scene", SceneSpec(num_frames=12, num_points=150))


def _edited_copy(scene, tmp_path, edit, name: str = "model") -> tuple:
    reconstruction = pycolmap.Reconstruction(scene / "gt")
    edit(reconstruction)
    out = tmp_path / name
    out.mkdir()
    reconstruction.write(out)
    return out, reconstruction


def _rotate_one_camera(reconstruction, degrees: float) -> str:
    """Turn one camera about its own centre; every pair with it then has error exactly `degrees`."""
    image = reconstruction.image(sorted(reconstruction.images)[4])
    pose = image.cam_from_world()
    delta = Rotation.from_rotvec(np.deg2rad(degrees) * np.array([0.0, 0.6, 0.8])).as_matrix()
    reconstruction.frame(image.frame_id).rig_from_world = pycolmap.Rigid3d(
        pycolmap.Rotation3d(delta @ pose.rotation.matrix()), delta @ pose.translation)
    return image.name


def _similarity(reconstruction) -> None:
    rotation = pycolmap.Rotation3d(Rotation.from_euler("xyz", [30, -50, 110], degrees=True).as_matrix())
    reconstruction.transform(pycolmap.Sim3d(3.7, rotation, np.array([10.0, -4.0, 2.5])))


def test_evaluate_ground_truth_against_itself(scene):
    result = evaluate(scene / "gt", scene / "gt")
    assert (result.num_gt_images, result.num_registered, result.num_pairs) == (12, 12, 66)
    assert result.num_points == 150
    assert result.mean_track_length == pytest.approx(12.0)
    assert result.mean_reprojection_error < 1e-6
    assert result.auc == pytest.approx((100.0, 100.0, 100.0))
    assert result.unregistered == []
    assert "12/12" in format_eval(result)


# 55 of 66 pairs exact, 11 pairs (those with the turned camera) at 2 deg:
# @1: 55/66; @3: (2*(55/66+56/66)/2 + 1*1) / 3; @5: (2*(55/66+56/66)/2 + 3*1) / 5
ROTATED_AUC = (100 * 55 / 66, 100 * (111 / 66 + 1) / 3, 100 * (111 / 66 + 3) / 5)


def test_evaluate_one_rotated_camera(scene, tmp_path):
    model, _ = _edited_copy(scene, tmp_path, lambda r: _rotate_one_camera(r, 2.0))
    result = evaluate(model, scene / "gt")
    assert result.num_registered == 12
    assert result.auc == pytest.approx(ROTATED_AUC, abs=1e-3)
    assert result.auc_at(1.0) == pytest.approx(83.333, abs=1e-3)


def test_evaluate_is_invariant_to_a_similarity(scene, tmp_path):
    def edit(reconstruction):
        _rotate_one_camera(reconstruction, 2.0)
        _similarity(reconstruction)

    model, reconstruction = _edited_copy(scene, tmp_path, edit)
    some_image = next(iter(reconstruction.images.values()))
    assert np.linalg.norm(some_image.projection_center()) > 10  # the model really moved
    assert evaluate(model, scene / "gt").auc == pytest.approx(ROTATED_AUC, abs=1e-3)
    # and the untouched ground truth, moved by the same kind of transform, still scores 100
    moved, _ = _edited_copy(scene, tmp_path, _similarity, name="moved")
    assert evaluate(moved, scene / "gt").auc == pytest.approx((100.0, 100.0, 100.0))


def test_evaluate_unregistered_image_counts_as_infinite_error(scene, tmp_path):
    dropped = {}

    def edit(reconstruction):
        image = reconstruction.image(sorted(reconstruction.images)[7])
        dropped["name"] = image.name
        reconstruction.deregister_frame(image.frame_id)

    model, _ = _edited_copy(scene, tmp_path, edit)
    result = evaluate(model, scene / "gt")
    assert (result.num_gt_images, result.num_registered) == (12, 11)
    assert result.unregistered == [dropped["name"]]
    assert result.auc == pytest.approx((100 * 55 / 66,) * 3)  # 11 of 66 pairs are infinite


def test_evaluate_matches_names_by_basename_and_restricts_to_images(scene):
    gt = {f"photos/{name}": cam for name, cam in load_ground_truth(scene / "gt").items()}
    result = evaluate(scene / "gt", gt)
    assert result.num_registered == 12 and result.auc[0] == pytest.approx(100.0)
    subset = sorted(gt)[:5]
    result = evaluate(scene / "gt", gt, image_names=[name.split("/")[1] for name in subset])
    assert (result.num_gt_images, result.num_pairs) == (5, 10)


def test_eval_main_writes_json(scene, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert eval_main([str(scene / "gt"), "--gt", str(scene / "gt"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["num_registered"] == 12 and data["auc@1"] == pytest.approx(100.0)
    assert "AUC@5°" in capsys.readouterr().out
    assert eval_main([str(tmp_path / "nothing"), "--gt", str(scene / "gt")]) == 2


def test_evaluate_on_copied_model_folder(scene, tmp_path):
    shutil.copytree(scene / "gt", tmp_path / "sparse" / "0")
    result = evaluate(tmp_path / "sparse" / "0", scene)
    assert result.num_registered == 12
