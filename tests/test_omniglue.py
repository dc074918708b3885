"""OmniGlue (feature_backends/omniglue.py) through onnxruntime.

The published ONNX exports (sp_v6.onnx, omniglue.onnx) cannot be downloaded here: these tests build small graphs
with the same input and output names and shapes (tests/onnx_graphs.py) and a random, 1-block DINOv2 ViT of
OmniGlue's width (768) in place of ViT-B/14, and check the contract (resizing rules, coordinate conventions, the
descriptor layout, mutual-max matching and its threshold). No numerical parity with the published OmniGlue."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from feature_backends import omniglue  # noqa: E402
from feature_backends.errors import ConfigError  # noqa: E402
from feature_backends.registry import get_backend  # noqa: E402

from onnx_graphs import bright_superpoint, nearest_position_omniglue  # noqa: E402


def _official_lookup(keypoint, descriptor_map):
    """google-research/omniglue utils.lookup_descriptor_bilinear, restated (loops) as the reference."""
    height, width = descriptor_map.shape[:2]
    x_range = [math.floor(keypoint[0])]
    if not float(keypoint[0]).is_integer() and keypoint[0] < width - 1:
        x_range.append(x_range[0] + 1)
    y_range = [math.floor(keypoint[1])]
    if not float(keypoint[1]).is_integer() and keypoint[1] < height - 1:
        y_range.append(y_range[0] + 1)
    out = np.zeros(descriptor_map.shape[2])
    for x in x_range:
        for y in y_range:
            out += (1 - abs(keypoint[0] - x)) * (1 - abs(keypoint[1] - y)) * descriptor_map[y, x]
    return out


def test_lookup_and_resize_rules_are_the_official_ones():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(5, 7, 3)).astype(np.float32)
    points = np.concatenate([rng.uniform(0, [7, 5], (50, 2)), [[0, 0], [3, 2], [6.5, 4.5], [6.9, 4.9], [6, 1.25]]])
    expected = np.array([_official_lookup(p, grid) for p in points])
    np.testing.assert_allclose(omniglue.lookup_bilinear(points.astype(np.float32), grid), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="outside the descriptor map"):
        omniglue.lookup_bilinear(np.array([[7.5, 1.0]], np.float32), grid)
    assert omniglue.dino_input_size(1000, 750) == (630, 462)  # 630 x int(472.5) → floored to x14
    assert omniglue.dino_input_size(480, 640) == (462, 630)
    assert omniglue.dino_input_size(100, 60) == (98, 56)  # no upscaling, floored to x14
    assert [omniglue.superpoint_size(s) for s in (59, 60, 61, 64)] == [56, 64, 64, 64]


def test_mutual_max_and_threshold():
    assignment = np.array([[0.5, 0.2, 0.0], [0.6, 0.1, 0.0], [0.0, 0.0, 0.0005]], np.float32)
    matches, values = omniglue.mutual_max_matches(assignment, 1e-3)
    # row 0's best is column 0, whose best is row 1: not mutual; row 2 is mutual but below the threshold.
    np.testing.assert_array_equal(matches, [-1, 0, -1])
    np.testing.assert_allclose(values, [0, 0.6, 0])


def _tiny_dino():
    from functools import partial

    from kornia.feature.dedode.transformer.dinov2 import Block, DinoVisionTransformer, MemEffAttention

    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=768, depth=1, num_heads=12, mlp_ratio=1,
                                 init_values=1e-5, block_chunks=0, block_fn=partial(Block, attn_class=MemEffAttention))


@pytest.fixture
def graphs(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    bright_superpoint(folder / omniglue.SUPERPOINT.filename)
    nearest_position_omniglue(folder / omniglue.MATCHER.filename)
    torch.save(_tiny_dino().state_dict(), folder / omniglue.DINOV2_B.filename)
    monkeypatch.setattr(omniglue, "dinov2_vitb14", _tiny_dino)
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("RECON_OFFLINE", "1")
    return folder


def test_features_follow_superpoint_and_dino_contracts(graphs):
    height, width = 61, 83  # neither a multiple of 8 nor of 14: both resizes apply
    image = np.full((height, width, 3), 0.1, np.float32)
    image[20:26, 30:36] = 1.0  # one bright square
    backend = get_backend("features", "omniglue", {"max_keypoints": 10})
    features = backend.extract(image)
    keypoints, descriptors = features["keypoints"], features["descriptors"]
    assert descriptors.shape == (1024, len(keypoints)) and 0 < len(keypoints) <= 10
    # SuperPoint ran at 80x64; its integer pixels come back scaled by (83-1)/(80-1), (61-1)/(64-1).
    scaled = keypoints * np.array([79 / 82, 63 / 60], np.float32)
    np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-4)
    assert np.all((keypoints[:, 0] > 28) & (keypoints[:, 0] < 38) & (keypoints[:, 1] > 18) & (keypoints[:, 1] < 28))
    # SuperPoint part: the test graph's descriptor is brightness x ramp; the DINO part: ViT tokens at the keypoints.
    gray = descriptors[255] / 1.0
    np.testing.assert_allclose(descriptors[:256].T, gray[:, None] * np.arange(1, 257) / 256, rtol=1e-5)
    u8 = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    import cv2

    resized = cv2.resize(u8, (70, 56), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    tensor = torch.from_numpy(((resized - omniglue.IMAGENET_MEAN) / omniglue.IMAGENET_STD).transpose(2, 0, 1))[None]
    with torch.inference_mode():
        tokens = backend.dino.get_intermediate_layers(tensor.float(), n=1)[0][0].numpy().reshape(4, 5, 768)
    cells = keypoints / np.array([width, height]) * np.array([5, 4])
    expected = np.array([_official_lookup(c, tokens) for c in cells])
    np.testing.assert_allclose(descriptors[256:].T, expected, atol=1e-4)


def test_matcher_reads_pixels_with_their_image_sizes(graphs):
    rng = np.random.default_rng(0)
    keypoints0 = np.concatenate([rng.uniform([20, 15], [60, 45], (20, 2)), [[0, 0]]]).astype(np.float32)
    order = rng.permutation(20)
    keypoints1 = (keypoints0[:20] * 2)[order]  # same normalised positions in an image twice the size, shuffled
    scores0 = np.ones(21, np.float32)
    scores0[3] = 0.0  # a padded keypoint (score 0) never matches
    features = [{"keypoints": k, "descriptors": rng.normal(size=(1024, len(k))).astype(np.float32), "scores": s,
                 "image_size": np.array(size, np.int64)}
                for k, s, size in ((keypoints0, scores0, (80, 60)), (keypoints1, np.ones(20, np.float32), (160, 120)))]
    result = get_backend("matcher", "omniglue").match(*features)
    expected = np.argsort(order)
    keep = np.arange(20) != 3
    np.testing.assert_array_equal(result["matches0"][:20][keep], expected[keep])
    assert result["matches0"][3] == -1 and result["matches0"][20] == -1  # score 0; no partner near the corner
    np.testing.assert_allclose(result["matching_scores0"][:20][keep], 1.0, atol=1e-6)
    with pytest.raises(ConfigError, match="1024-D descriptors"):
        get_backend("matcher", "omniglue").match({**features[0], "descriptors": features[0]["descriptors"][:256]},
                                                 features[1])


def test_pipeline_runs_every_stage(graphs, synthetic_scene, tmp_path):
    from feature_backends.errors import ReconError
    from feature_backends.store import FeatureReader, MatchReader
    from recon.export import ExportOptions
    from recon.extract import ExtractOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig, run

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:3]
    config = RunConfig(extract=ExtractOptions("omniglue", {"max_keypoints": 64, "resize_max": 160}), match=MatchOptions("omniglue"),
                       export=ExportOptions(formats=()), image_list=names)
    try:
        run(synthetic_scene / "images", tmp_path, config)
    except ReconError as error:
        assert "mapping failed" in str(error)
    with FeatureReader(tmp_path / "features.h5") as reader:
        for name in names:
            feats = reader.read(name)
            assert 0 < len(feats["keypoints"]) <= 64 and feats["descriptors"].shape[0] == 1024
    with MatchReader(tmp_path / "matches.h5") as reader:
        assert reader.has(names[0], names[1])
