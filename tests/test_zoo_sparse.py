"""SuperPoint, LightGlue on SuperPoint, MINIMA's LightGlue, XFeat, LighterGlue and XFeat* with random weights.

No pretrained weight can be downloaded here, so each network gets a random state dict saved under its official
file name and in its official key layout (LightGlue's legacy `self_attn.<i>` names, LighterGlue's `matcher.`
prefix), found through $RECON_WEIGHTS_DIR. The proofs: same weights → same output as an installable reference
(the SuperPoint inside the `dad-detector` wheel, kornia's LightGlue and XFeat called directly), strict loading,
and `recon run` end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feature_backends.errors import ConfigError, WeightsError
from feature_backends.registry import get_backend


def legacy_lightglue_state(features: str, seed: int) -> dict[str, torch.Tensor]:
    """A random kornia LightGlue state dict for `features`, in the key names of cvg's v0.1_arxiv files."""
    from kornia.feature import LightGlue as KorniaLightGlue

    from feature_backends.roma import random_state_dict

    preset = {k: v for k, v in KorniaLightGlue.features[features].items() if k != "weights"}
    state = random_state_dict(KorniaLightGlue(features=None, **preset), seed=seed)
    state.pop("confidence_thresholds")  # derived from the config; the official files do not carry it
    legacy = {}
    for key, value in state.items():
        for i in range(preset.get("n_layers", 9)):
            for kind in ("self_attn", "cross_attn"):
                key = key.replace(f"transformers.{i}.{kind}.", f"{kind}.{i}.")
        legacy[key] = value
    return legacy


@pytest.fixture(scope="module")
def zoo_weights(tmp_path_factory):
    """Random weights under the official names; RECON_WEIGHTS_DIR points at them, downloads are off."""
    from kornia.feature import LightGlue as KorniaLightGlue
    from kornia.feature import XFeatModel

    from feature_backends.roma import random_state_dict
    from feature_backends.superpoint import SuperPointNet

    folder = tmp_path_factory.mktemp("zoo_weights")
    torch.save(random_state_dict(SuperPointNet(), seed=1), folder / "superpoint_v1.pth")
    torch.save(legacy_lightglue_state("superpoint", seed=2), folder / "superpoint_lightglue.pth")
    torch.save(legacy_lightglue_state("superpoint", seed=3), folder / "minima_lightglue.pth")
    xfeat = random_state_dict(XFeatModel(), seed=4)
    xfeat["fine_matcher.12.weight"] *= 20  # peaked offset logits, so XFeat*'s 0.25 confidence keeps matches
    torch.save(xfeat, folder / "xfeat.pt")
    preset = {k: v for k, v in KorniaLightGlue.features["xfeat"].items() if k != "weights"}
    lighter = random_state_dict(KorniaLightGlue(features=None, **preset), seed=5)
    lighter.pop("confidence_thresholds")
    torch.save({f"matcher.{k}": v for k, v in lighter.items()}, folder / "xfeat-lighterglue.pt")
    mp = pytest.MonkeyPatch()
    mp.setenv("RECON_WEIGHTS_DIR", str(folder))
    mp.setenv("RECON_OFFLINE", "1")
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def texture():
    """A smooth random gray texture (H, W, 1) in [0, 1], 128 x 192 (not a multiple of 8 after a crop)."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((1, 1, 16, 24)).astype(np.float32))
    image = torch.nn.functional.interpolate(coarse, size=(128, 192), mode="bicubic", align_corners=False)
    return image[0].permute(1, 2, 0).clamp(0, 1).numpy()


def kornia_lightglue(features: str, state: dict[str, torch.Tensor]):
    from kornia.feature import LightGlue as KorniaLightGlue

    from feature_backends.lightglue import rename_legacy_keys

    preset = {k: v for k, v in KorniaLightGlue.features[features].items() if k != "weights"}
    model = KorniaLightGlue(features=None, **preset)
    model.load_state_dict(rename_legacy_keys(state, model.conf.n_layers), strict=False)
    return model.eval()


def reference_matches(model, features0, features1) -> dict[str, np.ndarray]:
    data = {f"image{i}": {"keypoints": torch.from_numpy(f["keypoints"])[None],
                          "descriptors": torch.from_numpy(f["descriptors"].T)[None],
                          "image_size": torch.from_numpy(f["image_size"]).float()[None]}
            for i, f in enumerate((features0, features1))}
    with torch.inference_mode():
        pred = model(data)
    return {"matches0": pred["matches0"][0].numpy(), "matching_scores0": pred["matching_scores0"][0].numpy()}


# --- SuperPoint ----------------------------------------------------------------------------------------------

def test_superpoint_matches_the_dad_wheel_copy(zoo_weights, texture, monkeypatch):
    """Same random weights in recon's SuperPoint and in cvg's copy inside `dad-detector` → same features.

    The image is 123 x 181 (not a multiple of 8: hloc does not round the sides) and extracted at its own size."""
    pytest.importorskip("dad")
    from dad.detectors.third_party.lightglue.superpoint import SuperPoint as DadSuperPoint

    state = torch.load(zoo_weights / "superpoint_v1.pth")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *args, **kwargs: state)
    image = texture[:123, :181]
    conf = {"max_keypoints": 300, "resize_max": None}
    ours = get_backend("features", "superpoint", conf).extract(image)
    reference = DadSuperPoint(nms_radius=3, detection_threshold=0.005, remove_borders=4, max_num_keypoints=300)
    with torch.inference_mode():
        ref = reference.eval()({"image": torch.from_numpy(image).permute(2, 0, 1)[None]})
    assert ours["keypoints"].shape == (300, 2)
    np.testing.assert_array_equal(ours["keypoints"], ref["keypoints"][0].numpy())
    np.testing.assert_allclose(ours["scores"], ref["keypoint_scores"][0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours["descriptors"], ref["descriptors"][0].numpy().T, atol=1e-6)
    # hloc's defaults (superpoint_aachen): every detection above 0.005 up to 4096, 4-px border, NMS radius 3
    everything = get_backend("features", "superpoint", {"resize_max": None}).extract(image)
    assert 300 < len(everything["keypoints"]) <= 4096
    assert everything["keypoints"].min() >= 4 and everything["keypoints"][:, 0].max() < 181 - 4


def test_gim_superpoint_shares_the_network_and_detection():
    from feature_backends.gim_lightglue import GIMSuperPoint
    from feature_backends.superpoint import SuperPoint, SuperPointNet

    assert issubclass(GIMSuperPoint, SuperPoint) and GIMSuperPoint._extract is SuperPoint._extract
    assert GIMSuperPoint.full_default_conf()["max_keypoints"] == 2048
    assert sum(p.numel() for p in SuperPointNet().parameters()) == 1300865  # MagicLeap's v1 network


def test_superpoint_refuses_a_partial_checkpoint(zoo_weights, tmp_path):
    state = torch.load(zoo_weights / "superpoint_v1.pth")
    state.pop("convDb.bias")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="1 missing keys"):
        get_backend("features", "superpoint", {"weights": str(tmp_path / "partial.pth")})


# --- LightGlue on SuperPoint, MINIMA's LightGlue ------------------------------------------------------------

def matchable_pair(dim: int, count: int = 150, seed: int = 2) -> tuple[dict, dict]:
    """Two feature sets of one 192 x 128 image: image 1 holds image 0's features permuted, shifted and with noisy
    descriptors. (Random SuperPoint or XFeat networks give nearly parallel descriptors, on which a random LightGlue
    finds 2 or 3 matches; distinct descriptors make the parity test compare a hundred matches.)"""
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(dim, count)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=0)
    keypoints = (rng.random((count, 2)) * [191, 127]).astype(np.float32)
    order = rng.permutation(count)
    noise = 0.05 * rng.normal(size=(dim, count)).astype(np.float32)
    size = np.array([192, 128])
    return ({"keypoints": keypoints, "descriptors": descriptors, "image_size": size},
            {"keypoints": keypoints[order] * 0.95 + [6, 0], "descriptors": descriptors[:, order] + noise,
             "image_size": size})


@pytest.mark.parametrize("matcher, features, filename, dim", [
    ("lightglue", "superpoint", "superpoint_lightglue.pth", 256),
    ("minima-lightglue", "superpoint", "minima_lightglue.pth", 256),
    ("lighterglue", "xfeat", "xfeat-lighterglue.pt", 64),
])
def test_lightglue_weights_match_kornia(zoo_weights, matcher, features, filename, dim):
    """Each official file layout loads strictly; matches and scores equal kornia's LightGlue with those weights."""
    pair = matchable_pair(dim)
    ours = get_backend("matcher", matcher, {"features": features, "filter_threshold": 0.0}).match(*pair)
    reference = kornia_lightglue(features, torch.load(zoo_weights / filename))
    reference.conf.filter_threshold = 0.0
    ref = reference_matches(reference, *pair)
    assert (ours["matches0"] >= 0).sum() > 60
    np.testing.assert_array_equal(ours["matches0"], ref["matches0"])
    # recon's fused CPU cross-attention differs from kornia's explicit one in rounding only
    np.testing.assert_allclose(ours["matching_scores0"], ref["matching_scores0"], rtol=1e-4, atol=1e-6)


def test_superpoint_features_select_lightglue_weights(zoo_weights, texture):
    """`--features superpoint --matcher lightglue` needs no matcher conf: features.h5's record selects them."""
    from feature_backends.lightglue import LightGlue

    extractor = get_backend("features", "superpoint", {"max_keypoints": 100, "resize_max": None})
    features = extractor.extract(texture)
    conf = LightGlue.conf_for_features({"backend": "superpoint", "conf": extractor.conf.to_dict()})
    assert conf == {"features": "superpoint"}
    matches = get_backend("matcher", "lightglue", conf).match(features, features)
    assert matches["matches0"].shape == (100,)


def test_minima_lightglue_loads_only_its_layout(zoo_weights, tmp_path):
    from feature_backends.lightglue import features_from_record
    from feature_backends.minima_lightglue import MinimaLightGlue

    state = torch.load(zoo_weights / "minima_lightglue.pth")
    assert any(k.startswith("cross_attn.8.") for k in state)  # MINIMA's legacy names
    torch.save({f"matcher.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pth")
    get_backend("matcher", "minima-lightglue", {"weights": str(tmp_path / "prefixed.pth")})
    torch.save({"model": state, "epoch": 3}, tmp_path / "nested.pth")
    with pytest.raises(WeightsError, match="missing keys"):
        get_backend("matcher", "minima-lightglue", {"weights": str(tmp_path / "nested.pth")})
    with pytest.raises(ConfigError, match="superpoint"):
        get_backend("matcher", "minima-lightglue", {"features": "disk"})
    assert features_from_record({"backend": "superpoint", "conf": {}}) == "superpoint"
    assert MinimaLightGlue.conf_for_features({"backend": "superpoint"}) == {"features": "superpoint"}


# --- XFeat, LighterGlue, XFeat* -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_xfeat(zoo_weights):
    from kornia.feature import XFeat as KorniaXFeat

    model = KorniaXFeat()
    model.net.load_state_dict(torch.load(zoo_weights / "xfeat.pt"))
    return model.eval()


def test_xfeat_matches_kornia(zoo_weights, texture, reference_xfeat):
    """Random weights give a flat heatmap, so the threshold is lowered from 0.05 to 0.02 in both."""
    conf = {"resize_max": None, "max_keypoints": 256, "detection_threshold": 0.02}
    ours = get_backend("features", "xfeat", conf).extract(texture)
    ref = reference_xfeat.detectAndCompute(torch.from_numpy(texture).permute(2, 0, 1)[None], top_k=256,
                                           detection_threshold=0.02)[0]
    assert len(ours["keypoints"]) > 20 and ours["descriptors"].shape == (64, len(ours["keypoints"]))
    np.testing.assert_array_equal(ours["keypoints"], ref["keypoints"].float().numpy())
    np.testing.assert_allclose(ours["scores"], ref["scores"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours["descriptors"], ref["descriptors"].numpy().T, atol=1e-6)


def test_xfeat_on_a_blank_image_gives_an_empty_feature_set(zoo_weights):
    """A constant image has no strict heatmap maximum: 0 keypoints, descriptors (64, 0), not an error."""
    features = get_backend("features", "xfeat", {"resize_max": None}).extract(np.full((64, 96, 1), 0.5, np.float32))
    assert features["keypoints"].shape == (0, 2) and features["descriptors"].shape == (64, 0)


def test_xfeat_star_matches_kornia(zoo_weights, texture, reference_xfeat):
    """Coarse mutual NN + fine refinement as kornia's match_xfeat_star, on images already at a multiple of 32."""
    image0, image1 = texture, np.roll(texture, 7, axis=1)
    model = get_backend("dense", "xfeat-star", {"resize_max": None, "top_k": 600})
    ours = model.match_images(image0, image1)
    tensors = [torch.from_numpy(i).permute(2, 0, 1)[None] for i in (image0, image1)]
    coarse = reference_xfeat.detectAndComputeDense(tensors[0], top_k=600)
    encoded = model.encode(image0)
    assert encoded["keypoints"].shape == (576, 2)  # all 96 cells at 0.6x (its share is 120), 480 at 1.3x
    for key in ("keypoints", "descriptors", "scales"):
        np.testing.assert_allclose(encoded[key], coarse[key][0].numpy(), atol=1e-5)
    ref0, ref1 = (points.numpy() for points in reference_xfeat.match_xfeat_star(*tensors, top_k=600))
    # Ours drops the matches whose refined point left the image (hloc keypoints lie inside it); kornia keeps them.
    height, width = image0.shape[:2]
    inside = ((ref0 >= -0.5) & (ref0 <= [width - 0.5, height - 0.5])).all(1) & \
        ((ref1 >= -0.5) & (ref1 <= [width - 0.5, height - 0.5])).all(1)
    # random XFeat descriptors are nearly parallel, so few coarse pairs are mutual nearest neighbours
    assert inside.sum() >= 8 and ours["scores"].min() > 0.25
    np.testing.assert_allclose(ours["keypoints0"], ref0[inside], atol=1e-4)
    np.testing.assert_allclose(ours["keypoints1"], ref1[inside], atol=1e-4)


def test_xfeat_star_scales_to_original_pixels_and_has_no_warp(zoo_weights, texture):
    model = get_backend("dense", "xfeat-star", {"resize_max": 96, "top_k": 300})
    encoded = model.encode(texture)
    np.testing.assert_allclose(encoded["resize"], [96 / 192, 64 / 128])
    matches = model.match_encoded(encoded, model.encode(np.roll(texture, 4, axis=1)))
    assert len(matches["keypoints0"]) == len(matches["keypoints1"]) == len(matches["scores"]) > 0
    assert matches["keypoints1"].max() < 192 and not model.has_warp


# --- End to end -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("features, matcher, feature_conf, matcher_conf", [
    ("superpoint", "lightglue", {"max_keypoints": 256}, {"filter_threshold": 0.0}),
    ("xfeat", "lighterglue", {"max_keypoints": 256, "detection_threshold": 0.0}, {"filter_threshold": 0.0}),
    ("sift", "xfeat-star", {}, {"top_k": 400}),
])
def test_recon_run_with_random_weights(zoo_weights, synthetic_scene, tmp_path, features, matcher, feature_conf,
                                       matcher_conf):
    """`recon run` extracts and matches every image and pair (random weights: mapping may fail, nothing else)."""
    from feature_backends.errors import ReconError
    from feature_backends.store import FeatureReader, MatchReader, read_stored_conf
    from pairs.io import read_pairs
    from recon.export import ExportOptions
    from recon.extract import ExtractOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig, run

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:3]
    config = RunConfig(extract=ExtractOptions(features, {"resize_max": 160, **feature_conf}),
                       match=MatchOptions(matcher, {**matcher_conf,
                                                    **({"resize_max": 160} if matcher == "xfeat-star" else {})}),
                       export=ExportOptions(formats=()), image_list=names)
    try:
        run(synthetic_scene / "images", tmp_path, config)
    except ReconError as error:
        assert "mapping failed" in str(error)
    if matcher != "xfeat-star":
        assert read_stored_conf(tmp_path / "features.h5")["backend"] == features
    with FeatureReader(tmp_path / "features.h5") as reader:
        assert reader.names() == names
        counts = [len(reader.read(name)["keypoints"]) for name in names]
    pairs = read_pairs(tmp_path / "pairs.txt")
    with MatchReader(tmp_path / "matches.h5") as reader:
        total = sum(len(reader.read(*pair)[0]) for pair in pairs)
    assert len(pairs) == 3 and min(counts) > 0 and total > 0


def test_xfeat_star_refuses_anchored_mode(zoo_weights, synthetic_scene, tmp_path):
    from recon.dense import match_dense

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:2]
    (tmp_path / "pairs.txt").write_text(f"{names[0]} {names[1]}\n")
    with pytest.raises(ConfigError, match="anchored mode needs a dense warp, but 'xfeat-star' predicts matches"):
        match_dense({"name": "sift+xfeat-star"}, tmp_path / "pairs.txt", synthetic_scene / "images",
                    tmp_path / "features.h5", tmp_path / "matches.h5")
    assert not (tmp_path / "features.h5").exists()  # refused before any work
