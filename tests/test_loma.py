"""LoMa (feature_backends/loma.py) through onnxruntime.

The published graphs cannot be downloaded here, so these tests build small graphs with the same input and
output names and shapes (tests/onnx_graphs.py) whose answers are known: a detector that returns the brightest
pixels, a descriptor that returns the colour at each keypoint, a matcher that pairs the nearest normalised
positions. They prove the contract (names, layouts, the [-1, 1] coordinate convention both ways, dtypes,
min_score filtering, variant selection) and that a file whose SHA-256 differs from COLMAP's pin is refused.
They do not prove numerical parity with the published LoMa networks (see the module docstring)."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from feature_backends import loma  # noqa: E402
from feature_backends.errors import ConfigError, WeightsError  # noqa: E402
from feature_backends.registry import get_backend  # noqa: E402
from feature_backends.weights import sha256_of  # noqa: E402

from onnx_graphs import brightest_pixels_detector, colour_descriptor, nearest_position_matcher  # noqa: E402

DIM = 8


@pytest.fixture
def graphs(tmp_path, monkeypatch):
    """Test graphs under the official file names in $RECON_WEIGHTS_DIR, with the weight table pinned to their
    hashes (the official pins stay checked in test_a_file_with_another_hash_is_refused)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    detector = brightest_pixels_detector(folder / loma.DETECTOR.filename)
    descriptor_g = colour_descriptor(folder / loma.DESCRIPTORS["G"][0].filename, DIM)
    descriptor_b = colour_descriptor(folder / loma.DESCRIPTORS["B"][0].filename, DIM)
    matchers = {variant: nearest_position_matcher(folder / files[0].filename)
                for variant, files in loma.MATCHERS.items()}

    def pinned(weight, path):
        return dataclasses.replace(weight, sha256=sha256_of(path))

    monkeypatch.setattr(loma, "DETECTOR", pinned(loma.DETECTOR, detector))
    monkeypatch.setattr(loma, "DESCRIPTORS", {"G": (pinned(loma.DESCRIPTORS["G"][0], descriptor_g), None),
                                              "B": (pinned(loma.DESCRIPTORS["B"][0], descriptor_b), None)})
    monkeypatch.setattr(loma, "MATCHERS", {v: (pinned(files[0], matchers[v]), files[1])
                                           for v, files in loma.MATCHERS.items()})
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("RECON_OFFLINE", "1")
    return folder


def _dots(width=80, height=60):
    """A dark image with five bright single pixels of different colours, brightest first."""
    image = np.full((height, width, 3), 0.05, np.float32)
    dots = [(7, 5), (70, 50), (40, 30), (12, 44), (61, 9)]
    for rank, (x, y) in enumerate(dots):
        image[y, x] = np.array([1.0, 0.9, 0.8], np.float32) - 0.1 * rank
    return image, np.array(dots, np.float32)


def _bilinear(image, x, y):
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    h, w = image.shape[:2]
    at = lambda yy, xx: image[min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]  # noqa: E731
    return ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1)
            + (1 - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))


def test_features_follow_the_detector_and_descriptor_contracts(graphs):
    import cv2

    image, dots = _dots()
    features = get_backend("features", "loma", {"max_keypoints": 5, "resize_max": None}).extract(image)
    # The graph's [-1, 1] keypoints come back as the exact pixels it picked, in hloc's convention.
    np.testing.assert_allclose(features["keypoints"], dots, atol=1e-4)
    np.testing.assert_allclose(features["scores"], image[dots[:, 1].astype(int), dots[:, 0].astype(int)].mean(1),
                               atol=1e-6)
    # Descriptors: the colour of the 784x784 squashed image at the same normalised position.
    square = cv2.resize(image, (784, 784), interpolation=cv2.INTER_LINEAR)
    for (x, y), descriptor in zip(dots, features["descriptors"].T):
        colour = _bilinear(square, (x + 0.5) * 784 / 80 - 0.5, (y + 0.5) * 784 / 60 - 0.5)
        np.testing.assert_allclose(descriptor[:3], colour, atol=1e-5)
    assert features["descriptors"].shape == (DIM, 5)
    # Downscaled extraction: keypoints are mapped back to the original image (resize 80 -> 40, dots at 2x2 cells).
    half = get_backend("features", "loma", {"max_keypoints": 5, "resize_max": 40}).extract(image)
    assert half["keypoints"].shape == (5, 2)
    assert np.abs(half["keypoints"] - dots).max() <= 1.0


def test_min_score_drops_weak_keypoints(graphs):
    image, dots = _dots()
    features = get_backend("features", "loma", {"max_keypoints": 10, "resize_max": None,
                                                 "min_score": 0.5}).extract(image)
    assert len(features["keypoints"]) == 5  # the five dots (0.6-0.9); the 0.05 background is dropped


def test_matcher_reads_normalised_keypoints_of_each_image_size(graphs):
    rng = np.random.default_rng(0)
    central = rng.uniform([20, 15], [60, 45], (30, 2)).astype(np.float32)
    keypoints0 = np.concatenate([central, [[0.0, 0.0]]]).astype(np.float32)  # the corner point has no partner
    order = rng.permutation(30)
    keypoints1 = ((central + 0.5) * 2 - 0.5)[order]  # the same points in an image twice the size, shuffled
    features = [{"keypoints": k, "descriptors": rng.normal(size=(DIM, len(k))).astype(np.float32),
                 "image_size": np.array(size, np.int64)} for k, size in ((keypoints0, (80, 60)),
                                                                         (keypoints1, (160, 120)))]
    result = get_backend("matcher", "loma").match(*features)
    np.testing.assert_array_equal(result["matches0"][:30], np.argsort(order))
    assert result["matching_scores0"][:30].min() > 0.999
    # min_score 0.1: the corner point's nearest partner is >= 0.49 away in normalised units, exp(-100 d^2) ~ 0.
    assert result["matches0"][30] == -1 and result["matching_scores0"][30] == 0


def test_variant_follows_the_descriptor_and_dimensions_are_checked(graphs):
    from feature_backends.loma import LoMaMatcher

    assert LoMaMatcher.conf_for_features({"backend": "loma", "conf": {"descriptor": "B"}}) == {"variant": "B128"}
    assert LoMaMatcher.conf_for_features({"backend": "loma", "conf": {"descriptor": "G"}}) == {}
    with pytest.raises(ConfigError, match="unknown LoMa matcher 'X'"):
        get_backend("matcher", "loma", {"variant": "X"})
    with pytest.raises(ConfigError, match="no bf16 graph"):
        get_backend("features", "loma", {"descriptor": "B", "bf16": True})


def test_a_graph_with_another_contract_is_refused(graphs):
    # A matcher graph in place of the detector (pinned to its own hash, so only the contract can refuse it).
    path = graphs / loma.DETECTOR.filename
    nearest_position_matcher(path)
    loma.DETECTOR = dataclasses.replace(loma.DETECTOR, sha256=sha256_of(path))  # undone by monkeypatch
    with pytest.raises(WeightsError, match="does not have the inputs of loma_detector.onnx"):
        get_backend("features", "loma")


def test_a_file_with_another_hash_is_refused(tmp_path, monkeypatch):
    """The official table as shipped: COLMAP's SHA-256 pins. Any other bytes under the official name are refused."""
    import feature_backends.loma as shipped

    assert shipped.DETECTOR.sha256 == "b6af99c5e730034ac9b675d1ebe05d0679af4569a3c26f10a6a50f91e02dc512"
    assert all(f.sha256 and len(f.sha256) == 64 for files in shipped.MATCHERS.values() for f in files)
    brightest_pixels_detector(tmp_path / shipped.DETECTOR.filename)  # a valid graph, but not the published one
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("RECON_OFFLINE", "1")
    with pytest.raises(WeightsError, match="checksum mismatch .*expected SHA-256 b6af99c5"):
        get_backend("features", "loma")


def test_pipeline_runs_every_stage(graphs, synthetic_scene, tmp_path):
    """`recon run --features loma --matcher loma` with the test graphs: extraction, matching (the variant from
    features.h5) and the SfM stage run; the test graphs' matches are meaningless, so mapping may fail."""
    from feature_backends.errors import ReconError
    from feature_backends.store import FeatureReader, MatchReader, read_stored_conf
    from recon.export import ExportOptions
    from recon.extract import ExtractOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig, run

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:3]
    config = RunConfig(extract=ExtractOptions("loma", {"max_keypoints": 64, "resize_max": 160, "descriptor": "B"}), match=MatchOptions("loma"),
                       export=ExportOptions(formats=()), image_list=names)
    try:
        run(synthetic_scene / "images", tmp_path, config)
    except ReconError as error:
        assert "mapping failed" in str(error)
    assert read_stored_conf(tmp_path / "matches.h5")["conf"]["variant"] == "B128"
    with FeatureReader(tmp_path / "features.h5") as reader:
        for name in names:
            feats = reader.read(name)
            assert feats["keypoints"].shape == (64, 2) and feats["descriptors"].shape == (DIM, 64)
            assert np.all(feats["keypoints"] >= -0.5) and np.all(feats["keypoints"] <= [639.5, 479.5])
    with MatchReader(tmp_path / "matches.h5") as reader:
        matches, _ = reader.read(names[0], names[1])
        assert 0 < len(matches) <= 64
