"""LoFTR, MINIMA's and GIM's LoFTR: strict loading of the official layouts, parity with kornia's LoFTR on the same
random weights, the dense stage's quantised mode end to end, the refusal of anchored mode, and IMD's answer.

Random LoFTR weights collapse (the FPN output of a random ResNet shares one large component at every cell, so the
dual-softmax finds 0-3 matches on any pair). `recon.references.informative_loftr_state` keeps the random weights but projects that
component out of the last coarse and fine convolutions and damps the transformers' residual messages, so a random
network matches translated crops correctly (about 70 % of its matches within 2 px of the true shift): the tests
can then count real matches instead of empty ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("kornia")

from feature_backends import registry  # noqa: E402
from feature_backends.errors import ConfigError, WeightsError  # noqa: E402
from recon.references import informative_loftr_state  # noqa: E402

SHIFT = (24, 16)  # crop b starts here in the canvas (a whole number of LoFTR's 8-px cells)
OFFSETS = {"a.png": (0, 0), "b.png": SHIFT, "c.png": (40, 8)}


@pytest.fixture(scope="module")
def canvas() -> np.ndarray:
    rng = np.random.default_rng(0)
    small = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((260, 200), Image.BICUBIC)).astype(np.float32) / 255


def crop(canvas: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    x, y = offset
    return np.ascontiguousarray(canvas[y:y + 120, x:x + 160])


def gray(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image @ np.array([0.299, 0.587, 0.114], np.float32))[None, None]


def rgb(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()


def lightning(state: dict, prefix: str) -> dict:
    return {"state_dict": {prefix + k: v.clone() for k, v in state.items()}, "epoch": 30, "global_step": 1}


@pytest.fixture(scope="module")
def loftr_state(canvas):
    from kornia.feature import LoFTR

    from feature_backends.loftr import kornia_loftr_config

    network = LoFTR(pretrained=None, config=kornia_loftr_config(False, 0.2))
    return informative_loftr_state(network, gray(crop(canvas, (0, 0))))


def shift_error(points0: np.ndarray, points1: np.ndarray, shift) -> np.ndarray:
    return np.abs(points1 - points0 + np.asarray(shift, np.float32)).max(axis=1)


def test_loftr_equals_kornia_on_the_same_random_weights(canvas, loftr_state):
    from kornia.feature import LoFTR

    from feature_backends.loftr import LoFTRMatcher, kornia_loftr_config

    reference = LoFTR(pretrained=None, config=kornia_loftr_config(False, 0.2))
    reference.load_state_dict(lightning(loftr_state, "matcher.")["state_dict"])  # kornia strips 'matcher.'
    reference.eval()
    image0, image1 = crop(canvas, (0, 0)), crop(canvas, SHIFT)
    ours = LoFTRMatcher.from_checkpoints({"weights": lightning(loftr_state, "matcher.")}, {"resize_max": None})
    with torch.no_grad():
        expected = reference({"image0": gray(image0), "image1": gray(image1)})
    found = ours.match_images(image0, image1)
    # kornia's frame puts pixel centres at +0.5; recon's at integers.
    np.testing.assert_allclose(found["keypoints0"], expected["keypoints0"].numpy() - 0.5, atol=1e-5)
    np.testing.assert_allclose(found["keypoints1"], expected["keypoints1"].numpy() - 0.5, atol=1e-5)
    np.testing.assert_allclose(found["scores"], expected["confidence"].numpy(), atol=1e-6)
    assert len(found["scores"]) == 102
    assert (shift_error(found["keypoints0"], found["keypoints1"], SHIFT) < 2).mean() > 0.65
    # Resized input (160x120 → 128x96): matches scale back about the pixel centres, q / s - 0.5.
    # The shift is no longer a whole number of cells there, so every mutual match counts (threshold 0).
    small = LoFTRMatcher.from_checkpoints({"weights": {"state_dict": loftr_state}},
                                          {"resize_max": 128, "match_threshold": 0.0})
    reference.coarse_matching.thr = 0.0
    import cv2

    resized = [cv2.resize(gray(image)[0, 0].numpy(), (128, 96), interpolation=cv2.INTER_AREA)
               for image in (image0, image1)]
    with torch.no_grad():
        expected = reference({"image0": torch.from_numpy(resized[0])[None, None],
                              "image1": torch.from_numpy(resized[1])[None, None]})
    found = small.match_images(image0, image1)
    assert len(found["scores"]) == len(expected["confidence"]) > 20
    np.testing.assert_allclose(found["keypoints0"], expected["keypoints0"].numpy() / 0.8 - 0.5, atol=1e-4)
    np.testing.assert_allclose(found["keypoints1"], expected["keypoints1"].numpy() / 0.8 - 0.5, atol=1e-4)


def test_official_layouts_load_strictly_with_their_position_encodings(loftr_state, tmp_path, monkeypatch):
    from kornia.feature.loftr.utils.position_encoding import PositionEncodingSine

    from feature_backends.loftr import LoFTRMatcher

    # zju3dv's outdoor_ds.ckpt layout, as GIM's loftr.py lists it: 211 tensors in these four modules.
    groups = {}
    for key in loftr_state:
        groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
    assert groups == {"backbone": 107, "loftr_coarse": 80, "loftr_fine": 20, "fine_preprocess": 4}
    fixed = PositionEncodingSine(256, temp_bug_fix=True).pe
    buggy = PositionEncodingSine(256, temp_bug_fix=False).pe
    assert not torch.equal(fixed, buggy)
    for variant, prefix, expected in (("outdoor", "", buggy), ("indoor", "matcher.", buggy),
                                      ("indoor_new", "", fixed), ("minima", "matcher.", fixed)):
        backend = LoFTRMatcher.from_checkpoints({"weights": lightning(loftr_state, prefix)}, {"variant": variant})
        assert torch.equal(backend.network.pos_encoding.pe, expected), variant
    broken = lightning(loftr_state, "")
    broken["state_dict"].pop("loftr_fine.layers.0.q_proj.weight")
    with pytest.raises(WeightsError, match="1 missing keys"):
        LoFTRMatcher.from_checkpoints({"weights": broken}, {"variant": "minima"})
    # The file path: $RECON_WEIGHTS_DIR, torch.load(weights_only=True), the preset's variant and resolution.
    torch.save(lightning(loftr_state, ""), tmp_path / "minima_loftr.ckpt")
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(tmp_path))
    minima = registry.get_backend("dense", "minima-loftr", device="cpu")
    assert (minima.conf.variant, minima.conf.resize_max, minima.conf.resize_force) == ("minima", 640, True)
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("RECON_OFFLINE", "1")
    with pytest.raises(WeightsError, match="loftr_indoor_ds_new.ckpt.*\n.*huggingface.co/kornia/loftr"):
        registry.get_backend("dense", "loftr-indoor-new", device="cpu")


@pytest.fixture
def crops(tmp_path, canvas):
    from pairs.io import write_pairs

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name, offset in OFFSETS.items():
        Image.fromarray((crop(canvas, offset) * 255).round().astype(np.uint8)).save(image_dir / name)
    pairs = write_pairs(tmp_path / "pairs.txt", [("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png")])
    return image_dir, pairs


def stage_matches(features_path, matches_path, name0, name1):
    from feature_backends.store import FeatureReader, MatchReader

    with FeatureReader(features_path) as features, MatchReader(matches_path) as matches:
        found, _ = matches.read(name0, name1)
        return features.read_keypoints(name0)[found[:, 0]], features.read_keypoints(name1)[found[:, 1]]


def check_stage(features_path, matches_path, minimum: int) -> None:
    for name0, name1 in (("a.png", "b.png"), ("b.png", "c.png"), ("a.png", "c.png")):
        points0, points1 = stage_matches(features_path, matches_path, name0, name1)
        shift = np.subtract(OFFSETS[name1], OFFSETS[name0])
        # quantised keypoints sit within a 2-px sub-bin of the samples: 2 px of LoFTR's error + 2 px of snapping
        assert len(points0) >= minimum and (shift_error(points0, points1, shift) < 4).mean() > 0.6, (name0, name1)


def test_dense_stage_runs_loftr_in_quantised_mode_and_refuses_anchored_mode(crops, loftr_state, tmp_path,
                                                                              monkeypatch):
    from recon.dense import match_dense

    image_dir, pairs = crops
    quantised_stage("loftr", lightning(loftr_state, "matcher."), "loftr_outdoor.ckpt", crops, tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="anchored mode needs a dense warp.*'loftr' predicts matches, not a warp"):
        match_dense({"name": "sift+loftr"}, pairs, image_dir, tmp_path / "f2.h5", tmp_path / "m2.h5", device="cpu")
    assert not (tmp_path / "f2.h5").exists()  # refused before the anchors were extracted


def gim_layout() -> dict[str, tuple[int, ...]]:
    """GIM LoFTR's state-dict keys and shapes as GIM's networks/loftr builds them, written out independently:
    torchvision's ResNet-50 up to layer3 under backbone.encode, the FPN with block dims [.., 196, 256, 512, 1024],
    and the coarse / fine transformers (no fine_preprocess: FINE_CONCAT_COARSE_FEAT is False)."""
    from torchvision.models import resnet50

    layout = {f"backbone.encode.{k}": tuple(v.shape) for k, v in resnet50(weights=None).state_dict().items()
              if not k.startswith(("layer4.", "fc."))}
    assert len(layout) == 258

    def norm(prefix, n):
        layout.update({f"{prefix}.{p}": (n,) for p in ("weight", "bias", "running_mean", "running_var")})
        layout[f"{prefix}.num_batches_tracked"] = ()

    fpn = {"layer3_outconv": (256, 1024, 1, 1), "layer2_outconv": (256, 512, 1, 1),
           "layer2_outconv2.0": (256, 256, 3, 3), "layer2_outconv2.3": (196, 256, 3, 3),
           "layer1_outconv": (196, 256, 1, 1), "layer1_outconv2.0": (196, 196, 3, 3),
           "layer1_outconv2.3": (128, 196, 3, 3)}
    layout.update({f"backbone.{name}.weight": shape for name, shape in fpn.items()})
    norm("backbone.layer2_outconv2.1", 256)
    norm("backbone.layer1_outconv2.1", 196)
    for module, layers, d in (("loftr_coarse", 8, 256), ("loftr_fine", 2, 128)):
        for i in range(layers):
            for proj in ("q_proj", "k_proj", "v_proj", "merge"):
                layout[f"{module}.layers.{i}.{proj}.weight"] = (d, d)
            layout[f"{module}.layers.{i}.mlp.0.weight"] = (2 * d, 2 * d)
            layout[f"{module}.layers.{i}.mlp.2.weight"] = (d, 2 * d)
            for n in ("norm1", "norm2"):
                layout.update({f"{module}.layers.{i}.{n}.weight": (d,), f"{module}.layers.{i}.{n}.bias": (d,)})
    return layout


@pytest.fixture(scope="module")
def gim_state(canvas):
    from feature_backends.gim_loftr import gim_loftr_network

    return informative_loftr_state(gim_loftr_network(), rgb(crop(canvas, (0, 0))), seed=3)


def test_gim_loftr_has_gims_layout_and_loads_its_lightning_checkpoint_strictly(gim_state):
    from feature_backends.gim_loftr import GIMLoFTR

    assert {k: tuple(v.shape) for k, v in gim_state.items()} == gim_layout()
    for prefix in ("model.", "matcher."):
        backend = GIMLoFTR.from_checkpoints({"weights": lightning(gim_state, prefix)})
        assert torch.equal(backend.network.backbone.encode.conv1.weight, gim_state["backbone.encode.conv1.weight"])
    assert not backend.grayscale and backend.network.pos_encoding.temp_bug_fix is False
    broken = lightning(gim_state, "model.")
    broken["state_dict"]["model.backbone.encode.layer4.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="1 unexpected keys"):
        GIMLoFTR.from_checkpoints({"weights": broken})


def test_gim_loftr_shares_kornias_transformer_and_matching(canvas, gim_state):
    """Given the same backbone features, GIM's network and kornia's stock LoFTR (GIM's flags, the same coarse and
    fine transformer weights) give the same matches: everything after the backbone is kornia's."""
    from kornia.feature import LoFTR

    from feature_backends.gim_loftr import gim_loftr_network
    from feature_backends.loftr import kornia_loftr_config

    gim = gim_loftr_network()
    gim.load_state_dict(gim_state)
    gim.eval()
    stock = LoFTR(pretrained=None, config=kornia_loftr_config(False, 0.2, fine_concat_coarse_feat=False))
    shared = {k: v for k, v in gim_state.items() if not k.startswith("backbone.")}
    assert set(shared) | {k for k in stock.state_dict() if k.startswith("backbone.")} == set(stock.state_dict())
    stock.load_state_dict(shared, strict=False)
    stock.eval()
    with torch.no_grad():
        features = [gim.extract_features(rgb(crop(canvas, offset))) for offset in ((0, 0), SHIFT)]
        expected = stock({"features0": features[0], "features1": features[1]})
        found = gim({"image0": rgb(crop(canvas, (0, 0))), "image1": rgb(crop(canvas, SHIFT))})
    assert len(found["confidence"]) == len(expected["confidence"]) > 50
    for key in ("keypoints0", "keypoints1", "confidence"):
        torch.testing.assert_close(found[key], expected[key], atol=1e-5, rtol=1e-5)


def test_gim_loftr_end_to_end_through_the_dense_stage(crops, gim_state, tmp_path, monkeypatch):
    quantised_stage("gim-loftr", lightning(gim_state, "model."), "gim_loftr_50h.ckpt", crops, tmp_path, monkeypatch)


def quantised_stage(name, checkpoint, filename, crops, tmp_path, monkeypatch):
    """`name` through the dense stage (quantised) with `checkpoint` saved under its official file name."""
    from recon.dense import match_dense

    image_dir, pairs = crops
    torch.save(checkpoint, tmp_path / filename)
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(tmp_path))
    features = tmp_path / "f.h5"
    matches = match_dense({"name": name, "resize_max": None}, pairs, image_dir, features, tmp_path / "m.h5",
                          device="cpu")
    check_stage(features, matches, minimum=40)


def test_imd_answers_that_it_has_no_public_code_or_weights(crops, tmp_path, capsys):
    from recon.dense import is_dense_matcher, match_dense
    from recon.weights_cli import list_weights

    image_dir, pairs = crops
    assert is_dense_matcher("imd")
    for name in ("imd", "sift+imd"):
        with pytest.raises(ConfigError, match="IMD .*no public code or weights"):
            match_dense({"name": name}, pairs, image_dir, tmp_path / "f.h5", tmp_path / "m.h5", device="cpu")
    list_weights()
    listing = capsys.readouterr().out
    assert "unavailable: dense backend 'imd' is not available: IMD" in listing
    for file in ("loftr_outdoor.ckpt", "loftr_indoor.ckpt", "loftr_indoor_ds_new.ckpt", "minima_loftr.ckpt",
                 "gim_loftr_50h.ckpt"):
        assert file in listing


def test_recon_run_with_loftr_goes_through_the_dense_stage_to_mapping(tmp_path, monkeypatch, capsys):
    """`recon run --matcher loftr` with random weights on a generated 5-view plane scene: the dense stage writes
    LoFTR's quantised keypoints and matches and hands them to verification and mapping. Random weights cannot
    register a scene (123 raw matches, 3 of 10 pairs verified when this was written), so the run must end with
    the mapping stage's one-line error, not inside the matcher."""
    from kornia.feature import LoFTR

    from feature_backends.images import read_image
    from feature_backends.loftr import kornia_loftr_config
    from feature_backends.store import FeatureReader, MatchReader
    from recon.cli import main
    from recon.synthetic import PlaneSceneSpec, make_plane_scene

    scene = make_plane_scene(tmp_path / "scene", PlaneSceneSpec(num_frames=5, arc_degrees=20.0, width=320, height=240,
                                                                focal=250.0))
    images = scene / "images"
    names = sorted(p.name for p in images.iterdir())
    network = LoFTR(pretrained=None, config=kornia_loftr_config(False, 0.2))
    state = informative_loftr_state(network, gray(read_image(images / names[0])))
    (tmp_path / "weights").mkdir()
    torch.save(lightning(state, "matcher."), tmp_path / "weights" / "loftr_outdoor.ckpt")
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert main(["run", str(images), str(tmp_path / "out"), "--matcher", "loftr", "--export", ""]) == 1
    assert "mapping failed" in capsys.readouterr().err
    with FeatureReader(tmp_path / "out" / "features.h5") as features, \
            MatchReader(tmp_path / "out" / "matches.h5") as matches:
        assert all(len(features.read_keypoints(name)) > 10 for name in names)  # 18-61 when written
        counts = [len(matches.read(names[i], names[j])[0]) for i in range(5) for j in range(i + 1, 5)
                  if matches.has(names[i], names[j]) or matches.has(names[j], names[i])]
    assert len(counts) == 10 and sum(counts) > 80  # 123 when written
