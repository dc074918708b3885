"""The export stage (recon.export): formats made once per model, never deleting each other's files, and the image
folder taken from what the SfM stage recorded."""

from __future__ import annotations

import shutil

import pytest

from feature_backends.errors import InputError
from recon.cli import main
from recon.export import ExportOptions, export


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
