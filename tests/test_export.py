"""Masks in extraction, and exports that the real loaders take as they are: nerfstudio's own dataparsers (when
nerfstudio is installed) and gsplat's example COLMAP parser logic at data factors 1, 2, 4, 8."""

import json
import os
import shutil

import numpy as np
import pycolmap
import pytest
from PIL import Image

from feature_backends.errors import InputError
from feature_backends.store import FeatureReader
from recon.cli import main
from recon.export import ExportOptions, export, flat_names
from recon.extract import extract

FACTORS = (1, 2, 4, 8)


def _write_masks(image_dir, mask_dir, names):
    """Zero (ignore) on the left 200 columns and a top band of every image."""
    for name in names:
        width, height = Image.open(image_dir / name).size
        mask = np.full((height, width), 255, np.uint8)
        mask[:, :200] = 0
        mask[:60] = 0
        (mask_dir / f"{name}.png").parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(mask_dir / f"{name}.png")
    return mask_dir


def test_no_keypoint_falls_in_a_mask(synthetic_scene, tmp_path):
    images = synthetic_scene / "images"
    names = sorted(p.name for p in images.iterdir())
    masks = _write_masks(images, tmp_path / "masks", names[:6])  # half the images have no mask: kept whole
    plain = extract("sift", images, tmp_path / "plain.h5")
    masked = extract("sift", images, tmp_path / "masked.h5", mask_dir=masks)
    dropped = 0
    with FeatureReader(plain) as reference, FeatureReader(masked) as result:
        for name in names:
            want, got = reference.read(name), result.read(name)
            if name in names[:6]:
                x, y = np.round(want["keypoints"]).T
                keep = (x >= 200) & (y >= 60)
                x, y = np.round(got["keypoints"]).T
                assert ((x >= 200) & (y >= 60)).all()
                dropped += int((~keep).sum())
            else:
                keep = np.ones(len(want["keypoints"]), bool)
            # Exactly the unmasked keypoints, with their descriptors and scores.
            np.testing.assert_array_equal(got["keypoints"], want["keypoints"][keep])
            np.testing.assert_array_equal(got["descriptors"], want["descriptors"][:, keep])
            np.testing.assert_array_equal(got["scores"], want["scores"][keep])
    assert dropped > 200


def test_flat_names_refuse_collisions():
    assert flat_names(["a/t1.jpg", "b/t1.jpg", "c.jpg"]) == {"a/t1.jpg": "a__t1.jpg", "b/t1.jpg": "b__t1.jpg",
                                                             "c.jpg": "c.jpg"}
    with pytest.raises(Exception, match="share one name"):
        flat_names(["a/b.jpg", "a__b.jpg"])


@pytest.fixture(scope="module")
def exported(synthetic_scene, synthetic_run, tmp_path_factory):
    """A copy of the synthetic run, exported again with masks (undistorted, downscaled, transforms.json)."""
    out = tmp_path_factory.mktemp("export") / "out"
    shutil.copytree(synthetic_run.out_dir, out, symlinks=True)
    images = synthetic_scene / "images"
    masks = _write_masks(images, out.parent / "masks", sorted(p.name for p in images.iterdir()))
    export(out, ExportOptions(formats=("3dgs", "nerfstudio"), mask_dir=masks))
    return out / "undistorted"


def test_export_layout_of_ns_process_data(exported):
    transforms = json.loads((exported / "transforms.json").read_text())
    assert {k: transforms[k] for k in ("k1", "k2", "p1", "p2")} == {"k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0}
    model = pycolmap.Reconstruction(exported / "sparse" / "0")
    ids = {im.name: im_id for im_id, im in model.images.items()}
    assert len(transforms["frames"]) == len(ids) == 12
    for frame in transforms["frames"]:
        assert frame["file_path"].startswith("./images/") and (exported / frame["file_path"]).is_file()
        name = frame["file_path"][len("./images/"):]
        assert frame["colmap_im_id"] == ids[name] and frame["mask_path"] == f"./masks/{name.rsplit('.', 1)[0]}.png"
        mask = np.asarray(Image.open(exported / frame["mask_path"]))
        assert mask.shape == (transforms["h"], transforms["w"]) and set(np.unique(mask)) == {0, 255}
        for factor in (2, 4, 8):
            size = Image.open(exported / f"images_{factor}" / name).size
            assert size == (transforms["w"] // factor, transforms["h"] // factor)
            assert Image.open(exported / f"masks_{factor}" / f"{name.rsplit('.', 1)[0]}.png").size == size
    assert (exported / "sparse_pc.ply").is_file() and transforms["ply_file_path"] == "sparse_pc.ply"
    stamps = json.loads((exported.parent / "exports.json").read_text())
    assert stamps["3dgs"]["downscales"] == [2, 4, 8] and stamps["3dgs"]["masks"]


def gsplat_parser(data_dir, factor):
    """The parts of gsplat's examples/datasets/colmap.py Parser (nerfstudio-project/gsplat, June 2026) that read
    files: pycolmap on sparse/0, names sorted, images_<factor> paired with images/ by sorted relative paths,
    intrinsics divided by the factor and rescaled by the first image's actual size. Returns what it loads."""
    manager = pycolmap.Reconstruction(os.path.join(data_dir, "sparse/0/"))
    names, Ks, sizes = [], {}, {}
    for image in manager.images.values():
        camera = manager.cameras[image.camera_id]
        assert camera.model in (pycolmap.CameraModelId.PINHOLE, pycolmap.CameraModelId.SIMPLE_PINHOLE)
        K = camera.calibration_matrix()
        K[:2, :] /= factor
        Ks[image.camera_id], sizes[image.camera_id] = K, (camera.width // factor, camera.height // factor)
        names.append((image.name, image.camera_id, np.linalg.inv(np.r_[image.cam_from_world().matrix(), [[0, 0, 0, 1]]])))
    names.sort()
    suffix = f"_{factor}" if factor > 1 else ""
    image_dir = os.path.join(data_dir, "images" + suffix)
    rel = lambda d: sorted(os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs)
    colmap_to_image = dict(zip(rel(os.path.join(data_dir, "images")), rel(image_dir)))
    paths = [os.path.join(image_dir, colmap_to_image[name]) for name, _, _ in names]
    width, height = Image.open(paths[0]).size
    colmap_width, colmap_height = sizes[names[0][1]]
    return names, paths, Ks, (width / colmap_width, height / colmap_height)


@pytest.mark.parametrize("factor", FACTORS)
def test_gsplat_colmap_parser_reads_every_data_factor(exported, factor):
    pytest.importorskip("gsplat")
    names, paths, Ks, scale = gsplat_parser(str(exported), factor)
    assert len(paths) == 12 and all(os.path.isfile(p) for p in paths)
    assert [os.path.basename(p) for p in paths] == [name for name, _, _ in names]  # paired with the right image
    assert scale == (1.0, 1.0)  # the downscaled images have the size gsplat derives from the camera
    for path in paths:
        assert Image.open(path).size == Image.open(paths[0]).size


@pytest.mark.parametrize("factor", FACTORS)
def test_nerfstudio_dataparsers_load_the_export(exported, factor):
    pytest.importorskip("nerfstudio")
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    transforms = json.loads((exported / "transforms.json").read_text())
    parsed = NerfstudioDataParserConfig(data=exported, downscale_factor=factor, eval_mode="all").setup()
    outputs = parsed.get_dataparser_outputs("train")
    assert len(outputs.image_filenames) == 12
    suffix = f"_{factor}" if factor > 1 else ""
    assert all(p.parent.name == "images" + suffix and p.is_file() for p in outputs.image_filenames)
    assert all(p.parent.name == "masks" + suffix and p.is_file() for p in outputs.mask_filenames)
    assert int(outputs.cameras.width[0]) == Image.open(outputs.image_filenames[0]).size[0] == transforms["w"] // factor
    colmap = ColmapDataParserConfig(data=exported, colmap_path=exported / "sparse" / "0", images_path=exported / "images",
                                    masks_path=exported / "masks", downscale_factor=factor, eval_mode="all",
                                    load_3D_points=True).setup()
    colmap_outputs = colmap.get_dataparser_outputs("train")
    assert len(colmap_outputs.image_filenames) == 12
    assert all(p.is_file() for p in colmap_outputs.image_filenames + colmap_outputs.mask_filenames)
    assert int(colmap_outputs.cameras.height[0]) == Image.open(colmap_outputs.image_filenames[0]).size[1]


@pytest.mark.parametrize("model", ["OPENCV", "OPENCV_FISHEYE"])
def test_undistorted_export_of_every_camera_model_is_pinhole(synthetic_run, tmp_path, model):
    out = tmp_path / "out"
    shutil.copytree(synthetic_run.out_dir, out, symlinks=True)
    shutil.rmtree(out / "undistorted")
    reconstruction = pycolmap.Reconstruction(out / "sparse" / "0")
    for camera in reconstruction.cameras.values():
        focal, cx, cy = camera.focal_length, camera.principal_point_x, camera.principal_point_y
        camera.model = getattr(pycolmap.CameraModelId, model)
        camera.params = [focal, focal, cx, cy, 0.02, 0.0, 0.0, 0.0]
    reconstruction.write(out / "sparse" / "0")
    export(out, ExportOptions(formats=("3dgs", "nerfstudio"), downscales=(2,)))
    undistorted = pycolmap.Reconstruction(out / "undistorted" / "sparse" / "0")
    assert {c.model.name for c in undistorted.cameras.values()} == {"PINHOLE"}
    camera = next(iter(undistorted.cameras.values()))
    name = next(iter(undistorted.images.values())).name
    assert Image.open(out / "undistorted" / "images" / name).size == (camera.width, camera.height)
    assert json.loads((out / "undistorted" / "transforms.json").read_text())["k1"] == 0.0


# ---------------------------------------------------------------- stamps: each export once per model


@pytest.fixture
def model_only(synthetic_run, tmp_path):
    """A copy of a finished run's model and SfM record, without any export."""
    out = tmp_path / "out"
    shutil.copytree(synthetic_run.out_dir / "sparse", out / "sparse")
    shutil.copytree(synthetic_run.out_dir / "sfm", out / "sfm", ignore=shutil.ignore_patterns("database.db"))
    return out


def test_3dgs_after_nerfstudio_keeps_the_nerfstudio_files(model_only, capsys):
    assert main(["export", str(model_only), "--format", "nerfstudio"]) == 0
    transforms = model_only / "undistorted" / "transforms.json"
    assert transforms.is_file() and (model_only / "undistorted" / "sparse_pc.ply").is_file()
    assert main(["export", str(model_only), "--format", "3dgs"]) == 0
    assert transforms.is_file() and (model_only / "undistorted" / "sparse_pc.ply").is_file()
    assert len(list((model_only / "undistorted" / "images").iterdir())) == 12


def test_a_rerun_on_the_same_model_rewrites_nothing(model_only):
    written = export(model_only, ExportOptions())
    assert set(written) == {"colmap-txt", "ply", "3dgs", "nerfstudio"}
    files = [p for p in model_only.rglob("*") if p.is_file() and p.name != "exports.json"]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert export(model_only, ExportOptions()) == written
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # A new model is exported again.
    (model_only / "sparse" / "0" / "points3D.bin").touch()
    export(model_only, ExportOptions(formats=("ply",)))
    assert (model_only / "points3D.ply").stat().st_mtime_ns > before[model_only / "points3D.ply"]


def test_image_folder_comes_from_the_sfm_record_or_must_be_given(model_only, synthetic_scene):
    shutil.rmtree(model_only / "sfm")
    with pytest.raises(InputError, match="pass --images"):
        export(model_only, ExportOptions(formats=("3dgs",)))
    assert export(model_only, ExportOptions(formats=("3dgs",)), synthetic_scene / "images")["3dgs"].is_dir()
