"""The mapping engines (incremental, global, hierarchical, auto) on generated correspondence scenes with known
poses (recon.synthetic_tracks: features and matches written from the ground truth, no images to match, so each
mapping takes seconds): every engine registers every view within a pose-error bound, the principal-point step
and the exports work after each, `auto` registers whole a scene that incremental mapping splits, its choice
reaches the result, and engine options are checked before any work."""

import json

import numpy as np
import pycolmap
import pytest

from feature_backends.errors import ConfigError
from recon.eval import evaluate
from recon.export import export
from recon.options import parse_overrides
from recon.sfm import SfMOptions, reconstruct
from recon.sfm.auto import choose, first_engine
from recon.sfm.mapping import pipeline_options
from recon.synthetic_tracks import RingSpec, camera_enu, enu_to_wgs84, make_ring_scene, ring_cameras

# 24 views around an object, principal point 14 px right of and 9 px above the centre.
PLAIN = RingSpec(principal_offset=(14.0, -9.0))
# Two cuts where the ring's neighbours share 16 matches: incremental mapping splits into two halves of 12.
WEAK = RingSpec(weak_links=(0, 12), weak_matches=16, window=1)
# Guessed focal length (no EXIF) and weak cuts: global mapping (after view-graph calibration) splits, incremental not.
GUESSED = RingSpec(weak_links=(0, 12), weak_matches=20, window=3, exif_focal=False)


def _map(scene, out, **options):
    options = SfMOptions(fresh_process=False, **options)
    options.check()
    return reconstruct(out, scene / "images", scene / "pairs.txt", scene / "features.h5", scene / "matches.h5",
                       options)


@pytest.fixture(scope="module")
def plain_scene(tmp_path_factory):
    return make_ring_scene(tmp_path_factory.mktemp("plain"), PLAIN)


# hierarchical twice: one cluster (the default leaf size of 500 images), and 2 clusters of 12 + 6 shared views mapped
# on 2 workers, then merged by pycolmap (measured AUC@1 96.2 before the principal-point step, as incremental).
CLUSTERED = {"hierarchical.clustering_options.leaf_max_num_images": 12,
             "hierarchical.clustering_options.image_overlap": 6, "hierarchical.num_workers": 2}


@pytest.mark.parametrize("engine,overrides", [("incremental", {}), ("global", {}), ("hierarchical", {}),
                                              ("hierarchical", CLUSTERED)])
def test_engine_registers_every_view_then_principal_point_and_exports(engine, overrides, plain_scene, tmp_path):
    # The principal-point step forced ('always'): whether its estimate is kept by default is calibration.py's
    # rule, and this scene is at its limit (sigma 5.8 px after incremental, 7.1 px after the clustered hierarchical
    # merge, against 1 % of 640 px).
    result = _map(plain_scene, tmp_path, mapper=engine, mapper_options=overrides, refine_principal_point="always")
    assert result.engine == engine and result.num_registered == 24 and result.num_models == 1
    # The principal point, 16.6 px off centre, is found after every engine (incremental: 4.1 px from the truth,
    # AUC@1/3 38.7/79.6 against 0.2/47.6 with it held at the centre; clustered hierarchical 2.4 px, 63.4/87.8).
    camera = next(iter(pycolmap.Reconstruction(result.sparse_dir).cameras.values()))
    error = np.hypot(camera.principal_point_x - 334.0, camera.principal_point_y - 231.0)
    scores = evaluate(result.sparse_dir, plain_scene / "gt")
    assert error < 6.0, camera
    assert scores.auc_at(1.0) > 30 and scores.auc_at(3.0) > 75, scores
    written = export(tmp_path, ["nerfstudio"], plain_scene / "images")
    frames = json.loads(written["nerfstudio"].read_text())["frames"]
    assert len(frames) == 24


def test_auto_registers_whole_the_scene_incremental_mapping_splits(tmp_path):
    scene = make_ring_scene(tmp_path / "scene", WEAK)
    incremental = _map(scene, tmp_path / "incremental", mapper="incremental")
    assert incremental.num_registered == 12 and incremental.num_models == 2  # the scene does split
    result = _map(scene, tmp_path / "auto", mapper="auto")
    assert result.engine == "global" and result.num_registered == 24 and result.num_models == 1
    assert evaluate(result.sparse_dir, scene / "gt").auc_at(1.0) > 90
    runs = result.engine_runs
    assert runs["global"]["registered"] == 24 and runs["incremental"]["registered"] == 12, runs
    assert "kept global (more views)" in result.engine_reason
    recorded = json.loads((tmp_path / "auto" / "sfm" / "engine.json").read_text())
    assert recorded["engine"] == "global" and result.to_dict()["engine"] == "global"


def test_auto_keeps_a_complete_incremental_model_without_running_global(tmp_path):
    scene = make_ring_scene(tmp_path / "scene", GUESSED)
    assert _map(scene, tmp_path / "global", mapper="global").num_registered < 24  # global first would split it
    result = _map(scene, tmp_path / "auto", mapper="auto")
    assert result.engine == "incremental" and result.num_registered == 24 and result.num_models == 1
    assert list(result.engine_runs) == ["incremental"], result.engine_runs
    assert "global mapper not needed" in result.engine_reason
    assert result.refinement["filtered_observations"] >= 0 and result.refinement["threshold_px"] > 0


def test_auto_maps_incremental_up_to_the_hierarchical_cluster_size():
    # above it the hierarchical mapper clusters the view graph and maps the clusters in parallel; up to it, it would
    # make one cluster, i.e. be the incremental mapper
    assert first_engine(pipeline_options("auto", {}, 500, -1, 0), 500) == "incremental"
    assert first_engine(pipeline_options("auto", {}, 501, -1, 0), 501) == "hierarchical"
    sections = pipeline_options("auto", {"hierarchical.clustering_options.leaf_max_num_images": 40}, 41, -1, 0)
    assert first_engine(sections, 41) == "hierarchical" and first_engine(sections, 40) == "incremental"


def test_auto_tie_break_rejects_a_model_that_lost_its_points():
    """Measured: on the demo scene the calibrated global mapper registers all 12 views with 124 points at 0.368 px
    (AUC@1 10.4), incremental 448 points at 0.592 px (AUC@1 86.0); on temple_ring 3240 points at 0.250 px
    (39.2) against 3291 at 0.275 px (34.0)."""
    demo = {"global": {"registered": 12, "points": 124, "reprojection_error": 0.368},
            "incremental": {"registered": 12, "points": 448, "reprojection_error": 0.592}}
    assert choose(demo)[0] == "incremental"
    temple = {"global": {"registered": 19, "points": 3240, "reprojection_error": 0.250},
              "incremental": {"registered": 19, "points": 3291, "reprojection_error": 0.275}}
    assert choose(temple)[0] == "global"
    split = {"global": {"registered": 24, "points": 1800, "reprojection_error": 0.6},
             "incremental": {"registered": 12, "points": 980, "reprojection_error": 0.5}}
    assert choose(split)[0] == "global"


def inner_of(sections):
    return sections["hierarchical"].incremental_options


def test_engine_options_are_checked_before_any_work():
    sections = pipeline_options("hierarchical", {"num_workers": 2, "clustering_options.leaf_max_num_images": 50},
                                100, -1, 0)
    assert sections["hierarchical"].num_workers == 2
    assert sections["hierarchical"].clustering_options.leaf_max_num_images == 50
    sections = pipeline_options("auto", {"global.mapper.ba_num_iterations": 2,
                                         "view_graph_calibration.max_calibration_error": 3.0}, 100, -1, 0)
    assert sections["global"].mapper.ba_num_iterations == 2
    assert sections["view_graph_calibration"].max_calibration_error == 3.0
    # auto, unprefixed: every engine auto may run that has the key (incremental, also inside hierarchical; global)
    sections = pipeline_options("auto", {"mapper.init_min_num_inliers": 50, "min_num_matches": 30,
                                         "incremental.ba_local_max_num_iterations": 7}, 100, -1, 0)
    inner = sections["hierarchical"].incremental_options
    assert sections["incremental"].mapper.init_min_num_inliers == inner.mapper.init_min_num_inliers == 50
    assert sections["incremental"].min_num_matches == inner.min_num_matches == sections["global"].min_num_matches == 30
    assert sections["incremental"].ba_local_max_num_iterations == inner.ba_local_max_num_iterations == 7
    # the command line nests dotted keys (recon.options.parse_overrides): the same under auto, where only the
    # incremental options have mapper.ba_local_num_images
    nested = parse_overrides(["mapper.ba_local_num_images=4", "global.mapper.ba_num_iterations=2"], "--mapper-option")
    sections = pipeline_options("auto", nested, 100, -1, 0)
    assert sections["incremental"].mapper.ba_local_num_images == 4 == inner_of(sections).mapper.ba_local_num_images
    assert sections["global"].mapper.ba_num_iterations == 2
    for mapper, overrides, message in [
        ("auto", {"mapper.no_such_option": 50}, "unknown pycolmap option 'mapper.no_such_option' of Incremental"),
        ("incremental", {"global.mapper.ba_num_iterations": 2}, "does not use the global options"),
        ("auto", {"incremental": 5}, "name a field of the incremental options"),
        ("hierarchical", {"clustering_options.no_such": 1}, "unknown pycolmap option"),
        ("global", {"mapper.ba_num_iterations": "many"}, "expected a value like"),
        ("sideways", {}, "unknown mapper"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SfMOptions(mapper=mapper, mapper_options=overrides).check()


@pytest.mark.parametrize("engine", ["incremental", "global"])
def test_gps_pose_priors_give_a_metric_model_aligned_to_gps(engine, tmp_path):
    spec = RingSpec(gps_sigma=0.3)  # a 6 m ring: 0.3 m of GPS noise per axis
    scene = make_ring_scene(tmp_path / "scene", spec)
    result = _map(scene, tmp_path / "out", mapper=engine, use_pose_priors=True, pose_prior_std=0.3)
    assert result.num_registered == 24 and result.georeference["images_with_gps"] == 24
    with pycolmap.Database.open(tmp_path / "out" / "sfm" / "database.db") as db:
        priors = db.read_all_pose_priors()
    assert len(priors) == 24 and priors[0].coordinate_system == pycolmap.PosePriorCoordinateSystem.WGS84
    # True centres in the east-north-up frame at the first prior (the recorded origin).
    true_wgs84 = enu_to_wgs84(spec.gps_origin, camera_enu(spec, ring_cameras(spec)))
    origin = result.georeference["enu_origin_wgs84"]
    truth = pycolmap.GPSTransform().ellipsoid_to_enu(true_wgs84, *origin)
    model = pycolmap.Reconstruction(result.sparse_dir)
    centres = np.array([model.find_image_with_name(name).projection_center() for name in spec.names])
    errors = np.linalg.norm(centres - truth, axis=1)
    # Within the prior noise (measured: median 0.14 m, max 0.25 m for both engines).
    assert np.median(errors) < 0.3 and errors.max() < 0.6, errors
    # Metric scale: the ring's diameter (12 m) from the model.
    diameters = np.linalg.norm(centres[:12] - centres[12:], axis=1)
    np.testing.assert_allclose(diameters, np.linalg.norm(truth[:12] - truth[12:], axis=1), rtol=0.02)
