"""Dense matchers to SfM keypoints: oracle geometry in both keypoint modes, end-to-end runs with a ground-truth
matcher, bounded memory over many pairs, and parity of our RoMa / DKMv3 paths with the reference networks."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from feature_backends import registry
from feature_backends.base import LocalFeatures
from feature_backends.dense_warp import Warp
from feature_backends.errors import ConfigError
from feature_backends.store import FeatureReader, MatchReader
from pairs.io import read_pairs, write_pairs
from recon.dense import is_dense_matcher, match_dense, parse_matcher_name
from recon.dense.anchored import anchor_matches
from recon.extract import extract
from recon.oracles import TranslationOracle, image_key, warp_from_function


def dense_stage(conf, pairs, image_dir, features_path, matches_path, features=None, feature_conf=None):
    """What `recon run` does for a dense matcher: anchored ("sift+oracle") extracts the anchor keypoints first,
    then the dense stage; returns (features.h5, matches.h5)."""
    anchor, _ = parse_matcher_name(conf["name"])
    if anchor is not None:
        extract({"name": features or anchor, **(feature_conf or {})}, image_dir, features_path,
                sorted({n for pair in read_pairs(pairs) for n in pair}))
    return features_path, match_dense(conf, pairs, image_dir, features_path, matches_path)


@pytest.fixture
def oracles(monkeypatch):
    """Short names for the oracles of recon.oracles (scripts pass the dotted paths themselves)."""
    monkeypatch.setitem(registry.BACKENDS["dense"], "translation-oracle", "recon.oracles:TranslationOracle")
    monkeypatch.setitem(registry.BACKENDS["dense"], "scene-oracle", "recon.oracles:SceneOracle")
    monkeypatch.setitem(registry.BACKENDS["dense"], "plane-oracle", "recon.oracles:PlaneOracle")


@pytest.fixture
def crops(tmp_path):
    """Three 120x90 crops of a smooth random canvas at integer offsets, and the oracle's offset table."""
    rng = np.random.default_rng(0)
    canvas = rng.random((40, 50, 3)).astype(np.float32)
    canvas = np.asarray(Image.fromarray((canvas * 255).astype(np.uint8)).resize((200, 160), Image.BICUBIC))
    offsets = {"a.png": (0, 0), "b.png": (17, 9), "c.png": (31, 22)}
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    table = []
    from feature_backends.images import read_image

    for name, (x, y) in offsets.items():
        Image.fromarray(canvas[y:y + 90, x:x + 120]).save(image_dir / name)
        table.append([image_key(read_image(image_dir / name)), x, y])
    pairs = write_pairs(tmp_path / "pairs.txt", [("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png")])
    return image_dir, pairs, offsets, table


def read_matches(path, name0, name1):
    with MatchReader(path) as reader:
        return reader.read(name0, name1)[0]


def test_matcher_names_select_the_dense_stage(oracles):
    assert parse_matcher_name("sift+roma") == ("sift", "roma")
    assert parse_matcher_name("roma") == (None, "roma")
    assert is_dense_matcher("translation-oracle") and is_dense_matcher("dad+translation-oracle")
    assert not is_dense_matcher("mnn") and not is_dense_matcher("sift+mnn")
    with pytest.raises(ConfigError, match="FEATURES\\+DENSE"):
        parse_matcher_name("+roma")


def test_quantised_mode_yields_exactly_the_translated_pixels(crops, oracles, tmp_path):
    image_dir, pairs, offsets, table = crops
    conf = {"name": "translation-oracle", "offsets": table, "cell_size": 1, "max_error": 1}
    features, matches = dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    with FeatureReader(features) as reader:
        keypoints = {name: reader.read_keypoints(name) for name in offsets}
    with MatchReader(matches) as reader:
        for name0, name1 in [("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png")]:
            found, _ = reader.read(name0, name1)
            raw, _ = reader.read_raw(name0, name1)
            shift = np.subtract(offsets[name0], offsets[name1])
            # Every match is exactly the translation, and every sampled pixel pair became one match.
            # (to float32 precision of the normalised warp: 1e-6 px)
            np.testing.assert_allclose(keypoints[name1][found[:, 1]], keypoints[name0][found[:, 0]] + shift, atol=1e-4)
            expected = {tuple(p) for p in np.round(raw["keypoints0"]).astype(int)}
            assert {tuple(p) for p in np.round(keypoints[name0][found[:, 0]]).astype(int)} == expected
            assert len(found) == len(expected) > 300
    # Samples of different pairs on the same pixel share one keypoint: tracks longer than 2 exist.
    ab, bc = read_matches(matches, "a.png", "b.png"), read_matches(matches, "b.png", "c.png")
    assert len(np.intersect1d(ab[:, 1], bc[:, 0])) > 10


def test_quantised_mode_merges_within_cells(crops, oracles, tmp_path):
    image_dir, pairs, offsets, table = crops
    conf = {"name": "translation-oracle", "offsets": table, "cell_size": 4, "max_error": 2}
    features, matches = dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    with FeatureReader(features) as reader:
        a, b = reader.read_keypoints("a.png"), reader.read_keypoints("b.png")
    found = read_matches(matches, "a.png", "b.png")
    error = np.abs(b[found[:, 1]] - (a[found[:, 0]] + np.subtract(offsets["a.png"], offsets["b.png"])))
    # A keypoint and a sample of its cell are < 4 px apart per axis, on each side of the match.
    assert error.max() < 8.0 and np.median(error) <= 1.0
    assert len(np.unique(found[:, 0])) == len(found)  # one-to-one
    cells = np.floor((a + 0.5) / 4).astype(int)
    assert len({tuple(c) for c in cells}) == len(a)  # one keypoint per occupied cell


def brute_force_anchor_matches(keypoints0, keypoints1, shift, radius):
    """Mutual nearest neighbours of the translated keypoints from a full distance matrix: (all pairs that are
    mutually nearest allowing ties, the subset without ties). SIFT returns twins (one position, two
    orientations), where either twin is a correct answer."""
    distance = np.linalg.norm(keypoints0[:, None] + shift - keypoints1[None], axis=-1)
    row_min, col_min = distance.min(1, keepdims=True), distance.min(0, keepdims=True)
    mutual = (distance == row_min) & (distance == col_min) & (distance <= radius)
    unique = mutual & ((distance == row_min).sum(1, keepdims=True) == 1) & ((distance == col_min).sum(0) == 1)
    return {tuple(m) for m in np.argwhere(mutual)}, {tuple(m) for m in np.argwhere(unique)}


@pytest.mark.parametrize("symmetric", [True, False])
def test_anchored_mode_yields_exactly_the_mutual_neighbours(crops, oracles, tmp_path, symmetric):
    image_dir, pairs, offsets, table = crops
    conf = {"name": "sift+translation-oracle", "offsets": table, "symmetric": symmetric, "radius": 1.5,
            "propagate": False}  # the pairwise rule alone (propagation: test_propagation_completes_tracks_...)
    features, matches = dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    with FeatureReader(features) as reader:
        keypoints = {name: reader.read_keypoints(name) for name in offsets}
        assert reader.read("a.png")["descriptors"].shape[0] == 128  # SIFT's own features file
    for name0, name1 in [("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png")]:
        found = {tuple(m) for m in read_matches(matches, name0, name1)}
        shift = np.subtract(offsets[name0], offsets[name1])
        allowed, certain = brute_force_anchor_matches(keypoints[name0], keypoints[name1], shift, 1.5)
        assert certain <= found <= allowed and len(certain) > 20
        assert len({i for i, _ in found}) == len({j for _, j in found}) == len(found)


def test_anchor_matches_respect_certainty_and_cycle():
    size = (40, 30)
    keypoints = np.array([[5.0, 5.0], [20.0, 10.0], [30.0, 20.0]], np.float32)
    forward, certainty = warp_from_function(lambda p: (p, np.ones(len(p), bool)), size, size)
    certainty[10, 20] = 0.0  # keypoint 1 sits on an uncertain pixel
    backward, back_certainty = warp_from_function(lambda p: (p + [0, 8.0] * (p[:, :1] > 25), np.ones(len(p), bool)),
                                                  size, size)
    warp = Warp(forward, certainty, size, size, backward, back_certainty)
    matches0, scores = anchor_matches(warp, keypoints, keypoints, radius=2.0, min_certainty=0.5, cycle=True)
    # 0 maps and maps back; 1 is uncertain; 2 maps forward but its backward warp lands 8 px away.
    np.testing.assert_array_equal(matches0, [0, -1, -1])
    assert scores[0] == pytest.approx(1.0)
    matches0, _ = anchor_matches(warp, keypoints, keypoints, radius=2.0, min_certainty=0.5, cycle=False)
    np.testing.assert_array_equal(matches0, [0, -1, 2])


@pytest.mark.parametrize("matcher", ["translation-oracle", "sift+translation-oracle"])
def test_each_image_is_encoded_once_per_stage(crops, oracles, tmp_path, monkeypatch, matcher):
    image_dir, pairs, _, table = crops  # (a, b), (b, c), (a, c): each image is in two pairs
    encoded = []
    monkeypatch.setattr(TranslationOracle, "encode", lambda self, image: encoded.append(1) or {"image": image})
    dense_stage({"name": matcher, "offsets": table}, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    assert len(encoded) == 3


def test_stage_keys_of_the_other_mode_are_rejected(crops, oracles, tmp_path):
    image_dir, pairs, _, table = crops
    with pytest.raises(ConfigError, match="other dense keypoint mode"):
        dense_stage({"name": "translation-oracle", "offsets": table, "radius": 2}, pairs, image_dir,
                    tmp_path / "f.h5", tmp_path / "m.h5")
    from recon.extract import ExtractOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig

    config = RunConfig(extract=ExtractOptions(features="disk", max_keypoints=10),
                       match=MatchOptions(matcher="sift+translation-oracle"))
    with pytest.raises(ConfigError, match="anchors on 'sift'"):
        config.extract_options()
    assert RunConfig(match=MatchOptions(matcher="dad+roma")).extract_options().features == "dad"
    # The stage itself refuses keypoints of another detector than the one it anchors on.
    extract({"name": "sift", "max_keypoints": 50}, image_dir, tmp_path / "f.h5")
    with pytest.raises(ConfigError, match="holds 'sift' keypoints, but the matcher anchors on 'disk'"):
        match_dense({"name": "disk+translation-oracle", "offsets": table}, pairs, image_dir, tmp_path / "f.h5",
                    tmp_path / "m.h5")


def interrupt_warps_after(monkeypatch, count: int):
    """Make the translation oracle raise KeyboardInterrupt (as Ctrl-C would) on its warp number count + 1;
    returns the original method."""
    original = TranslationOracle.warp_images
    calls = []

    def interrupted(self, image0, image1):
        if len(calls) == count:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, image0, image1)

    monkeypatch.setattr(TranslationOracle, "warp_images", interrupted)
    return original


def test_quantised_resume_equals_an_uninterrupted_run(crops, oracles, tmp_path, monkeypatch):
    image_dir, pairs, offsets, table = crops
    conf = {"name": "translation-oracle", "offsets": table}
    dense_stage(conf, pairs, image_dir, tmp_path / "full_f.h5", tmp_path / "full_m.h5")
    original = interrupt_warps_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    counted = []
    monkeypatch.setattr(TranslationOracle, "warp_images", lambda s, a, b: counted.append(1) or original(s, a, b))
    dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    assert len(counted) == 1  # only the pair the interruption hit is matched again
    with FeatureReader(tmp_path / "f.h5") as resumed, FeatureReader(tmp_path / "full_f.h5") as full:
        for name in offsets:
            np.testing.assert_array_equal(resumed.read_keypoints(name), full.read_keypoints(name))
    for pair in [("a.png", "b.png"), ("b.png", "c.png")]:
        np.testing.assert_array_equal(read_matches(tmp_path / "m.h5", *pair),
                                      read_matches(tmp_path / "full_m.h5", *pair))
    # A complete output is left untouched by another run.
    stamps = [(tmp_path / f).stat().st_mtime_ns for f in ("f.h5", "m.h5")]
    dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    assert len(counted) == 1 and stamps == [(tmp_path / f).stat().st_mtime_ns for f in ("f.h5", "m.h5")]


@pytest.mark.parametrize("matcher", ["scene-oracle", "sift+scene-oracle"])
def test_run_with_the_ground_truth_matcher_registers_every_image(synthetic_scene, oracles, tmp_path, matcher):
    from recon.eval import evaluate
    from recon.export import ExportOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig, run

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:8]  # 28 pairs keep this fast
    config = RunConfig(match=MatchOptions(matcher, {"scene": str(synthetic_scene), "num_matches": 1000}),
                       export=ExportOptions(formats=()), image_list=names)
    result = run(synthetic_scene / "images", tmp_path / "out", config)
    scores = evaluate(result.sfm.sparse_dir, synthetic_scene / "gt", image_names=names)
    assert result.sfm.num_registered == scores.num_registered == 8
    assert scores.auc_at(3.0) > 70 and scores.auc_at(5.0) > 80, scores
    assert result.sfm.mean_reprojection_error < 1.5
    assert result.sfm.mean_track_length > 3.0


@pytest.fixture(scope="module")
def plane_scene(tmp_path_factory):
    from recon.synthetic import PlaneSceneSpec, make_plane_scene

    return make_plane_scene(tmp_path_factory.mktemp("planes"), PlaneSceneSpec(num_frames=6, arc_degrees=30.0))


def test_plane_scene_correspondences_are_exact_and_occlusion_aware(plane_scene):
    from recon.synthetic import cast_rays, load_plane_scene, pixel_grid

    scene = load_plane_scene(plane_scene)
    pixels = pixel_grid(640, 480)
    planes, depth, _ = cast_rays(scene.cameras[0], pixels)
    assert (planes >= 0).mean() > 0.85 and set(np.unique(planes)) == {-1, 0, 1, 2, 3}  # every plane in view
    forward, seen = scene.correspondence(0, 3, pixels)
    back, seen_back = scene.correspondence(3, 0, forward[seen])
    # A covisible pixel maps back onto itself (the geometry is exact), and only part of the frame is covisible.
    np.testing.assert_allclose(back[seen_back], pixels[seen][seen_back], atol=1e-6)
    assert seen_back.mean() > 0.99 and 0.5 < seen.mean() < 0.98, (seen.mean(), seen_back.mean())
    # Occlusion, not only the frame border: some pixels project inside frame 3 and are still hidden there.
    camera = scene.cameras[3]
    hits = planes >= 0
    world = scene.cameras[0].center + (depth[hits, None] * (np.linalg.inv(scene.cameras[0].K) @ np.c_[
        pixels[hits] + 0.5, np.ones(hits.sum())].T).T) @ scene.cameras[0].R
    local = world @ camera.R.T + camera.t
    projected = (local @ camera.K.T)[:, :2] / local[:, 2:] - 0.5
    inside = (projected >= 0).all(axis=1) & (projected[:, 0] < 639) & (projected[:, 1] < 479)
    hidden = inside & ~seen[hits]
    assert hidden.mean() > 0.005, hidden.mean()


def plane_run(scene, out, matcher, **conf):
    from recon.eval import evaluate
    from recon.export import ExportOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig, run

    config = RunConfig(match=MatchOptions(matcher, {"scene": str(scene), **conf}), export=ExportOptions(formats=()))
    result = run(scene / "images", out, config)
    model = pycolmap.Reconstruction(result.sfm.sparse_dir)
    images = [[e.image_id for e in p.track.elements] for p in model.points3D.values()]
    shared = sum(len(i) - len(set(i)) for i in images)
    distinct = np.mean([len(set(i)) for i in images])
    return result, evaluate(result.sfm.sparse_dir, scene / "gt"), shared, distinct


def test_anchored_tracks_have_one_observation_per_image(plane_scene, oracles, tmp_path):
    """The exact warp of a plane scene, anchored on SIFT with keypoint propagation (the default): every image
    registers, poses are near exact, no 3D point has two observations in one image, and points are seen in more
    images than without propagation. Without the track check the pairwise rule alone does produce points with
    two observations in one image (the same scene, measured), so the assertion is not vacuous."""
    result, scores, shared, distinct = plane_run(plane_scene, tmp_path / "a", "sift+plane-oracle")
    print(f"consistent: {result.sfm.num_points} points, {distinct:.2f} images per point, {shared} shared, "
          f"reprojection {result.sfm.mean_reprojection_error:.3f} px, AUC {scores.auc}")
    assert result.sfm.num_registered == scores.num_registered == 6
    assert shared == 0
    assert distinct > 3.5 and result.sfm.num_points > 4000
    assert result.sfm.mean_reprojection_error < 0.4 and scores.auc_at(1.0) > 90
    detected, _, detected_shared, detected_distinct = plane_run(plane_scene, tmp_path / "c", "sift+plane-oracle",
                                                                propagate=False)
    print(f"detected keypoints only: {detected.sfm.num_points} points, {detected_distinct:.2f} images per point")
    assert detected_shared == 0 and distinct > detected_distinct + 0.5
    loose, _, loose_shared, _ = plane_run(plane_scene, tmp_path / "b", "sift+plane-oracle", consistent=False,
                                          propagate=False)
    print(f"pairwise only: {loose.sfm.num_points} points, {loose_shared} observations in an image already seen")
    assert loose_shared > 0


def test_track_check_refuses_a_second_keypoint_in_one_image():
    from recon.dense.anchored import _Tracks

    tracks = _Tracks()
    one = np.ones(4)
    np.testing.assert_array_equal(tracks.add(0, 1, np.array([1, -1, -1, -1]), one), [1, -1, -1, -1])  # a0-b1
    np.testing.assert_array_equal(tracks.add(1, 2, np.array([-1, 2, -1, -1]), one), [-1, 2, -1, -1])  # b1-c2
    # a0-c3 would put c2 and c3 in one track; a0-c2 closes the loop and is kept, as is an unrelated a1-c3.
    np.testing.assert_array_equal(tracks.add(0, 2, np.array([3, -1, -1, -1]), one), [-1, -1, -1, -1])
    np.testing.assert_array_equal(tracks.add(0, 2, np.array([2, 3, -1, -1]), np.array([0.5, 0.9, 0, 0])),
                                  [2, 3, -1, -1])


class GivenKeypoints(LocalFeatures):
    """A detector that returns the keypoints a test chose for each image ([[image key, [[x, y], ...]], ...])."""

    default_conf = {"table": [], "resize_max": None, "max_keypoints": None}

    def _init(self, conf) -> None:
        self.table = {key: np.asarray(points, np.float32).reshape(-1, 2) for key, points in conf.table}

    def _extract_image(self, image):
        keypoints = self.table[image_key(image)]
        return {"keypoints": keypoints, "descriptors": np.ones((len(keypoints), 8), np.float32),
                "scores": np.ones(len(keypoints), np.float32)}


def tracks_of(matches_path, pairs):
    """Union of the matches of `pairs`: one list of (image, keypoint) observations per track."""
    parent = {}

    def root(node):
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    with MatchReader(matches_path) as reader:
        for name0, name1 in pairs:
            for i, j in reader.read(name0, name1)[0]:
                parent[root((name1, int(j)))] = root((name0, int(i)))
    tracks = {}
    for node in parent:
        tracks.setdefault(root(node), []).append(node)
    return list(tracks.values())


def test_propagation_completes_tracks_where_a_keypoint_was_not_detected(crops, oracles, tmp_path, monkeypatch):
    """Four canvas points, all visible in the three crops: P1 detected everywhere, P2 missing in c, P3 missing
    in b, P4 detected only in a. Without propagation the tracks are {a,b,c}, {a,b}, {a,c} and nothing for P4; with
    it every point has one track over all three images, with one observation per image, and the keypoints added
    sit exactly where the translation puts them (b's added P3/P4 then match c's detected P3 and added P4)."""
    from feature_backends.images import read_image

    image_dir, pairs, offsets, table = crops
    monkeypatch.setitem(registry.BACKENDS["features"], "given", f"{__name__}:GivenKeypoints")
    canvas = np.array([[60.3, 50.7], [80.1, 40.2], [45.5, 70.8], [70.6, 62.4]])
    detected = {"a.png": [0, 1, 2, 3], "b.png": [0, 1], "c.png": [0, 2]}
    given = [[image_key(read_image(image_dir / name)), (canvas[index] - offsets[name]).tolist()]
             for name, index in detected.items()]
    all_pairs = [("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png")]
    spans = {}
    for propagate in (False, True):
        out = tmp_path / str(propagate)
        conf = {"name": "given+translation-oracle", "offsets": table, "propagate": propagate}
        dense_stage(conf, pairs, image_dir, out / "f.h5", out / "m.h5", features="given",
                    feature_conf={"table": given})
        tracks = tracks_of(out / "m.h5", all_pairs)
        with FeatureReader(out / "f.h5") as reader:
            features = {name: reader.read(name) for name in offsets}
            counts = {name: reader.keypoint_counts(name) for name in offsets}
        points = {}  # canvas point index → images of its track
        for track in tracks:
            images = [name for name, _ in track]
            assert len(images) == len(set(images))  # one observation per image
            position = {name: features[name]["keypoints"][index] + offsets[name] for name, index in track}
            first = next(iter(position.values()))
            for value in position.values():
                np.testing.assert_allclose(value, first, atol=1e-3)  # every observation is the same point
            points[int(np.argmin(np.linalg.norm(canvas - first, axis=1)))] = sorted(images)
        spans[propagate] = points
        for name, data in features.items():  # hloc's layout, detected keypoints first and unchanged
            total = len(data["keypoints"])
            assert data["descriptors"].shape == (8, total) and data["scores"].shape == (total,)
            np.testing.assert_array_equal(data["keypoints"][:len(detected[name])],
                                          (canvas[detected[name]] - offsets[name]).astype(np.float32))
            np.testing.assert_array_equal(data["descriptors"][:, len(detected[name]):], 0)
            assert counts[name] == (total, len(detected[name]))
        with MatchReader(out / "m.h5") as reader:
            for name0, name1 in all_pairs:
                assert len(reader.read_raw(name0, name1)[0]["matches0"]) == len(features[name0]["keypoints"])
    assert spans[False] == {0: ["a.png", "b.png", "c.png"], 1: ["a.png", "b.png"], 2: ["a.png", "c.png"]}
    assert spans[True] == {index: ["a.png", "b.png", "c.png"] for index in range(4)}
    # Keypoints that no stored match refers to are dropped: matching again without propagation (a new matches
    # file) on the features file that propagation extended leaves the detected keypoints only.
    out = tmp_path / "True"
    (out / "m.h5").unlink()
    dense_stage({"name": "given+translation-oracle", "offsets": table, "propagate": False}, pairs, image_dir,
                out / "f.h5", out / "m.h5", features="given", feature_conf={"table": given})
    with FeatureReader(out / "f.h5") as reader:
        assert {name: reader.keypoint_counts(name)[0] for name in offsets} == {n: len(i) for n, i in detected.items()}
        assert reader.read("b.png")["descriptors"].shape == (8, 2)
    assert len(tracks_of(out / "m.h5", all_pairs)) == 3


@pytest.mark.parametrize("interruption", ["interrupt", "matches lost"])
def test_anchored_propagation_resume_equals_an_uninterrupted_run(crops, oracles, tmp_path, monkeypatch,
                                                                 interruption):
    """Stopped at the third pair (Ctrl-C), or killed after the second pair's keypoints were published but before
    its matches were: the resumed run writes the same keypoints and matches as an uninterrupted one (in the second
    case it first drops the keypoints that no stored match refers to)."""
    from feature_backends import store

    image_dir, pairs, offsets, table = crops
    conf = {"name": "sift+translation-oracle", "offsets": table, "propagate": True}
    dense_stage(conf, pairs, image_dir, tmp_path / "full_f.h5", tmp_path / "full_m.h5")
    with FeatureReader(tmp_path / "full_f.h5") as full:
        assert sum(np.subtract(*full.keypoint_counts(name)) for name in offsets) > 5  # propagation did add some
    original_publish = store._Journal.publish
    if interruption == "interrupt":
        interrupt_warps_after(monkeypatch, 2)
    else:
        publications = []

        def killed(self, reopen):  # the matches file's second publication dies after the keypoints went out
            if self.path.name == "m.h5" and len(publications) == 1:
                self.before_publish()
                self.file.close()
                raise KeyboardInterrupt
            if self.path.name == "m.h5":
                publications.append(1)
            original_publish(self, reopen)

        monkeypatch.setattr(store._Journal, "publish", killed)
        monkeypatch.setattr(store._Journal, "maybe_checkpoint", lambda self: self.dirty and self.publish(True))
    with pytest.raises(KeyboardInterrupt):
        dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    monkeypatch.undo()
    monkeypatch.setitem(registry.BACKENDS["dense"], "translation-oracle", "recon.oracles:TranslationOracle")
    with MatchReader(tmp_path / "m.h5") as reader:
        stored = sum(reader.has(*pair) for pair in [("a.png", "b.png"), ("a.png", "c.png"), ("b.png", "c.png")])
    assert stored == (2 if interruption == "interrupt" else 1)
    if interruption != "interrupt":
        # The second pair's keypoints were published, its matches were not: keypoints nothing refers to.
        found = read_matches(tmp_path / "m.h5", "a.png", "b.png")
        referenced = {"a.png": found[:, 0].max() + 1, "b.png": found[:, 1].max() + 1, "c.png": 0}
        with FeatureReader(tmp_path / "f.h5") as reader:
            counts = {name: reader.keypoint_counts(name) for name in offsets}
        assert any(total > max(detected, referenced[name]) for name, (total, detected) in counts.items()), counts
    dense_stage(conf, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
    with FeatureReader(tmp_path / "f.h5") as resumed, FeatureReader(tmp_path / "full_f.h5") as full:
        for name in offsets:
            a, b = resumed.read(name), full.read(name)
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
            assert resumed.keypoint_counts(name) == full.keypoint_counts(name)
    with MatchReader(tmp_path / "m.h5") as resumed, MatchReader(tmp_path / "full_m.h5") as full:
        for pair in [("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png")]:
            for key in ("matches0", "matching_scores0"):
                np.testing.assert_array_equal(resumed.read_raw(*pair)[0][key], full.read_raw(*pair)[0][key])


def test_memory_stays_flat_over_200_pairs(oracles, tmp_path, monkeypatch):
    """Memory traced while matching 200 pairs (tracemalloc sees numpy buffers, so the oracle's warps too): from
    pair 50 to the end of the stage (aggregation and assignment included) the peak may grow by a small fraction of
    what keeping the 150 further warps would take, and no warp outlives its pair."""
    import gc

    rng = np.random.default_rng(1)
    canvas = np.asarray(Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((400, 300)))
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    from feature_backends.images import read_image

    table, names = [], []
    for index in range(21):  # 21 images → 210 pairs, each image in 20 of them
        x, y = int(rng.integers(0, 240)), int(rng.integers(0, 180))
        name = f"{index:02d}.png"
        Image.fromarray(canvas[y:y + 120, x:x + 160]).save(image_dir / name)
        table.append([image_key(read_image(image_dir / name)), x, y])
        names.append(name)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]][:200]
    pairs_path = write_pairs(tmp_path / "pairs.txt", pairs)
    traced, alive = [], []
    original = TranslationOracle.warp_images

    def measured(self, image0, image1):
        if len(traced) % 50 == 0:
            gc.collect()
            alive.append(sum(type(o) is Warp for o in gc.get_objects()))
        traced.append(tracemalloc.get_traced_memory()[0])
        if len(traced) == 50:
            tracemalloc.reset_peak()
        return original(self, image0, image1)

    monkeypatch.setattr(TranslationOracle, "warp_images", measured)
    conf = {"name": "translation-oracle", "offsets": table, "num_matches": 500, "balanced": False}
    tracemalloc.start()
    try:
        dense_stage(conf, pairs_path, image_dir, tmp_path / "f.h5", tmp_path / "m.h5")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    warp_bytes = 2 * 120 * 160 * 3 * 4  # both directions: (H, W, 2) field + (H, W) certainty, float32
    growth = peak - traced[49]
    print(f"traced at pair 50: {traced[49] / 1e6:.2f} MB, peak after: {peak / 1e6:.2f} MB; "
          f"150 warps: {150 * warp_bytes / 1e6:.1f} MB")
    assert len(traced) == 200 and max(alive) == 0
    assert growth < 0.1 * 150 * warp_bytes, f"grew {growth / 1e6:.1f} MB over 150 pairs"


# ---------------------------------------------------------------------------------------------------------------
# Learned networks with random weights: parity with the reference implementations, strict checkpoint loading.

COARSE, UPSAMPLE = 112, 168  # small resolutions keep two RoMa passes per pair at a few seconds on CPU


@pytest.fixture(scope="module")
def skip_init():
    """Module construction without random initialisation (every weight is loaded afterwards anyway)."""
    import contextlib
    from unittest import mock

    @contextlib.contextmanager
    def patched():
        from romatch.models.transformer.dinov2 import DinoVisionTransformer

        with contextlib.ExitStack() as stack:
            for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "zeros_", "ones_",
                         "constant_", "xavier_uniform_"):
                stack.enter_context(mock.patch(f"torch.nn.init.{name}", lambda tensor, *a, **k: tensor))
            stack.enter_context(mock.patch.object(DinoVisionTransformer, "init_weights", lambda self: None))
            yield

    return patched


@pytest.fixture(scope="module")
def roma_checkpoints(skip_init):
    """Random RoMa + DINOv2 state dicts in the official key layouts."""
    from unittest import mock

    from romatch.models.matcher import RegressionMatcher
    from romatch.models.model_zoo.roma_models import roma_model
    from romatch.models.transformer import vit_large

    from feature_backends.roma import random_state_dict

    with skip_init():
        dinov2 = random_state_dict(vit_large(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp",
                                             block_chunks=0), seed=1)
        with mock.patch.object(RegressionMatcher, "load_state_dict"):
            layout = roma_model(resolution=(COARSE, COARSE), upsample_preds=False, weights=None,
                                dinov2_weights=dinov2, device="cpu", use_custom_corr=False)
    return {"weights": random_state_dict(layout, seed=2), "dinov2": dinov2}


@pytest.mark.shared_data
def test_roma_path_matches_romatch_on_real_images(shared_data, roma_checkpoints, skip_init):
    from romatch.models.model_zoo.roma_models import roma_model

    from feature_backends.images import read_image
    from feature_backends.roma import RoMa

    paths = [shared_data / "temple_ring" / f"templeR00{i}.png" for i in (13, 14, 20)]
    with skip_init():
        reference = roma_model(resolution=(COARSE, COARSE), upsample_preds=True, upsample_res=(UPSAMPLE, UPSAMPLE),
                               weights=roma_checkpoints["weights"], dinov2_weights=roma_checkpoints["dinov2"],
                               device="cpu", use_custom_corr=False, symmetric=True)
        ours = RoMa.from_checkpoints(roma_checkpoints, {"coarse_res": COARSE, "upsample_res": UPSAMPLE},
                                     device="cpu")
    images = [read_image(p) for p in paths]
    # 1. Same input tensors: our wrapper (weights, per-image encoder features, split of the symmetric warp)
    # reproduces romatch's match(), which encodes both images of every pair again. Image 0's encoding is made
    # once and reused for its two pairs, as the dense stage does through its cache.
    encoded = [ours.encode(image) for image in images]
    assert {"coarse.16", "coarse.1", "fine.1"} <= set(encoded[0])  # DINOv2 and both VGG pyramids
    batched_encoder = reference.extract_backbone_features

    def encoder_per_image(batch, batched=True, upsample=False):  # romatch's encoder, one image at a time
        first, second = (reference.encoder(batch[k], upsample=upsample) for k in ("im_A", "im_B"))
        return {stride: torch.cat((first[stride], second[stride])) for stride in first}

    for index in (1, 2):
        warp = ours.warp_encoded(encoded[0], encoded[index])
        tensors = [ours.image_tensor(image) for image in (images[0], images[index])]
        inputs = ([ours.preprocess(t, (COARSE, COARSE)) for t in tensors],
                  {"im_A_high_res": ours.preprocess(tensors[0], (UPSAMPLE, UPSAMPLE)),
                   "im_B_high_res": ours.preprocess(tensors[1], (UPSAMPLE, UPSAMPLE))})
        reference.extract_backbone_features = encoder_per_image
        exact_warp, exact_certainty = reference.match(*inputs[0], **inputs[1])
        reference.extract_backbone_features = batched_encoder
        reference_warp, reference_certainty = reference.match(*inputs[0], **inputs[1])
        width = reference_warp.shape[2] // 2
        # Bit for bit romatch's result when its encoder sees one image at a time, as ours does.
        torch.testing.assert_close(warp.forward, exact_warp[0, :, :width, 2:], atol=0, rtol=0)
        torch.testing.assert_close(warp.backward, exact_warp[0, :, width:, :2], atol=0, rtol=0)
        torch.testing.assert_close(warp.certainty, exact_certainty[0, :, :width], atol=0, rtol=0)
        torch.testing.assert_close(warp.backward_certainty, exact_certainty[0, :, width:], atol=0, rtol=0)
        # romatch's match() itself encodes the two images as a batch of two; oneDNN then rounds differently,
        # which moves romatch's own certainty by ~1.3e-5 (measured: same images, batch vs one at a time).
        torch.testing.assert_close(warp.forward, reference_warp[0, :, :width, 2:], atol=1e-5, rtol=0)
        torch.testing.assert_close(warp.backward, reference_warp[0, :, width:, :2], atol=1e-5, rtol=0)
        torch.testing.assert_close(warp.certainty, reference_certainty[0, :, :width], atol=5e-5, rtol=0)
        torch.testing.assert_close(warp.backward_certainty, reference_certainty[0, :, width:], atol=5e-5, rtol=0)
    warp = ours.warp_images(images[0], images[1])  # the uncached entry point is the same computation
    np.testing.assert_array_equal(warp.forward, ours.warp_encoded(encoded[0], encoded[1]).forward)
    assert warp.size0 == (640, 480)
    # 2. romatch's own file API (PIL decoding and resizing): equal up to PIL's 8-bit rounding of the inputs,
    # far below how much the random network's output moves with the image content.
    file_warp, file_certainty = reference.match(str(paths[0]), str(paths[1]))
    other = ours.warp_images(images[0], images[2])
    difference = (warp.forward - file_warp[0, :, :width, 2:]).abs()
    content = (warp.forward - other.forward).abs()
    assert difference.mean() < 0.01 and difference.mean() < 0.1 * content.mean(), (difference.mean(), content.mean())
    assert (warp.certainty - file_certainty[0, :, :width]).abs().mean() < 0.01
    assert warp.forward.std() > 0.1  # the random network really maps pixels to different places
    sampled = warp.sample(10000, sample_thresh=0.05, seed=0)  # what match_images returns
    assert sampled["keypoints0"].shape == (10000, 2) and sampled["keypoints0"].max() < 640
    np.testing.assert_array_equal(sampled["keypoints1"], warp.sample(10000, sample_thresh=0.05, seed=0)["keypoints1"])


def test_gim_roma_loads_the_lightning_checkpoint_strictly_and_skips_normalisation(roma_checkpoints, skip_init):
    from feature_backends.errors import WeightsError
    from feature_backends.gim import GIMRoMa

    lightning = {"state_dict": {f"model.{k}": v for k, v in roma_checkpoints["weights"].items()}, "epoch": 1}
    with skip_init():
        gim = GIMRoMa.from_checkpoints({"weights": lightning, "dinov2": roma_checkpoints["dinov2"]},
                                       {"coarse_res": COARSE, "upsample": False}, device="cpu")
    image = torch.rand(1, 3, COARSE, COARSE)
    torch.testing.assert_close(gim.preprocess(image, (COARSE, COARSE)), image)  # raw [0, 1] RGB
    # RoMa's per-image encodings serve GIM's weights too: no upsampling pass, so no fine pyramid.
    pixels = np.random.default_rng(0).random((90, 120, 3)).astype(np.float32)
    encoded = gim.encode(pixels)
    assert "coarse.16" in encoded and not any(key.startswith("fine.") for key in encoded)
    np.testing.assert_array_equal(gim.warp_encoded(encoded, encoded).forward,
                                  gim.warp_images(pixels, pixels.copy()).forward)
    missing = dict(lightning["state_dict"])
    missing.pop(next(k for k in missing if "conv_refiner" in k))
    with skip_init(), pytest.raises(WeightsError, match="does not fit"):
        GIMRoMa.from_checkpoints({"weights": {"state_dict": missing}, "dinov2": roma_checkpoints["dinov2"]},
                                 {"coarse_res": COARSE, "upsample": False}, device="cpu")


def published_dkmv3_layout() -> dict[str, tuple[int, ...]]:
    """DKMv3's state-dict keys and shapes as its published construction defines them (Parskatt/DKM
    dkm/models/model_zoo/DKMv3.py; GIM's copy is identical), written out independently of our module."""
    from torchvision.models import resnet50

    layout = {f"encoder.net.{k}": tuple(v.shape) for k, v in resnet50(weights=None).state_dict().items()
              if not k.startswith("fc.")}

    def conv(prefix, out, inp, k=1, bias=True):
        layout[f"{prefix}.weight"] = (out, inp, k, k)
        if bias:
            layout[f"{prefix}.bias"] = (out,)

    def batch_norm(prefix, n):
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.{name}"] = (n,)
        layout[f"{prefix}.num_batches_tracked"] = ()

    for s in ("32", "16"):
        d = "decoder.embedding_decoder"
        conv(f"{d}.feat_input_modules.{s}", 256, 512)
        for block, inp in (("rrb_d", 512), ("rrb_u", 384)):
            conv(f"{d}.{block}.{s}.conv1", 384, inp)
            conv(f"{d}.{block}.{s}.conv2", 384, 384, 3)
            batch_norm(f"{d}.{block}.{s}.bn", 384)
            conv(f"{d}.{block}.{s}.conv3", 384, 384, 3)
        conv(f"{d}.cab.{s}.conv1", 384, 768)
        conv(f"{d}.cab.{s}.conv2", 384, 384)
        conv(f"{d}.terminal_module.{s}", 3, 384)
        conv(f"decoder.gps.{s}.pos_conv", 256, 2)
    conv("decoder.proj.16", 512, 1024)
    conv("decoder.proj.32", 512, 2048)
    refiners = {"16": (1377, 1377, 128), "8": (1137, 1137, 64), "4": (569, 569, 32), "2": (144, 144, 16),
                "1": (12, 24, 6)}
    for s, (inp, hidden, embedding) in refiners.items():
        r = f"decoder.conv_refiner.{s}"
        for block, block_in in [("block1", inp)] + [(f"hidden_blocks.{i}", hidden) for i in range(8)]:
            conv(f"{r}.{block}.0", hidden, 1, 5)  # depthwise 5x5: groups = input channels
            batch_norm(f"{r}.{block}.1", hidden)
            conv(f"{r}.{block}.3", hidden, hidden)
        conv(f"{r}.out_conv", 3, hidden)
        conv(f"{r}.disp_emb", embedding, 2)
    return layout


def test_dkmv3_has_the_published_layout_and_loads_gim_strictly(tmp_path):
    from feature_backends.errors import WeightsError
    from feature_backends.gim import GIMDKM, DKMv3
    from feature_backends.roma import random_state_dict

    model = DKMv3()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == published_dkmv3_layout()
    # GIM's file: Lightning 'state_dict', 'model.' prefix, and upstream's unused classifier (dropped on load).
    state = {f"model.{k}": v for k, v in random_state_dict(model, seed=3).items()}
    state["model.encoder.net.fc.weight"] = torch.zeros(1000, 2048)
    state["model.encoder.net.fc.bias"] = torch.zeros(1000)
    conf = {"coarse_res": [64, 96], "upsample_res": [96, 128]}
    matcher = GIMDKM.from_checkpoints({"weights": {"state_dict": state, "epoch": 0}}, conf, device="cpu")
    rng = np.random.default_rng(0)
    image0 = rng.random((90, 120, 3)).astype(np.float32)
    warp = matcher.warp_images(image0, np.roll(image0, 8, axis=1))
    assert warp.forward.shape == (96, 128, 2) and warp.backward.shape == (96, 128, 2)
    assert torch.isfinite(warp.forward).all() and 0 <= warp.certainty.min() <= warp.certainty.max() <= 1
    assert matcher.match_images(image0, image0)["keypoints0"].shape[1] == 2
    state.pop("model.decoder.conv_refiner.4.out_conv.bias")
    with pytest.raises(WeightsError, match="1 missing keys"):
        GIMDKM.from_checkpoints({"weights": {"state_dict": state}}, conf, device="cpu")


def test_gim_lightglue_checkpoint_feeds_superpoint_and_lightglue_strictly():
    from kornia.feature import LightGlue as KorniaLightGlue

    from feature_backends.errors import WeightsError
    from feature_backends.gim_lightglue import GIMLightGlue, GIMSuperPoint, SuperPointNet
    from feature_backends.roma import random_state_dict

    # SuperPoint's published layer names and shapes (MagicLeap / cvg / GIM): 3x3 VGG blocks, 1x1 heads.
    widths = {"1a": (64, 1), "1b": (64, 64), "2a": (64, 64), "2b": (64, 64), "3a": (128, 64), "3b": (128, 128),
              "4a": (128, 128), "4b": (128, 128), "Pa": (256, 128), "Da": (256, 128)}
    layout = {f"conv{n}.weight": (o, i, 3, 3) for n, (o, i) in widths.items()}
    layout |= {f"conv{n}.bias": (o,) for n, (o, _) in widths.items()}
    layout |= {"convPb.weight": (65, 256, 1, 1), "convPb.bias": (65,), "convDb.weight": (256, 256, 1, 1),
               "convDb.bias": (256,)}
    assert {k: tuple(v.shape) for k, v in SuperPointNet().state_dict().items()} == layout

    preset = {k: v for k, v in KorniaLightGlue.features["superpoint"].items() if k != "weights"}
    lightglue = random_state_dict(KorniaLightGlue(features=None, **preset), seed=4)
    lightglue.pop("confidence_thresholds", None)  # derived from the config; GIM's file has none
    state = {f"superpoint.{k}": v for k, v in random_state_dict(SuperPointNet(), seed=5).items()}
    state |= {f"model.{k}": v for k, v in lightglue.items()}
    checkpoint = {"state_dict": state, "epoch": 0}
    extractor = GIMSuperPoint.from_checkpoints({"weights": checkpoint}, {"max_keypoints": 256}, device="cpu")
    matcher = GIMLightGlue.from_checkpoints({"weights": checkpoint}, device="cpu")
    rng = np.random.default_rng(0)
    image = np.asarray(Image.fromarray((rng.random((30, 40)) * 255).astype(np.uint8)).resize((160, 120)),
                       np.float32)[..., None] / 255
    features0, features1 = extractor.extract(image), extractor.extract(np.roll(image, 4, axis=1))
    assert features0["keypoints"].shape == (256, 2) and features0["descriptors"].shape == (256, 256)
    np.testing.assert_allclose(np.linalg.norm(features0["descriptors"], axis=0), 1, atol=1e-5)
    matches = matcher.match(features0, features1)
    assert matches["matches0"].shape == (256,) and matches["matches0"].max() < 256
    state.pop("model.transformers.0.self_attn.Wqkv.weight")
    with pytest.raises(WeightsError, match="missing"):
        GIMLightGlue.from_checkpoints({"weights": {"state_dict": state}}, device="cpu")


def test_tiny_roma_takes_xfeat_from_kornia_and_weights_from_its_checkpoint():
    from kornia.feature.xfeat import XFeatModel
    from romatch.models.tiny import TinyRoMa as RomatchTinyRoMa

    from feature_backends.errors import WeightsError
    from feature_backends.roma import TinyRoMa, random_state_dict

    state = random_state_dict(RomatchTinyRoMa(xfeat=XFeatModel(), freeze_xfeat=False), seed=7)
    assert any(k.startswith("xfeat.0.block1.") for k in state)  # XFeat's weights live in the tiny checkpoint
    matcher = TinyRoMa.from_checkpoints({"weights": state}, {"resize_max": 160}, device="cpu")
    image = np.random.default_rng(0).random((120, 160, 3)).astype(np.float32)
    warp = matcher.warp_images(image, np.roll(image, 5, axis=1))
    assert warp.forward.shape == (120, 160, 2) and not warp.symmetric
    assert matcher.match_images(image, image)["keypoints0"].shape == (5000, 2)
    state.pop("xfeat.0.block1.0.layer.0.weight")
    with pytest.raises(WeightsError, match="1 missing keys"):
        TinyRoMa.from_checkpoints({"weights": state}, device="cpu")
