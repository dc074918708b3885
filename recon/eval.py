"""Ground-truth evaluation of a reconstruction: `recon eval MODEL --gt FILE_OR_DIR`.

The score is the one the matching literature reports (IMC, glue-factory, LightGlue): for every pair of
ground-truth images, the relative pose of the model is compared with the ground-truth relative pose; the
error is max(rotation angle, angle between the translation directions) and the result is the area under
the recall curve up to 1, 3 and 5 degrees, in percent. Relative poses make the score independent of the
model's arbitrary similarity frame, so no alignment is needed. Pairs with an unregistered image count
with infinite error, so an SfM that drops images cannot look better than one that keeps them all.

Design choices:
- The translation-direction error is sign-sensitive (plain angle between unit vectors): SfM, unlike a
  two-view essential-matrix estimate, has no sign ambiguity, so a flipped baseline is a real error.
- The rotation angle uses atan2(|sin|, cos) of the relative rotation instead of arccos of the trace:
  arccos loses precision near 0 deg, exactly where sub-degree AUC thresholds live.
- The AUC is our own few lines of numpy: pycolmap, scipy and kornia have no pose-AUC helper.
- Images are matched by name, falling back to the base name when the model was built from a parent
  folder (`images/0000.jpg` vs `0000.jpg`). A Middlebury `*_par.txt` lists the whole ring even where a
  folder holds a subset, so by default it is restricted to the images present beside it.

Ground-truth formats (see ../shared/data/*/SOURCE.md):
- Middlebury `*_par.txt`: a count, then `name k11..k33 r11..r33 t1 t2 t3` per line, world->camera.
- Strecha `*.camera`: K (3 lines), distortion, R camera->world (3 lines), centre C, `width height`.
- A COLMAP model directory (cameras/images .bin or .txt), e.g. `recon.synthetic`'s `<scene>/gt`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import pycolmap

from feature_backends.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: tuple[float, ...] = (1.0, 3.0, 5.0)
_ROTATION_TOLERANCE = 1e-3  # Strecha files print R with 6 digits


@dataclass(frozen=True)
class CameraGT:
    """One ground-truth camera: intrinsics `K` and world->camera pose `x_cam = R @ x_world + t`."""

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray

    @property
    def center(self) -> np.ndarray:
        return -self.R.T @ self.t


@dataclass
class EvalResult:
    num_gt_images: int
    num_registered: int
    num_points: int
    mean_reprojection_error: float
    mean_track_length: float
    num_pairs: int
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    auc: tuple[float, ...] = ()  # percent, one per threshold
    unregistered: list[str] = field(default_factory=list)

    def auc_at(self, threshold: float) -> float:
        return self.auc[self.thresholds.index(threshold)]

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("auc")
        out["thresholds"] = list(self.thresholds)
        for threshold, value in zip(self.thresholds, self.auc):
            out[f"auc@{threshold:g}"] = value
        return out


# ----------------------------------------------------------------------------------------------------------
# Ground-truth readers


def _check_rotation(R: np.ndarray, where: str) -> None:
    if not np.all(np.isfinite(R)) or np.abs(R @ R.T - np.eye(3)).max() > _ROTATION_TOLERANCE or np.linalg.det(R) < 0:
        raise InputError(f"{where}: the rotation matrix is not a proper rotation (orthonormal, det +1)")


def read_middlebury_par(path: str | Path) -> dict[str, CameraGT]:
    """Read a Middlebury `*_par.txt`: `count` then `name k(9) R(9) t(3)` per line (world->camera)."""
    path = Path(path)
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not lines or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise InputError(f"{path}: a Middlebury *_par.txt starts with the number of cameras")
    count = int(lines[0][0])
    if len(lines) - 1 != count:
        raise InputError(f"{path}: header announces {count} cameras but {len(lines) - 1} lines follow")
    cameras: dict[str, CameraGT] = {}
    for line_number, tokens in enumerate(lines[1:], start=2):
        if len(tokens) != 22:
            raise InputError(f"{path}:{line_number}: expected a name and 21 numbers, got {len(tokens)} fields")
        try:
            values = np.array([float(v) for v in tokens[1:]])
        except ValueError as error:
            raise InputError(f"{path}:{line_number}: {error}") from None
        K, R, t = values[:9].reshape(3, 3), values[9:18].reshape(3, 3), values[18:21]
        _check_rotation(R, f"{path}:{line_number}")
        cameras[tokens[0]] = CameraGT(K=K, R=R, t=t)
    return cameras


def read_strecha_camera(path: str | Path) -> CameraGT:
    """Read one Strecha `.camera` file (R is camera->world and the last pose line the camera centre)."""
    path = Path(path)
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    try:
        numbers = [[float(v) for v in row] for row in rows]
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None
    if len(numbers) < 8 or any(len(numbers[i]) != 3 for i in (0, 1, 2, 4, 5, 6, 7)):
        raise InputError(f"{path}: a Strecha .camera file has K (3 rows), distortion, R (3 rows), centre, size")
    K = np.array(numbers[0:3])
    R_world_from_cam = np.array(numbers[4:7])
    _check_rotation(R_world_from_cam, str(path))
    center = np.array(numbers[7])
    R = R_world_from_cam.T
    return CameraGT(K=K, R=R, t=-R @ center)


def read_strecha_dir(directory: str | Path) -> dict[str, CameraGT]:
    """Read every `<image name>.camera` in a folder, keyed by the image name (`0000.jpg.camera` -> `0000.jpg`)."""
    files = sorted(Path(directory).glob("*.camera"))
    if not files:
        raise InputError(f"{directory}: no *.camera files")
    return {f.name[: -len(".camera")]: read_strecha_camera(f) for f in files}


def read_colmap_gt(model_dir: str | Path) -> dict[str, CameraGT]:
    """Use the posed images of a COLMAP model as ground truth."""
    reconstruction = _read_reconstruction(model_dir)
    cameras = {}
    for image in reconstruction.images.values():
        if not image.has_pose:
            continue
        pose = image.cam_from_world()
        cameras[image.name] = CameraGT(
            K=np.asarray(image.camera.calibration_matrix()),
            R=np.asarray(pose.rotation.matrix()),
            t=np.asarray(pose.translation),
        )
    return cameras


def _is_colmap_model(directory: Path) -> bool:
    return any((directory / f"images{ext}").is_file() for ext in (".bin", ".txt")) and any(
        (directory / f"cameras{ext}").is_file() for ext in (".bin", ".txt")
    )


def _read_reconstruction(model_dir: str | Path) -> pycolmap.Reconstruction:
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not _is_colmap_model(model_dir):
        raise InputError(f"{model_dir}: not a COLMAP model folder (expected cameras/images .bin or .txt)")
    return pycolmap.Reconstruction(model_dir)


def _present_beside(cameras: dict[str, CameraGT], directory: Path) -> dict[str, CameraGT]:
    present = {name: cam for name, cam in cameras.items() if (directory / name).is_file()}
    if present and len(present) < len(cameras):
        logger.info("%s: using the %d of %d ground-truth cameras whose image is present",
                    directory, len(present), len(cameras))
        return present
    return cameras


def load_ground_truth(file_or_dir: str | Path) -> dict[str, CameraGT]:
    """Read ground truth from a Middlebury `*_par.txt`, a Strecha `.camera` file or folder, or a COLMAP model.

    A folder is searched in that order: COLMAP model, `*_par.txt`, `*.camera`, then the same one level down
    (so a scene root like `fountain_p11/` with `gt_dense_cameras/` works).
    """
    path = Path(file_or_dir)
    if not path.exists():
        raise InputError(f"{path}: ground truth not found")
    if path.is_file():
        if path.name.endswith("_par.txt"):
            return _present_beside(read_middlebury_par(path), path.parent)
        if path.suffix == ".camera":
            return {path.name[: -len(".camera")]: read_strecha_camera(path)}
        raise InputError(f"{path}: unknown ground-truth file (expected *_par.txt or *.camera)")
    for directory in [path] + sorted(p for p in path.iterdir() if p.is_dir()):
        if _is_colmap_model(directory):
            return read_colmap_gt(directory)
        par_files = sorted(directory.glob("*_par.txt"))
        if len(par_files) > 1:
            raise InputError(f"{directory}: several *_par.txt files, pass one explicitly: {par_files}")
        if par_files:
            return _present_beside(read_middlebury_par(par_files[0]), directory)
        if any(directory.glob("*.camera")):
            return read_strecha_dir(directory)
    raise InputError(f"{path}: no ground truth found (COLMAP model, *_par.txt or *.camera files)")


# ----------------------------------------------------------------------------------------------------------
# Metrics


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation matrix, accurate near 0 and 180 degrees."""
    sin = 0.5 * np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    cos = 0.5 * (np.trace(R) - 1.0)
    return math.degrees(math.atan2(sin, cos))


def vector_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0.0:
        return 180.0  # a zero baseline has no direction: count it as wrong as possible
    return math.degrees(math.acos(np.clip(np.dot(a, b) / norm, -1.0, 1.0)))


def relative_pose_error_deg(R0: np.ndarray, t0: np.ndarray, R1: np.ndarray, t1: np.ndarray,
                            R0_gt: np.ndarray, t0_gt: np.ndarray, R1_gt: np.ndarray, t1_gt: np.ndarray) -> float:
    """max(rotation error, translation-direction error) of the pose of camera 1 relative to camera 0."""
    R_rel, R_rel_gt = R1 @ R0.T, R1_gt @ R0_gt.T
    t_rel, t_rel_gt = t1 - R_rel @ t0, t1_gt - R_rel_gt @ t0_gt
    return max(rotation_angle_deg(R_rel.T @ R_rel_gt), vector_angle_deg(t_rel, t_rel_gt))


def pose_auc(errors: Sequence[float], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[float]:
    """Area under the recall-vs-error curve up to each threshold, in percent (inf errors allowed).

    The curve starts at (0, 0), steps through the sorted errors with linear interpolation between them
    (trapezoid rule) and is closed flat at the threshold; the area is divided by the threshold.
    """
    errors = np.sort(np.asarray(errors, dtype=float))
    if errors.size == 0:
        return [0.0 for _ in thresholds]
    recall = np.arange(1, errors.size + 1) / errors.size
    errors = np.concatenate([[0.0], errors])
    recall = np.concatenate([[0.0], recall])
    aucs = []
    for threshold in thresholds:
        end = int(np.searchsorted(errors, threshold))
        x = np.concatenate([errors[:end], [threshold]])
        y = np.concatenate([recall[:end], [recall[end - 1]]])
        area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
        aucs.append(100.0 * area / threshold)
    return aucs


def _match_names(gt_names: Iterable[str], model_names: Iterable[str]) -> dict[str, str]:
    """GT name -> model name; exact match first, then a unique base-name match."""
    model_names = list(model_names)
    exact = set(model_names)
    by_base: dict[str, list[str]] = {}
    for name in model_names:
        by_base.setdefault(PurePosixPath(name).name, []).append(name)
    matched = {}
    for gt_name in gt_names:
        if gt_name in exact:
            matched[gt_name] = gt_name
        else:
            candidates = by_base.get(PurePosixPath(gt_name).name, [])
            if len(candidates) == 1:
                matched[gt_name] = candidates[0]
    return matched


def evaluate(model_dir: str | Path, gt_path: str | Path | dict[str, CameraGT],
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
             image_names: Iterable[str] | None = None) -> EvalResult:
    """Score the COLMAP model in `model_dir` against ground truth (a path or `load_ground_truth`'s dict).

    `image_names`, when given, restricts the ground truth to those images (e.g. the folder the model was
    built from), matched like model names (exact, then base name).
    """
    gt = load_ground_truth(gt_path) if not isinstance(gt_path, dict) else gt_path
    if image_names is not None:
        keep = _match_names(gt, image_names)
        gt = {name: gt[name] for name in keep}
    if not gt:
        raise InputError("no ground-truth cameras to evaluate against (check --gt and --images)")
    reconstruction = _read_reconstruction(model_dir)
    posed = {image.name: image for image in reconstruction.images.values() if image.has_pose}
    gt_to_model = _match_names(gt, posed)
    if not gt_to_model and posed:
        logger.warning("no model image name matches the ground truth (e.g. model %r, GT %r)",
                       next(iter(posed)), next(iter(gt)))
    poses = {}
    for gt_name, model_name in gt_to_model.items():
        pose = posed[model_name].cam_from_world()
        poses[gt_name] = (np.asarray(pose.rotation.matrix()), np.asarray(pose.translation))

    names = sorted(gt)
    errors = []
    for i, name0 in enumerate(names):
        for name1 in names[i + 1:]:
            if name0 in poses and name1 in poses:
                errors.append(relative_pose_error_deg(*poses[name0], *poses[name1],
                                                      gt[name0].R, gt[name0].t, gt[name1].R, gt[name1].t))
            else:
                errors.append(math.inf)
    has_points = reconstruction.num_points3D() > 0
    return EvalResult(
        num_gt_images=len(gt),
        num_registered=len(poses),
        num_points=reconstruction.num_points3D(),
        mean_reprojection_error=reconstruction.compute_mean_reprojection_error() if has_points else math.nan,
        mean_track_length=reconstruction.compute_mean_track_length() if has_points else math.nan,
        num_pairs=len(errors),
        thresholds=tuple(float(t) for t in thresholds),
        auc=tuple(pose_auc(errors, thresholds)),
        unregistered=[name for name in names if name not in poses],
    )


def format_eval(result: EvalResult) -> str:
    """A small two-column table for the terminal."""
    rows = [
        ("registered", f"{result.num_registered}/{result.num_gt_images}"),
        ("points", f"{result.num_points}"),
        ("mean reproj. error", f"{result.mean_reprojection_error:.3f} px"),
        ("mean track length", f"{result.mean_track_length:.2f}"),
        ("image pairs", f"{result.num_pairs}"),
    ]
    rows += [(f"AUC@{t:g}°", f"{a:.1f}") for t, a in zip(result.thresholds, result.auc)]
    if result.unregistered:
        shown = ", ".join(result.unregistered[:5]) + (" ..." if len(result.unregistered) > 5 else "")
        rows.append(("unregistered", shown))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="recon eval", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="COLMAP model folder (e.g. OUT/sparse/0)")
    parser.add_argument("--gt", type=Path, required=True,
                        help="ground truth: Middlebury *_par.txt, Strecha *.camera file/folder, or a COLMAP model")
    parser.add_argument("--images", type=Path, default=None,
                        help="restrict the ground truth to the images in this folder")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                        help="AUC thresholds in degrees (default: 1 3 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    return parser


def run_from_args(args: argparse.Namespace) -> EvalResult:
    image_names = None
    if args.images is not None:
        if not args.images.is_dir():
            raise InputError(f"{args.images}: not a folder")
        image_names = [p.relative_to(args.images).as_posix() for p in args.images.rglob("*") if p.is_file()]
    result = evaluate(args.model, args.gt, thresholds=args.thresholds, image_names=image_names)
    print(format_eval(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`recon eval MODEL --gt FILE_OR_DIR [--images DIR] [--json OUT]`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        run_from_args(args)
    except InputError as error:
        print(f"error: {error}")
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(eval_main())
