"""Learned sparse backends (DeDoDe, DaD, DISK, ALIKED) and matchers (dual-softmax, LightGlue) with random weights.

No pretrained weight can be downloaded here, so every network gets a random state dict saved in the official
layout and found through $RECON_WEIGHTS_DIR; the proofs are parity with the reference implementation (kornia),
strict loading of the official key layout, and exact answers of the selection and matching rules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from feature_backends.errors import ConfigError, WeightsError
from feature_backends.images import read_image, resize_image
from feature_backends.registry import get_backend

SMALL = {"resize_max": 70, "max_keypoints": 128}


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """Random state dicts under the official file names; RECON_WEIGHTS_DIR points at them, downloads are off."""
    from kornia.feature import ALIKED, DISK
    from kornia.feature import LightGlue as KorniaLightGlue
    from kornia.feature.dedode.dedode_models import dedode_descriptor_B, dedode_detector_L

    from feature_backends.dad import dad_detector

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(dedode_detector_L().state_dict(), folder / "dedode_detector_L_v2.pth")
    torch.save(dedode_descriptor_B().state_dict(), folder / "dedode_descriptor_B.pth")
    torch.save(dedode_descriptor_B().state_dict(), folder / "B_C4_Perm_descriptor_setting_C.pth")
    detector = dad_detector()
    with torch.no_grad():  # random BatchNorm statistics, so that the logits are not flat
        for module in detector.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(detector.state_dict(), folder / "dad.pth")
    torch.save({"extractor": DISK().state_dict()}, folder / "depth-save.pth")
    torch.save(ALIKED("aliked-n16").state_dict(), folder / "aliked-n16.pth")
    for features in ("disk", "sift", "dedodeb"):
        preset = {k: v for k, v in KorniaLightGlue.features[features].items() if k != "weights"}
        state = KorniaLightGlue(features=None, **preset).state_dict()
        state.pop("confidence_thresholds")  # the official files do not carry the derived buffer
        torch.save(state, folder / f"{features}_lightglue.pth")
    mp = pytest.MonkeyPatch()
    mp.setenv("RECON_WEIGHTS_DIR", str(folder))
    mp.setenv("RECON_OFFLINE", "1")
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def real_image(shared_data):
    candidates = sorted(p for p in shared_data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not candidates:
        pytest.skip("no images in ../shared/data")
    return read_image(candidates[0])


# --- DeDoDe: parity with kornia -------------------------------------------------------------------------------

def test_dedode_matches_kornia_on_a_real_image(random_weights, real_image):
    """Same random weights in our backend and in kornia.feature.DeDoDe → same keypoints, scores, descriptors."""
    from kornia.feature import DeDoDe as KorniaDeDoDe

    ours = get_backend("features", "dedode", {**SMALL, "resize_max": 84, "normalize_descriptors": False})
    reference = KorniaDeDoDe("L", "B", amp_dtype=torch.float32).eval()
    reference.detector.load_state_dict(torch.load(random_weights / "dedode_detector_L_v2.pth"))
    reference.descriptor.load_state_dict(torch.load(random_weights / "dedode_descriptor_B.pth"))

    features = ours.extract(real_image)
    resized, scale = resize_image(real_image, 84, multiple=14)
    with torch.inference_mode():
        ref_kpts, ref_scores, ref_desc = reference(torch.from_numpy(resized.transpose(2, 0, 1))[None], n=128)
    # kornia reports pixel i at i + 0.5; ours are in original-image pixels with pixel centres at integers.
    ours_in_resized = (features["keypoints"] + 0.5) * np.asarray(scale, np.float32)
    assert len(features["keypoints"]) == 128
    np.testing.assert_allclose(ours_in_resized, ref_kpts[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(features["scores"], ref_scores[0].numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(features["descriptors"].T, ref_desc[0].numpy(), rtol=1e-3, atol=1e-4)


def test_dedode_descriptors_are_unit_norm_by_default(random_weights):
    image = np.random.default_rng(0).random((60, 80, 3), dtype=np.float32)
    features = get_backend("features", "dedode", SMALL).extract(image)
    norms = np.linalg.norm(features["descriptors"], axis=0)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert features["descriptors"].shape == (256, 128)


def test_dedode_g_builds_without_downloading(monkeypatch):
    """kornia's FrozenDINOv2 downloads when given no weights; ours hands it the resolved state dict.

    A one-block ViT stands in for ViT-L/14 (300M parameters) to keep the test fast; what is checked is that the
    state dict we pass is the one loaded, strictly, and that nothing is downloaded.
    """
    import kornia.feature.dedode.encoder as encoder
    import kornia.feature.dedode.transformer as transformer
    from kornia.feature.dedode.transformer.dinov2 import DinoVisionTransformer

    from feature_backends.dedode import build_descriptor_G

    def no_download(*args, **kwargs):
        raise AssertionError("kornia tried to download")

    def tiny_vit(**kwargs):
        return DinoVisionTransformer(**{**kwargs, "embed_dim": 32, "depth": 1, "num_heads": 1})

    monkeypatch.setattr(encoder, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(transformer, "vit_large", tiny_vit)
    dinov2 = tiny_vit(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0)
    with torch.no_grad():
        dinov2.cls_token.fill_(0.25)
    descriptor = build_descriptor_G(dinov2.state_dict(), torch.float32)
    assert float(descriptor.encoder.frozen_dinov2.dinov2_vitl14[0].cls_token.mean()) == 0.25
    assert "decoder.layers.14.out_conv.weight" in descriptor.state_dict()
    with pytest.raises(WeightsError, match="dinov2"):
        build_descriptor_G({"wrong": torch.zeros(1)}, torch.float32)


def test_unknown_variants_and_keys_are_refused(random_weights):
    with pytest.raises(ConfigError, match="L-C4-v2"):
        get_backend("features", "dedode", {"detector": "L-v3"})
    with pytest.raises(ConfigError, match="dad_light"):
        get_backend("features", "dad", {"detector": "dad_v2"})
    with pytest.raises(ConfigError, match="max_keypoint"):
        get_backend("features", "dad", {"max_keypoint": 5})


def test_missing_weights_name_the_file_and_url(random_weights):
    with pytest.raises(WeightsError) as error:
        get_backend("features", "dad", {"detector": "dad_dark"})
    assert "dad_dark.pth" in str(error.value)
    assert "https://github.com/Parskatt/dad/releases/download/v0.1.0/dad_dark.pth" in str(error.value)


# --- DaD: official layout, selection rule -----------------------------------------------------------------------

def official_dad_layout() -> dict[str, tuple[int, ...]]:
    """Key → shape of the official DaD checkpoints, written from Parskatt/dad `dad/detectors/dedode_detector.py`.

    `dedode_detector_S()`: encoder `VGG(size="11")` = `nn.ModuleList(torchvision vgg11_bn().features[:22])` under
    `encoder.layers`; decoder `Decoder(nn.ModuleDict)` under `decoder.layers.<scale>` with
    `ConvRefiner(in, hidden, out, hidden_blocks=3)`: block1 = [Conv1x1(in→hidden), BN, ReLU, Conv1x1],
    hidden_blocks.<j> = [depthwise Conv5x5(hidden→hidden, groups=hidden), BN, ReLU, Conv1x1], out_conv Conv1x1.
    """
    layout = {f"encoder.layers.{k}": tuple(v.shape)
              for k, v in torchvision.models.vgg11_bn().features[:22].state_dict().items()}
    scales = {"8": (512, 512, 257), "4": (512, 256, 129), "2": (256, 64, 33), "1": (96, 32, 2)}

    def block(prefix: str, in_dim: int, hidden: int, kernel: int, groups: int) -> None:
        layout[f"{prefix}.0.weight"] = (hidden, in_dim // groups, kernel, kernel)
        layout[f"{prefix}.0.bias"] = (hidden,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.1.{name}"] = (hidden,)
        layout[f"{prefix}.1.num_batches_tracked"] = ()
        layout[f"{prefix}.3.weight"] = (hidden, hidden, 1, 1)
        layout[f"{prefix}.3.bias"] = (hidden,)

    for scale, (in_dim, hidden, out) in scales.items():
        prefix = f"decoder.layers.{scale}"
        block(f"{prefix}.block1", in_dim, hidden, 1, 1)
        for j in range(3):
            block(f"{prefix}.hidden_blocks.{j}", hidden, hidden, 5, hidden)
        layout[f"{prefix}.out_conv.weight"] = (out, hidden, 1, 1)
        layout[f"{prefix}.out_conv.bias"] = (out,)
    return layout


def test_dad_loads_a_checkpoint_in_the_official_layout_strictly():
    from feature_backends.dad import dad_detector

    layout = official_dad_layout()
    detector = dad_detector()
    assert {k: tuple(v.shape) for k, v in detector.state_dict().items()} == layout
    generator = torch.Generator().manual_seed(1)
    checkpoint = {k: (torch.randn(shape, generator=generator) if shape else torch.tensor(7))
                  for k, shape in layout.items()}
    detector.load_state_dict(checkpoint, strict=True)
    assert torch.equal(detector.state_dict()["decoder.layers.1.out_conv.bias"], checkpoint["decoder.layers.1.out_conv.bias"])


def peaks_map(height: int, width: int, peaks: dict[tuple[int, int], float], base: float = -20.0) -> torch.Tensor:
    logits = torch.full((1, 1, height, width), base)
    for (row, col), value in peaks.items():
        logits[0, 0, row, col] = value
    return logits


def test_dad_selection_known_answer():
    """Peaks of known height: NMS drops a weaker 8-neighbour, top-k orders by height, borders only when asked."""
    from feature_backends.dad import select_keypoints

    peaks = {(10, 10): 5.0, (10, 11): 4.0,  # the weaker one is suppressed by 3x3 NMS
             (20, 30): 4.5, (2, 15): 4.8,  # (2, 15) lies in the 4-px border
             (25, 5): 3.0, (10, 13): 3.5}  # (10, 13) is two columns from (10, 11): not its neighbour's victim
    logits = peaks_map(32, 40, peaks)
    keypoints, scores = select_keypoints(logits, num_keypoints=4, subpixel_temperature=None)
    assert keypoints[0].tolist() == [[10, 10], [15, 2], [30, 20], [13, 10]]  # (x, y), by decreasing height
    assert torch.all(scores[0][:-1] >= scores[0][1:])
    probs = logits.reshape(-1).softmax(0).reshape(32, 40)
    assert torch.allclose(scores[0], torch.stack([probs[10, 10], probs[2, 15], probs[20, 30], probs[10, 13]]))

    keypoints, _ = select_keypoints(logits, num_keypoints=10, border=4, subpixel_temperature=None)
    # (2, 15) is removed; the flat background survives NMS as a plateau (as in the official rule) and comes last.
    assert keypoints[0, :4].tolist() == [[10, 10], [30, 20], [13, 10], [5, 25]]
    assert [15, 2] not in keypoints[0].tolist() and [11, 10] not in keypoints[0].tolist()
    assert torch.all((keypoints[0] >= 4) & (keypoints[0] <= torch.tensor([35, 27])))


def test_dad_selection_is_deterministic_and_respects_max_keypoints(random_weights):
    rng = np.random.default_rng(3)
    image = rng.random((64, 96, 3), dtype=np.float32)
    model = get_backend("features", "dad", {"resize_max": 96, "max_keypoints": 100})
    first, second = model.extract(image), model.extract(image)
    assert len(first["keypoints"]) == 100
    np.testing.assert_array_equal(first["keypoints"], second["keypoints"])
    np.testing.assert_array_equal(first["descriptors"], second["descriptors"])
    # Ties on a flat map are broken by raster order, not by an unspecified topk order.
    from feature_backends.dad import select_keypoints

    flat = torch.zeros(1, 1, 6, 6)
    keypoints, _ = select_keypoints(flat, num_keypoints=5, subpixel_temperature=None)
    assert keypoints[0].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [4, 0]]


def test_dad_subpixel_refinement_on_a_known_peak():
    """Offset = softmax(logits / 0.5) over the 3x3 window times the (-1, 0, 1) pixel steps."""
    from feature_backends.dad import select_keypoints

    centre, right, below = 2.0, 1.0, 0.5
    logits = peaks_map(16, 16, {(8, 8): centre, (8, 9): right, (9, 8): below}, base=0.0)
    keypoints, _ = select_keypoints(logits, num_keypoints=1, subpixel_temperature=0.5)
    window = torch.zeros(3, 3)
    window[1, 1], window[1, 2], window[2, 1] = centre, right, below
    weights = (window / 0.5).reshape(-1).softmax(0).reshape(3, 3)
    expected_dx = float(weights[:, 2].sum() - weights[:, 0].sum())
    expected_dy = float(weights[2, :].sum() - weights[0, :].sum())
    np.testing.assert_allclose(keypoints[0, 0].numpy(), [8 + expected_dx, 8 + expected_dy], atol=1e-6)
    assert 0 < expected_dx < 0.5 and 0 < expected_dy < expected_dx  # pulled towards the stronger neighbour


# --- DISK / ALIKED ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["disk", "aliked"])
def test_kornia_extractors_match_kornia(random_weights, name):
    from kornia.feature import ALIKED, DISK

    image = np.random.default_rng(5).random((96, 128, 3), dtype=np.float32)
    ours = get_backend("features", name, {"resize_max": None, "max_keypoints": 200})
    features = ours.extract(image)
    tensor = torch.from_numpy(image.transpose(2, 0, 1))[None]
    if name == "disk":
        reference = DISK()
        reference.load_state_dict(torch.load(random_weights / "depth-save.pth")["extractor"])
        with torch.inference_mode():
            ref = reference.eval()(tensor, n=200, window_size=5)[0]
        ref_kpts, ref_scores = ref.keypoints, ref.detection_scores
    else:
        reference = ALIKED("aliked-n16", max_num_keypoints=200, detection_threshold=0.2)
        reference.load_state_dict(torch.load(random_weights / "aliked-n16.pth"))
        with torch.inference_mode():
            ref = reference.eval()(tensor)[0]
        ref_kpts, ref_scores = ref.keypoints, ref.keypoint_scores
    order = np.argsort(-ref_scores.numpy(), kind="stable")
    assert len(features["keypoints"]) == len(order) > 0
    np.testing.assert_allclose(np.sort(features["scores"]), np.sort(ref_scores.numpy()), rtol=1e-5)
    ours_sorted = features["keypoints"][np.lexsort(features["keypoints"].T)]
    ref_sorted = ref_kpts.numpy()[np.lexsort(ref_kpts.numpy().T)]
    np.testing.assert_allclose(ours_sorted, ref_sorted, atol=1e-4)


# --- Matchers ---------------------------------------------------------------------------------------------------

def test_dual_softmax_known_answer():
    """Identical, well-separated descriptors match one-to-one; an ambiguous duplicate falls below the threshold."""
    from feature_backends.dual_softmax import dual_softmax_match

    rng = np.random.default_rng(0)
    base = torch.from_numpy(np.linalg.qr(rng.normal(size=(32, 32)))[0][:10].astype(np.float32))
    permutation = torch.from_numpy(rng.permutation(10))
    descriptors0 = base
    descriptors1 = base[permutation]
    matches0, scores = dual_softmax_match(descriptors0, descriptors1)
    expected = torch.argsort(permutation)
    assert torch.equal(matches0, expected)
    assert torch.all(scores > 0.9)
    # Two copies of descriptor 0 in image 1 halve its row softmax: P = 0.5 for both, above 0.1 but below 0.6.
    duplicated = torch.cat([descriptors1, descriptors0[:1]])
    _, scores = dual_softmax_match(descriptors0, duplicated)
    np.testing.assert_allclose(float(scores[0]), 0.5, atol=1e-4)
    matches0, _ = dual_softmax_match(descriptors0, duplicated, threshold=0.6)
    assert matches0[0] == -1 and torch.equal(matches0[1:], expected[1:])


def test_dual_softmax_backend_reproduces_the_official_rule():
    """Against the official formula: mutual maxima of softmax(rows) * softmax(cols) of 20 * cosine similarity."""
    rng = np.random.default_rng(1)
    d0 = rng.normal(size=(64, 50)).astype(np.float32)
    d1 = np.concatenate([d0[:, :30] + 0.3 * rng.normal(size=(64, 30)), rng.normal(size=(64, 25))], 1).astype(np.float32)
    features0 = {"keypoints": rng.random((50, 2), dtype=np.float32), "descriptors": d0}
    features1 = {"keypoints": rng.random((55, 2), dtype=np.float32), "descriptors": d1}
    result = get_backend("matcher", "dual-softmax").match(features0, features1)
    a = d0.T / np.linalg.norm(d0.T, axis=1, keepdims=True)
    b = d1.T / np.linalg.norm(d1.T, axis=1, keepdims=True)
    s = 20 * a @ b.T
    p = np.exp(s - s.max(0)) / np.exp(s - s.max(0)).sum(0) * (np.exp(s - s.max(1, keepdims=True))
                                                             / np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    mutual = (p == p.max(1, keepdims=True)) & (p == p.max(0, keepdims=True)) & (p > 0.1)
    expected = np.where(mutual.any(1), p.argmax(1), -1)
    np.testing.assert_array_equal(result["matches0"], expected)
    assert (result["matches0"][:30] == np.arange(30)).mean() > 0.9


def test_lightglue_matches_kornia_and_loads_strictly(random_weights):
    from kornia.feature import LightGlue as KorniaLightGlue

    rng = np.random.default_rng(2)
    features = [{"keypoints": (rng.random((80, 2)) * [127, 95]).astype(np.float32),
                 "descriptors": rng.normal(size=(128, 80)).astype(np.float32),
                 "image_size": np.array([128, 96])} for _ in range(2)]
    ours = get_backend("matcher", "lightglue", {"features": "disk"})
    result = ours.match(*features)
    reference = KorniaLightGlue(features=None, input_dim=128)
    reference.load_state_dict(torch.load(random_weights / "disk_lightglue.pth"), strict=False)
    data = {f"image{i}": {"keypoints": torch.from_numpy(f["keypoints"])[None],
                          "descriptors": torch.from_numpy(f["descriptors"].T)[None],
                          "image_size": torch.tensor([[128.0, 96.0]])} for i, f in enumerate(features)}
    with torch.inference_mode():
        ref = reference.eval()(data)
    np.testing.assert_array_equal(result["matches0"], ref["matches0"][0].numpy())
    np.testing.assert_allclose(result["matching_scores0"], ref["matching_scores0"][0].numpy(), atol=1e-6)


def test_lightglue_refuses_partial_or_foreign_weights(random_weights, tmp_path):
    state = torch.load(random_weights / "disk_lightglue.pth")
    state.pop("log_assignment.0.matchability.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="1 missing keys.*1 unexpected keys"):
        get_backend("matcher", "lightglue", {"features": "disk", "weights": str(tmp_path / "broken.pth")})
    with pytest.raises(ConfigError, match="features"):
        get_backend("matcher", "lightglue")


def test_lightglue_legacy_key_names_are_renamed(random_weights, tmp_path):
    state = torch.load(random_weights / "disk_lightglue.pth")
    legacy = {}
    for key, value in state.items():
        for kind in ("self_attn", "cross_attn"):
            for i in range(9):
                key = key.replace(f"transformers.{i}.{kind}.", f"{kind}.{i}.")
        legacy[key] = value
    assert any(k.startswith("self_attn.0.") for k in legacy)
    torch.save(legacy, tmp_path / "legacy.pth")
    get_backend("matcher", "lightglue", {"features": "disk", "weights": str(tmp_path / "legacy.pth")})


def test_lightglue_sift_reads_scales_and_orientations(random_weights):
    image = np.zeros((120, 160, 3), np.float32)
    rng = np.random.default_rng(4)
    for _ in range(40):
        x, y, r = rng.integers(10, 150), rng.integers(10, 110), rng.integers(2, 6)
        image[max(0, y - r):y + r, max(0, x - r):x + r] = rng.random()
    sift = get_backend("features", "sift", {"resize_max": None})
    features = sift.extract(image)
    assert {"scales", "oris"} <= set(features) and len(features["scales"]) == len(features["keypoints"]) > 5
    assert np.all(features["scales"] > 0) and np.all(np.abs(features["oris"]) <= 2 * np.pi)
    result = get_backend("matcher", "lightglue", {"features": "sift"}).match(features, features)
    assert result["matches0"].shape == (len(features["keypoints"]),)
    with pytest.raises(ConfigError, match="scales"):
        get_backend("matcher", "lightglue", {"features": "sift"}).match(
            {k: v for k, v in features.items() if k not in ("scales", "oris")}, features)


def test_lightglue_on_dedode_needs_raw_descriptors(random_weights):
    image = np.random.default_rng(6).random((60, 80, 3), dtype=np.float32)
    # Random LightGlue weights give low scores: threshold 0 keeps its mutual assignments, enough to see it ran.
    matcher = get_backend("matcher", "lightglue", {"features": "dedodeb", "filter_threshold": 0.0})
    raw = get_backend("features", "dedode", {**SMALL, "normalize_descriptors": False}).extract(image)
    normalized = {**raw, "descriptors": raw["descriptors"] / np.linalg.norm(raw["descriptors"], axis=0)}
    with pytest.raises(ConfigError, match="normalize_descriptors=false"):
        matcher.match(normalized, normalized)
    assert (matcher.match(raw, raw)["matches0"] >= 0).sum() > 0


def test_features_record_selects_lightglue_weights():
    from feature_backends.lightglue import features_from_record

    assert features_from_record({"backend": "dedode", "conf": {"descriptor": "G-upright"}}) == "dedodeg"
    assert features_from_record({"backend": "dad", "conf": {"descriptor": "B-upright"}}) == "dedodeb"
    assert features_from_record({"backend": "aliked", "conf": {}}) == "aliked"
    assert features_from_record({"backend": "sift", "conf": {}}) == "sift"
    # The family is the backend class's, so a detector named by its class path (not a registry name) works too.
    assert features_from_record({"backend": "feature_backends.dad:DaD", "conf": {}}) == "dedodeb"
    assert features_from_record({"backend": "gim-superpoint", "conf": {}}) is None
    assert features_from_record(None) is None


# --- End to end -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("features, matcher, feature_conf, matcher_conf", [
    ("dedode", "dual-softmax", {}, {"threshold": 0.0}),
    ("dad", "mnn", {}, {}),
    ("disk", "lightglue", {}, {"filter_threshold": 0.0}),  # LightGlue picks its disk weights from features.h5
])
def test_pipeline_runs_every_stage(random_weights, synthetic_scene, tmp_path, features, matcher, feature_conf,
                                   matcher_conf):
    """`recon run` with learned features and random weights runs every stage and writes valid hloc files.

    Random weights make the matches meaningless, so mapping may legitimately fail to initialise a model: accuracy
    cannot be judged without the pretrained weights. Random weights also score every match low, so the
    dual-softmax and LightGlue thresholds are set to 0 here (their mutual-assignment rule still applies). What is asserted is that extraction and matching ran on every
    image and pair with the right shapes, and that the run reached the SfM stage.
    """
    from feature_backends.errors import ReconError
    from feature_backends.store import FeatureReader, MatchReader, read_stored_conf
    from pairs.io import read_pairs
    from recon.pipeline import run

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:3]
    config = small_run(features, {**SMALL, "resize_max": 96, **feature_conf}, matcher, matcher_conf, names)
    try:
        run(synthetic_scene / "images", tmp_path, config)
        assert (tmp_path / "sparse" / "0").is_dir()
    except ReconError as error:
        assert "mapping failed" in str(error)
    assert read_stored_conf(tmp_path / "features.h5")["backend"] == features
    with FeatureReader(tmp_path / "features.h5") as reader:
        assert reader.names() == names
        for name in names:
            feats = reader.read(name)
            assert feats["keypoints"].shape[1] == 2 and 0 < len(feats["keypoints"]) <= 128
            assert feats["descriptors"].shape[1] == len(feats["keypoints"])
            assert np.all(feats["keypoints"] >= -0.5) and np.all(feats["keypoints"] <= [639.5, 479.5])
    pairs = read_pairs(tmp_path / "pairs.txt")
    with MatchReader(tmp_path / "matches.h5") as reader:
        total = sum(len(reader.read(*pair)[0]) for pair in pairs)
    assert len(pairs) == 3 and total > 0


# --- Steered matching (C4 / SO2 descriptors) ------------------------------------------------------------------

def _orbit_responses(image: np.ndarray, keypoints: np.ndarray, filters: torch.Tensor) -> torch.Tensor:
    """(N, F, 4): responses of every filter turned by 0..3 quarter turns, read at integer (x, y) keypoints.

    Rotating the image by 90 degrees turns every filter's orbit by one step, so these four numbers are cyclically
    shifted: an exactly C4-equivariant descriptor without any network (random networks are not equivariant).
    """
    turned = torch.stack([torch.rot90(filters, r, dims=(1, 2)) for r in range(4)], 1).reshape(-1, 1, *filters.shape[1:])
    maps = F.conv2d(torch.from_numpy(np.ascontiguousarray(image))[None, None], turned,
                    padding=filters.shape[-1] // 2)[0]
    x, y = torch.from_numpy(keypoints[:, 0]), torch.from_numpy(keypoints[:, 1])
    return maps[:, y, x].T.reshape(len(keypoints), len(filters), 4)


def _spread_layout_descriptors(orbits: torch.Tensor) -> torch.Tensor:
    """Map C4 orbits to the official SO2 "Spread" layout: 128 invariant dims, then 2-D blocks of frequency 1 (x32),
    2 (x16), 3 (x8), 4 (x4), 5 (x2), 6 (x2). The C4 Fourier coefficient c_j of an orbit turns by j quarter turns when
    the image turns by one, exactly as the block of frequency j does under exp(pi/2 * generator)."""
    c = torch.fft.fft(orbits.double(), dim=-1)  # (N, F, 4): c_j = sum_r o_r exp(-2 pi i j r / 4)
    columns, f = [c[:, :128, 0].real], 128
    for freq, count in ((1, 32), (2, 16), (3, 8), (4, 4), (5, 2), (6, 2)):
        coefficient = c[:, f:f + 2 * count, freq % 4]
        if freq % 2:  # complex coefficient: (Re, Im) of one filter
            block = torch.stack((coefficient[:, :count].real, coefficient[:, :count].imag), -1)
        else:  # real coefficient (sign flip or invariant): two filters form the block
            block = torch.stack((coefficient[:, :count].real, coefficient[:, count:].real), -1)
        columns.append(block.reshape(len(orbits), -1))
        f += 2 * count
    return torch.cat(columns, 1).float()


def _spread_generator() -> torch.Tensor:
    blocks = [torch.zeros(128, 128)]
    for freq, count in ((1, 32), (2, 16), (3, 8), (4, 4), (5, 2), (6, 2)):
        blocks += [torch.tensor([[0.0, freq], [-freq, 0.0]])] * count
    return torch.block_diag(*blocks)


@pytest.fixture(scope="module")
def rotated_pair():
    """A random texture and its exact 90-degree rotation (np.rot90), with 200 keypoints and their true partners."""
    rng = np.random.default_rng(7)
    image = rng.random((72, 88)).astype(np.float32)
    image = F.avg_pool2d(torch.from_numpy(image)[None, None], 3, stride=1, padding=1)[0, 0].numpy()
    rotated = np.rot90(image).copy()  # pixel (x, y) goes to (y, W - 1 - x)
    flat = rng.choice(60 * 76, 200, replace=False)
    keypoints = np.stack((6 + flat % 76, 6 + flat // 76), 1)
    partners = np.stack((keypoints[:, 1], image.shape[1] - 1 - keypoints[:, 0]), 1)
    order = rng.permutation(200)  # image 1 lists its keypoints in another order
    filters = torch.from_numpy(rng.normal(size=(256, 7, 7)).astype(np.float32))
    filters -= filters.mean(dim=(1, 2), keepdim=True)
    return image, rotated, keypoints, partners[order], np.argsort(order), filters


def _match_rotated(matcher, descriptors0, descriptors1, keypoints1):
    n = len(keypoints1)
    features = [{"keypoints": np.zeros((n, 2), np.float32), "descriptors": d.T.numpy()}
                for d in (descriptors0, descriptors1)]
    return matcher.match(*features)["matches0"]


@pytest.mark.parametrize("group", ["C4", "SO2"])
@pytest.mark.parametrize("name, conf", [("mnn", {}), ("dual-softmax", {"threshold": 0.01})])
def test_steered_matching_recovers_a_quarter_turn(random_weights, rotated_pair, group, name, conf):
    """Descriptors of an exactly rotated image, exactly equivariant by construction, mixed by a random orthogonal
    Q (so the steerer Q S Q^T is a random matrix of exact C4 / SO2 structure): unsteered matching finds (almost)
    none of the 200 true partners, steered matching finds nearly all of them."""
    image, rotated, keypoints, keypoints1, truth, filters = rotated_pair
    q = torch.linalg.qr(torch.randn(256, 256, generator=torch.Generator().manual_seed(3)))[0]
    if group == "C4":
        from kornia.feature.steerers import DiscreteSteerer

        structure = DiscreteSteerer.create_dedode_default("C4").generator.detach()
        describe = lambda img, kp: _orbit_responses(img, kp, filters[:64]).reshape(len(kp), 256)  # noqa: E731
    else:
        structure = _spread_generator()
        describe = lambda img, kp: _spread_layout_descriptors(_orbit_responses(img, kp, filters))  # noqa: E731
    steerer_file = random_weights / f"B_{group}_{'Perm' if group == 'C4' else 'Spread'}_steerer_setting_C.pth"
    torch.save(q @ structure @ q.T, steerer_file)
    descriptors0 = F.normalize(describe(image, keypoints) @ q.T, dim=-1)
    descriptors1 = F.normalize(describe(rotated, keypoints1) @ q.T, dim=-1)

    record = {"backend": "dedode", "conf": {"descriptor": f"B-{group}"}}
    from feature_backends.registry import resolve

    implied = resolve("matcher", name)[0].conf_for_features(record)
    assert implied == {"steerer": group, "steerer_descriptor": "B"}
    steered = get_backend("matcher", name, {**implied, **conf})
    plain = get_backend("matcher", name, conf)
    correct_steered = int((_match_rotated(steered, descriptors0, descriptors1, keypoints1) == truth).sum())
    correct_plain = int((_match_rotated(plain, descriptors0, descriptors1, keypoints1) == truth).sum())
    assert correct_steered >= 190, correct_steered
    assert correct_plain <= 20, correct_plain


@pytest.mark.slow
def test_pipeline_runs_dedode_g_with_dinov2_vit_large(random_weights, synthetic_scene, tmp_path):
    """DeDoDe-G for real: a random DINOv2 ViT-L/14 (304M parameters, 1.2 GB file) and G descriptor found through
    $RECON_WEIGHTS_DIR, `recon run` on 3 generated images at 112 px: 15-22 s on 2 CPU cores plus ~6 s to make
    the weights, hence `slow`."""
    from kornia.feature.dedode.transformer.dinov2 import vit_large

    from feature_backends.dedode import build_descriptor_G
    from feature_backends.errors import ReconError
    from feature_backends.store import FeatureReader, MatchReader
    from pairs.io import read_pairs
    from recon.pipeline import run

    torch.manual_seed(1)
    vit = vit_large(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0)
    assert sum(p.numel() for p in vit.parameters()) > 300e6
    torch.save(vit.state_dict(), random_weights / "dinov2_vitl14_pretrain.pth")
    torch.save(build_descriptor_G(vit.state_dict(), torch.float32).state_dict(), random_weights / "dedode_descriptor_G.pth")
    del vit

    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:3]
    config = small_run("dedode", {**SMALL, "resize_max": 112, "descriptor": "G-upright"}, "dual-softmax",
                       {"threshold": 0.0}, names)
    try:
        run(synthetic_scene / "images", tmp_path, config)
    except ReconError as error:  # random weights: mapping may fail to initialise, nothing else may
        assert "mapping failed" in str(error)
    with FeatureReader(tmp_path / "features.h5") as reader:
        for name in names:
            feats = reader.read(name)
            assert feats["descriptors"].shape == (256, len(feats["keypoints"])) and len(feats["keypoints"]) == 128
            np.testing.assert_allclose(np.linalg.norm(feats["descriptors"], axis=0), 1.0, atol=1e-5)
    with MatchReader(tmp_path / "matches.h5") as reader:
        assert sum(len(reader.read(*pair)[0]) for pair in read_pairs(tmp_path / "pairs.txt")) > 0


def test_pipeline_steers_c4_descriptors_from_the_features_record(random_weights, synthetic_scene, tmp_path):
    """`recon run` with the B-C4 descriptor: the match stage picks the C4 steerer from features.h5 by itself."""
    from kornia.feature.steerers import DiscreteSteerer

    from feature_backends.errors import ReconError
    from feature_backends.store import read_stored_conf
    from recon.pipeline import run

    torch.save(DiscreteSteerer.create_dedode_default("C4").generator.detach(),
               random_weights / "B_C4_Perm_steerer_setting_C.pth")
    names = sorted(p.name for p in (synthetic_scene / "images").iterdir())[:3]
    config = small_run("dedode", {**SMALL, "resize_max": 96, "descriptor": "B-C4"}, "mnn", {}, names)
    try:
        run(synthetic_scene / "images", tmp_path, config)
    except ReconError as error:
        assert "mapping failed" in str(error)
    recorded = read_stored_conf(tmp_path / "matches.h5")["conf"]
    assert recorded["steerer"] == "C4" and recorded["steerer_descriptor"] == "B"


def small_run(features: str, feature_conf: dict, matcher: str, matcher_conf: dict, names: list[str]):
    """The RunConfig of the end-to-end runs here: given images only, no exports."""
    from recon.export import ExportOptions
    from recon.extract import ExtractOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig

    return RunConfig(extract=ExtractOptions(features, feature_conf), match=MatchOptions(matcher, matcher_conf),
                     export=ExportOptions(formats=()), image_list=names)
